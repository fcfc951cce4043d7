"""VampPrior, flow prior and IAF guide: closed-form densities, the contract, options, and runs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.inference.fused import supports_fused_elbo
from ppl_vae.inference.importance import elbo_per_datapoint, iw_log_px
from ppl_vae.inference.objectives import dreg_loss, stl_loss
from ppl_vae.models import (
    GUIDES,
    PRIORS,
    IAFGuideVAE,
    VampPrior,
    build_vae,
    make_guide,
    make_prior,
)


def _grid_integral(log_density, half_width: float = 9.0, n: int = 301) -> float:
    """The integral of exp(log_density) over a square grid in 2-D (trapezoid-free Riemann sum)."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        values = log_density(zz.float()).double().exp()
    return (values.sum() * (t[1] - t[0]) ** 2).item()


def test_vamp_prior_log_prob_equals_the_hand_computed_mixture():
    vae = build_vae(
        "bernoulli_mlp", (1, 4, 4), prior="vamp", prior_options={"num_components": 3}, latent_dim=2, hidden_dim=8
    )
    z = torch.randn(7, 2)
    loc, scale = vae.encoder(vae.prior.pseudo_inputs)
    comp = torch.stack([torch.distributions.Normal(loc[k], scale[k]).log_prob(z).sum(-1) for k in range(3)])
    expected = torch.logsumexp(comp, 0) - math.log(3)
    assert torch.allclose(vae.prior().log_prob(z), expected, rtol=1e-5, atol=1e-5)
    # one set of encoder weights: the prior shares the VAE's encoder, it holds no copy
    assert not any(k.startswith("prior.encoder") for k in vae.state_dict())
    assert vae.prior.pseudo_inputs.shape == (3, 1, 4, 4)


def test_vamp_prior_needs_an_attached_unconditional_encoder():
    with pytest.raises(ValueError, match="has no encoder: build the VAE with build_vae"):
        VampPrior(2)()
    with pytest.raises(ValueError, match="prior 'vamp' needs an encoder of x alone"):
        build_vae("cvae", (1, 4, 4), prior="vamp", latent_dim=2, hidden_dim=8, data_info={"num_classes": 3})
    with pytest.raises(ValueError, match="num_components must be >= 1"):
        make_prior("vamp", 2, num_components=0)
    # the text encoder rounds its input to token ids: it ran on the pseudo-inputs, which then never trained
    with pytest.raises(ValueError, match="ConvTextEncoder passes no gradient to its input"):
        build_vae("text_hybrid", (16,), prior="vamp", latent_dim=2, hidden_dim=8, data_info={"vocab_size": 30})


def test_vamp_refuses_an_encoder_whose_gradient_is_zero_everywhere():
    """torch.round passes a gradient of zero: the pseudo-inputs would never move either."""
    from torch import nn

    class Rounding(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(16, 4)

        def forward(self, x):
            out = self.net(torch.round(x).flatten(1))
            return out[:, :2], nn.functional.softplus(out[:, 2:])

    with pytest.raises(ValueError, match="Rounding passes no gradient to its input"):
        VampPrior(2, num_components=3).attach_to(Rounding(), (1, 4, 4))


def test_vamp_pseudo_inputs_get_gradients_through_an_image_encoder():
    vae = build_vae("gaussian_mlp", (1, 4, 4), prior="vamp", prior_options={"num_components": 3}, latent_dim=2)
    vae.prior().log_prob(torch.randn(5, 2)).sum().backward()
    assert vae.prior.pseudo_inputs.grad is not None and bool(vae.prior.pseudo_inputs.grad.abs().sum() > 0)


def test_flow_prior_is_a_normalized_density_and_samples_match_it():
    prior = make_prior("flow", 2, num_flows=2, hidden_dims=[16])
    with torch.no_grad():  # a visibly non-Gaussian start
        for p in prior.transforms.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert _grid_integral(prior().log_prob) == pytest.approx(1.0, abs=0.01)
    z = prior().sample((4000,))
    # the sample mean matches the density's mean (computed on the grid) within MC error
    t = torch.linspace(-9, 9, 301)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        w = prior().log_prob(zz).exp() * (t[1] - t[0]) ** 2
    grid_mean = (w[:, None] * zz).sum(0)
    assert torch.allclose(z.mean(0), grid_mean, atol=4 * z.std(0).max().item() / 4000**0.5)


def test_iaf_guide_is_a_normalized_density_consistent_under_inversion():
    vae = build_vae("bernoulli_mlp", (1, 4, 4), guide="iaf", guide_options={"num_flows": 2}, latent_dim=2, hidden_dim=8)
    assert isinstance(vae, IAFGuideVAE) and supports_fused_elbo(vae) and not vae.encoder_is_guide
    x = torch.bernoulli(torch.rand(1, 1, 4, 4))
    from ppl_vae.inference.latents import check_fast_path

    assert check_fast_path(vae, x.expand(3, 1, 4, 4), atol=1e-4) < 1e-4  # its protocol agrees with its guide
    with torch.no_grad():
        for p in vae.flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
        q = vae.guide_distribution(x)
        assert _grid_integral(lambda z: q.log_prob(z[:, None, :])[:, 0]) == pytest.approx(1.0, abs=0.01)
        z = q.sample((5,))
        cached = q.log_prob(z)  # the flows' own draws: no inversion
        inverted = vae.guide_distribution(x).log_prob(z.clone())  # fresh transforms: inverted
    assert torch.allclose(cached, inverted, atol=1e-4)


@pytest.mark.parametrize("prior,guide", list(itertools.product(PRIORS.names(), GUIDES.names())))
def test_every_prior_and_guide_takes_an_svi_step_that_changes_parameters(prior, guide):
    vae = build_vae("bernoulli_mlp", (1, 4, 4), prior=prior, guide=guide, latent_dim=3, hidden_dim=8)
    x = torch.bernoulli(torch.rand(6, 1, 4, 4))
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, x, num_data=60
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = {k.split(".")[0] for k, v in vae.named_parameters() if not torch.equal(v, before[k])}
    expected = {"encoder", "decoder"} | ({"prior"} if prior != "standard_normal" else set())
    expected |= {"flows"} if guide == "iaf" else set()
    assert expected <= changed, (expected, changed)


def test_a_flow_guide_keeps_the_contract_for_the_estimators():
    vae = build_vae("bernoulli_mlp", (1, 4, 4), prior="flow", guide="iaf", latent_dim=3, hidden_dim=8)
    x = torch.bernoulli(torch.rand(5, 1, 4, 4))
    elbo = elbo_per_datapoint(vae.model, vae.guide, x, num_particles=300)
    iw = iw_log_px(vae.model, vae.guide, x, num_samples=300)
    assert elbo.shape == iw.shape == (5,)
    assert (elbo < iw).all()  # Jensen: the K-sample bound lies above the ELBO


@pytest.mark.parametrize("loss_fn", [dreg_loss, stl_loss])
def test_path_derivative_objectives_reach_the_flow_parameters(loss_fn):
    """DReG/STL re-score z with detached parameters; for a flow that takes a second run of the guide."""
    vae = build_vae("bernoulli_mlp", (1, 4, 4), guide="iaf", latent_dim=3, hidden_dim=8)
    x = torch.bernoulli(torch.rand(4, 1, 4, 4))
    loss_fn(vae.model, vae.guide, x, num_particles=3).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.flows.parameters())
    assert any(p.grad.abs().sum() > 0 for p in vae.flows.parameters())


def test_unknown_options_are_one_line_value_errors_naming_the_option():
    cases = [
        (
            dict(prior="standard_normal", prior_options={"num_components": 5}),
            "prior 'standard_normal' has no option 'num_components'; it takes no options",
        ),
        (
            dict(prior="vamp", prior_options={"num_flows": 2}),
            "prior 'vamp' has no option 'num_flows'; it takes num_components, init_loc, init_scale",
        ),
        (
            dict(guide="iaf", guide_options={"num_components": 2}),
            "guide 'iaf' has no option 'num_components'; it takes num_flows, hidden_dims",
        ),
        (
            dict(guide="diagonal_normal", guide_options={"num_flows": 2}),
            "guide 'diagonal_normal' has no option 'num_flows'; it takes no options",
        ),
        (
            dict(likelihood="bernoulli", likelihood_options={"scale": 0.1}),
            "likelihood 'bernoulli' has no option 'scale'; it takes no options",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=2, hidden_dim=8, **kwargs)
        assert str(info.value) == message and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="valid guides: diagonal_normal, iaf"):
        build_vae("bernoulli_mlp", (4,), guide="nope")
    with pytest.raises(ValueError, match="guide 'iaf' needs latent_dim >= 2"):
        build_vae("bernoulli_mlp", (4,), guide="iaf", latent_dim=1)
    with pytest.raises(ValueError, match="hidden_dims must be a non-empty list"):
        make_prior("flow", 3, hidden_dims=[0])


def test_iaf_refuses_models_that_override_the_guide():
    cvae = build_vae("cvae", (1, 4, 4), latent_dim=2, hidden_dim=8, data_info={"num_classes": 3})
    with pytest.raises(ValueError, match="guide 'iaf' needs a VAE whose guide is its encoder's Gaussian"):
        make_guide("iaf", cvae)


@pytest.mark.slow
def test_a_run_with_flow_guide_and_vamp_prior_reloads_the_same_model(tmp_path):
    from ppl_vae import pipeline

    config = RunConfig(
        model=ModelConfig(
            model="bernoulli_mlp",
            prior="vamp",
            prior_options={"num_components": 4},
            guide="iaf",
            guide_options={"num_flows": 1},
            latent_dim=2,
            hidden_dim=16,
        ),
        data=DataConfig(dataset="digits", binarize="threshold", train_size=200),
        train=TrainConfig(method="iwae", num_particles=3, epochs=1, batch_size=50, device="cpu"),
    )
    run = pipeline.fit(config, tmp_path / "run", progress=False)
    loaded = pipeline.load_run(tmp_path / "run")
    assert isinstance(loaded.vae, IAFGuideVAE) and isinstance(loaded.vae.prior, VampPrior)
    x = torch.bernoulli(torch.full((3, *run.vae.event_shape), 0.3))
    run.vae.eval()
    torch.manual_seed(5)
    a = iw_log_px(run.vae.model, run.vae.guide, x, num_samples=10)
    torch.manual_seed(5)
    b = iw_log_px(loaded.vae.model, loaded.vae.guide, x, num_samples=10)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "model, options, words",
    [
        ("two_layer", {"guide": "iaf"}, "model 'two_layer' is not"),
        ("m2", {"prior": "vamp", "data_info": {"num_classes": 10}}, "got prior 'vamp'"),
        ("gmvae", {"prior": "vamp"}, "model 'gmvae' enumerates the component"),
        ("relaxed_gmvae", {"prior": "flow"}, "model 'relaxed_gmvae' relaxes the component"),
    ],
)
def test_refusals_name_the_parts_as_the_user_named_them(model, options, words):
    """QA: refusals named Python classes (HierarchicalVAE, VampPrior) instead of the --model and
    --prior values typed, and said the relaxed GMVAE 'enumerates' its component."""
    from ppl_vae.models import build_vae

    with pytest.raises(ValueError) as info:
        build_vae(model, (1, 8, 8), latent_dim=2, hidden_dim=8, **options)
    assert words in str(info.value), str(info.value)
    assert "VAE is not" not in str(info.value) and "Prior" not in str(info.value)
