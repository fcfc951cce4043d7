"""The core model parts: registries, likelihood supports, priors, every model/prior/likelihood
combination taking an SVI step that changes parameters."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.errors import DataError
from ppl_vae.models import LIKELIHOODS, MODELS, PRIORS, VAE, build_vae, make_likelihood, make_prior
from ppl_vae.models.priors import MixtureOfGaussiansPrior
from ppl_vae.registry import Registry

CORE_MODELS = ["gaussian_mlp", "bernoulli_mlp"]


def test_registry_lists_valid_names_on_unknown():
    reg: Registry[int] = Registry("widget")
    reg.register("a", doc="first")(1)
    reg.register("b")(2)
    assert reg.get("b") == 2
    with pytest.raises(ValueError, match=r"unknown widget 'c'; valid widgets: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(3)


@pytest.mark.parametrize(
    "model,prior,likelihood",
    list(itertools.product(CORE_MODELS, PRIORS.names(), LIKELIHOODS.names())),
)
def test_every_combination_takes_an_svi_step_that_changes_parameters(model, prior, likelihood):
    vae = build_vae(model, (1, 4, 4), prior=prior, likelihood=likelihood, latent_dim=3, hidden_dim=8)
    x = torch.rand(6, 1, 4, 4)
    if getattr(vae.likelihood, "support", (0, 1)) == (0.0, 1.0) and likelihood == "bernoulli":
        x = torch.bernoulli(x)
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=60)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = {k for k, v in vae.named_parameters() if not torch.equal(v, before[k])}
    # encoder and decoder always learn; a learnable prior learns too
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    if prior != "standard_normal":  # learnable priors (mixture, vamp pseudo-inputs, flow) learn too
        assert any(k.startswith("prior.") for k in changed)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid models: .*bernoulli_mlp.*gaussian_mlp"):
        build_vae("nope", (4,))
    with pytest.raises(ValueError, match="valid priors: .*standard_normal"):
        build_vae("gaussian_mlp", (4,), prior="nope")
    with pytest.raises(ValueError, match="valid likelihoods: .*bernoulli"):
        build_vae("gaussian_mlp", (4,), likelihood="nope")


@pytest.mark.parametrize(
    "options, bad",
    [({"foo": 1}, "foo"), ({"squash": False}, "squash"), ({"event_dims": 1}, "event_dims")],
)
def test_an_option_gaussian_sigmoid_does_not_take_is_named(options, bad):
    """QA: gaussian_mlp's default likelihood took any keyword (a lambda with **kw), so a bad option
    was a raw TypeError from its constructor; make_likelihood checked nothing."""
    from ppl_vae.models import make_likelihood

    with pytest.raises(ValueError, match=f"likelihood 'gaussian_sigmoid' has no option '{bad}'; it takes min_scale"):
        build_vae("gaussian_mlp", (1, 8, 8), likelihood="gaussian_sigmoid", likelihood_options=options)
    with pytest.raises(ValueError, match="likelihood 'gaussian' has no option 'bogus'"):
        make_likelihood("gaussian", bogus=2)
    assert make_likelihood("gaussian_sigmoid", min_scale=0.05).min_scale == 0.05


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        build_vae("gaussian_mlp", (4,), latent_dim=0)
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        build_vae("gaussian_mlp", (4,), hidden_dim=0)
    with pytest.raises(ValueError, match="num_components must be an integer >= 1"):
        make_prior("mixture_of_gaussians", 2, num_components=0)


def test_model_defaults_follow_the_paper():
    assert MODELS.get("gaussian_mlp").likelihood == "gaussian_sigmoid"
    assert MODELS.get("bernoulli_mlp").likelihood == "bernoulli"
    vae = build_vae("gaussian_mlp", (1, 8, 8))
    # AEVB C.2: tanh hidden layer; the decoder mean is squashed into (0, 1).
    assert any(isinstance(m, torch.nn.Tanh) for m in vae.decoder.modules())
    mean = vae.decode(torch.randn(100, vae.latent_dim) * 10)
    assert mean.min() > 0 and mean.max() < 1


def test_swapping_parts_by_object():
    prior = MixtureOfGaussiansPrior(latent_dim=4, num_components=3)
    likelihood = make_likelihood("laplace", event_dims=3)
    vae = build_vae("gaussian_mlp", (1, 8, 8), prior=prior, likelihood=likelihood)
    assert vae.prior is prior and vae.likelihood is likelihood and vae.latent_dim == 4
    with pytest.raises(ValueError, match="disagrees"):
        build_vae("gaussian_mlp", (1, 8, 8), prior=prior, latent_dim=5)


@pytest.mark.parametrize(
    "name,x,expected",
    [
        # Bernoulli(p=sigmoid(0)=0.5) per element: log 0.5 each, also for grey levels (cross-entropy)
        ("bernoulli", torch.tensor([[0.0, 1.0, 0.3]]), 3 * math.log(0.5)),
        # N(x; 0, 1) with the fixed scale 1
        ("gaussian_fixed", torch.tensor([[0.0, 1.0, -1.0]]), -1.5 * math.log(2 * math.pi) - 1.0),
    ],
)
def test_likelihood_log_prob_closed_form(name, x, expected):
    options = {"scale": 1.0} if name == "gaussian_fixed" else {}
    lik = make_likelihood(name, event_dims=1, **options)
    params = [torch.zeros_like(x) for _ in range(lik.num_params)]
    assert lik(*params).log_prob(x).item() == pytest.approx(expected, rel=1e-6)


def test_gaussian_likelihood_scale_and_squash():
    lik = make_likelihood("gaussian_sigmoid", event_dims=1)
    d = lik(torch.zeros(1, 2), torch.full((1, 2), -50.0))
    # softplus(-50) ~ 0: the scale sits at its floor, the mean at sigmoid(0)
    assert torch.allclose(d.base_dist.scale, torch.full((1, 2), lik.min_scale), atol=1e-12)
    assert torch.allclose(d.mean, torch.full((1, 2), 0.5))


@pytest.mark.parametrize("name", ["bernoulli", "continuous_bernoulli"])
def test_unit_interval_likelihoods_reject_data_outside_support(name):
    lik = make_likelihood(name)
    lik.check_support(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(DataError, match=r"needs data in \[0, 1\].*\[-0.5, 2\]"):
        lik.check_support(torch.tensor([-0.5, 2.0]))
    with pytest.raises(DataError, match="NaN"):
        lik.check_support(torch.tensor([0.5, float("nan")]))


def test_mixture_prior_log_prob_matches_hand_computation():
    prior = MixtureOfGaussiansPrior(latent_dim=2, num_components=2)
    with torch.no_grad():
        prior.locs.copy_(torch.tensor([[0.0, 0.0], [3.0, -1.0]]))
        prior.logits.copy_(torch.log(torch.tensor([0.25, 0.75])))
    z = torch.tensor([1.0, 0.5])
    scales = torch.nn.functional.softplus(prior.raw_scales) + 1e-4
    comp = torch.distributions.Normal(prior.locs, scales).log_prob(z).sum(-1)
    expected = torch.logsumexp(comp + torch.log(torch.tensor([0.25, 0.75])), 0)
    assert prior().log_prob(z).item() == pytest.approx(expected.item(), rel=1e-5)


def test_networks_accept_extra_leading_batch_dims():
    vae = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=3, hidden_dim=8)
    z = torch.randn(5, 7, 3)
    assert vae.decode(z).shape == (5, 7, 1, 4, 4)
    loc, scale = vae.encode(torch.rand(7, 1, 4, 4))
    assert loc.shape == scale.shape == (7, 3) and (scale > 0).all()
    assert vae.sample(4).shape == (4, 1, 4, 4)
    assert isinstance(vae, VAE)


def test_bernoulli_likelihood_equals_pyro_bernoulli_and_broadcasts():
    from pyro import distributions as dist

    logits = torch.randn(3, 5, 1, 4, 4) * 3
    x = torch.rand(5, 1, 4, 4)  # grey levels: cross-entropy
    lik = make_likelihood("bernoulli", event_dims=3)
    expected = dist.Bernoulli(logits=logits, validate_args=False).to_event(3).log_prob(x)
    d = lik(logits)
    assert d.batch_shape == (3, 5) and d.event_shape == (1, 4, 4)
    assert torch.allclose(d.log_prob(x), expected, rtol=1e-6)
    expanded = d.expand((2, 3, 5))
    assert torch.allclose(expanded.log_prob(x), expected.expand(2, 3, 5), rtol=1e-6)
    assert torch.equal(d.mean, torch.sigmoid(logits))


def test_build_vae_refuses_settings_it_would_drop_or_that_cannot_score_the_data():
    """QA of 2026-12-07: each of these built, then ignored what was asked or failed deep in Pyro."""
    from ppl_vae.models.likelihoods import make_likelihood
    from ppl_vae.models.priors import make_prior

    with pytest.raises(ValueError, match="prior_options .* apply to a prior named by string"):
        build_vae(
            "bernoulli_mlp",
            (1, 8, 8),
            prior=make_prior("mixture_of_gaussians", 2),
            latent_dim=2,
            prior_options={"num_components": 3},
        )
    with pytest.raises(ValueError, match="likelihood_options .* apply to a likelihood named by string"):
        build_vae(
            "gaussian_mlp",
            (1, 8, 8),
            likelihood=make_likelihood("gaussian", event_dims=3),
            likelihood_options={"min_scale": 5.0},
        )
    with pytest.raises(ValueError, match=r"sums 1 trailing dim\(s\) .* need 3: build it with event_dims=3"):
        build_vae("gaussian_mlp", (1, 8, 8), likelihood=make_likelihood("laplace"))
    with pytest.raises(ValueError, match="both set the hidden sizes of 'two_layer': give one"):
        build_vae("two_layer", (1, 8, 8), hidden_dim=7, model_options={"hidden_dims": [[16], [8]]})
    with pytest.raises(ValueError, match="puts 4 units in the top layer but latent_dim is 50"):
        build_vae("two_layer", (1, 8, 8), latent_dim=50, model_options={"latent_dims": [8, 4]})
    vae = build_vae("two_layer", (1, 8, 8), model_options={"latent_dims": [8, 4], "hidden_dims": [[16], [8]]})
    assert vae.latent_dim == 4  # given alone, the options decide
    laplace = build_vae("gaussian_mlp", (1, 8, 8), likelihood=make_likelihood("laplace", event_dims=3))
    assert laplace.likelihood.event_dims == 3


@pytest.mark.parametrize(
    "kind, name, options, message",
    [
        ("likelihood", "gaussian", {"min_scale": -1.0}, "min_scale must be a finite number >= 0"),
        ("likelihood", "gaussian", {"min_scale": float("nan")}, "min_scale must be a finite number >= 0"),
        ("likelihood", "gaussian_fixed", {"scale": float("inf")}, "scale must be a finite number > 0"),
        ("likelihood", "categorical", {"num_categories": 2.5}, "num_categories must be an integer >= 2"),
        ("prior", "mixture_of_gaussians", {"init_scale": float("nan")}, "init_scale must be a finite number >= 0"),
        ("prior", "vamp", {"init_loc": float("nan")}, "init_loc must be a finite number"),
    ],
)
def test_bad_option_values_are_refused_when_the_part_is_built(kind, name, options, message):
    """QA: these were accepted and training stopped at step 1 with advice to lower the learning
    rate, or deep inside Pyro."""
    with pytest.raises(ValueError, match=message):
        build_vae("gaussian_mlp", (1, 8, 8), **{kind: name, f"{kind}_options": options})


def test_a_vae_put_together_by_hand_is_checked_before_training():
    """QA: a custom decoder with one output for a two-parameter likelihood, a bare tensor instead
    of a tuple, a prior of another latent size, or an event shape not the data's failed inside the
    first step (or trained without a word); now one line before training."""
    import ppl_vae
    from ppl_vae.config import TrainConfig
    from ppl_vae.inference.training import train
    from ppl_vae.models import VAE, make_likelihood, make_prior

    data = ppl_vae.load_dataset("digits", train_size=50)
    base = build_vae("gaussian_mlp", data.event_shape, latent_dim=3, hidden_dim=8)
    config = TrainConfig(epochs=1, batch_size=25, device="cpu", train_eval_size=10)

    class Bare(torch.nn.Module):  # returns the mean tensor itself, not a tuple
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, z):
            return self.decoder(z)[0]

    cases = [
        (VAE(base.encoder, base.decoder, base.prior, base.likelihood, (1, 28, 28)), "built for datapoints of shape"),
        (VAE(base.encoder, base.decoder, make_prior("standard_normal", 4), base.likelihood, data.event_shape),
         r"encoder gives latents of shape \(3,\) but its prior is over 4"),
        (VAE(base.encoder, Bare(base.decoder), base.prior, base.likelihood, data.event_shape),
         "decoder returns a Tensor, but likelihood 'gaussian_sigmoid' takes a tuple of 2"),
        (VAE(base.encoder, base.decoder, base.prior, make_likelihood("gaussian", event_dims=3), data.event_shape),
         None),  # right: trains
    ]  # fmt: skip
    for vae, message in cases:
        if message is None:
            train(vae, data, config, progress=False)
            continue
        with pytest.raises(ValueError, match=message):
            train(vae, data, config, progress=False)
