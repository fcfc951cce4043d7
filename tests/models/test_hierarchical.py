"""Hierarchical VAEs (two_layer, ladder, one_layer): the registry, the fast path against Pyro's
traces, every training objective, the per-layer KL warm-up, and the closed-form checks on a
two-layer linear-Gaussian hierarchy (ppl_vae.models.closed_form.TwoLayerLinearGaussian) built
from the models' own parts with identity activations and a fixed-scale Gaussian likelihood.

Monte Carlo tolerances come from the estimators' standard errors (3 se, pooled over datapoints)."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppl_vae.config import TrainConfig
from ppl_vae.inference.ais import ais_log_px, simulate_data
from ppl_vae.inference.fused import fused_elbo_loss, supports_fused_elbo
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.latents import check_fast_path, model_layout
from ppl_vae.inference.training import METHODS
from ppl_vae.models import MODELS, build_vae, make_likelihood, make_prior
from ppl_vae.models.closed_form import TwoLayerLinearGaussian
from ppl_vae.models.densities import normal_log_prob
from ppl_vae.models.hierarchical import HierarchicalVAE, LadderVAE, precision_weighted

HIERARCHICAL = ["two_layer", "ladder"]
ALL = ["one_layer", "two_layer", "ladder"]


def small(name, **options):
    return build_vae(name, (1, 4, 4), latent_dim=2, hidden_dim=8, model_options=options)


def binary(n=6):
    return torch.bernoulli(torch.rand(n, 1, 4, 4))


# ---------------------------------------------------------------------------------------------
# Registry and structure


def test_defaults_are_burdas_architecture():
    vae = build_vae("two_layer", (1, 28, 28))
    assert vae.latent_dims == (100, 50) and vae.hidden_dims == ((200, 200), (100, 100))
    assert model_layout(vae.model, torch.zeros(2, 1, 28, 28)).names == ("z2", "z1")
    sizes = [m.out_features for m in vae.encoder[0].modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [200, 200, 200]  # 784-200-200 then the (loc, log-variance) head of z1 (2 x 100)
    assert [m.out_features for m in vae.encoder[1].modules() if isinstance(m, torch.nn.Linear)] == [100, 100, 100]
    assert [m.out_features for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)] == [200, 200, 784]
    assert any(isinstance(m, torch.nn.Tanh) for m in vae.modules())
    ladder = build_vae("ladder", (1, 28, 28))
    assert isinstance(ladder, LadderVAE) and ladder.latent_dims == (100, 50)
    one = build_vae("one_layer", (1, 28, 28))
    assert one.latent_dim == 50 and model_layout(one.model, torch.zeros(2, 1, 28, 28)).names == ("z",)
    custom = build_vae("two_layer", (1, 4, 4), latent_dim=3, model_options={"z1_dim": 5, "hidden_dims": [[7], [6, 4]]})
    assert custom.latent_dims == (5, 3) and custom.hidden_dims == ((7,), (6, 4))
    for name in ALL:
        assert name in MODELS.names() and MODELS.get(name).likelihood == "bernoulli"


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_fast_path_equals_the_traced_model_and_guide(name):
    vae = small(name)
    x = binary()
    assert check_fast_path(vae, x, num_particles=3) < 1e-4
    # the fused ELBO draws what Pyro's guide draws: same loss for the same seed
    torch.manual_seed(1)
    fused = fused_elbo_loss(vae, x, num_data=60)
    torch.manual_seed(1)
    traced = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=60)
    assert float(fused) == pytest.approx(float(traced), rel=1e-5)
    assert supports_fused_elbo(vae) and not vae.encoder_is_guide


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_a_broken_fast_path_is_caught(name):
    vae = small(name)
    vae.log_prior = lambda x, latents, y=None: HierarchicalVAE.log_prior(vae, x, latents) + 0.1  # type: ignore
    with pytest.raises(ValueError, match="differs from its model/guide"):
        check_fast_path(vae, binary())


@pytest.mark.parametrize("method", ["svi", "svi_traced", "iwae", "dreg", "stl", "rws"])
@pytest.mark.parametrize("name", ALL)
def test_every_objective_takes_a_step_that_changes_every_part(name, method, one_thread):
    vae = small(name)
    config = TrainConfig(method=method.split("_")[0], num_particles=3, lr=1e-2, fused_elbo=method != "svi_traced")
    stepper = METHODS.get(config.method)(vae, config)
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    loss = stepper.step(binary(), num_data=60, kl_weight=0.5)
    assert torch.isfinite(loss)
    changed = {k.split(".")[0] for k, v in vae.named_parameters() if not torch.equal(v, before[k])}
    expected = {"encoder", "decoder"} | ({"generative"} if name != "one_layer" else set())
    assert expected <= changed, (expected, changed)


@pytest.mark.parametrize("method", ["wake-sleep", "mcem"])
def test_methods_that_need_the_encoders_gaussian_refuse_a_hierarchy(method):
    with pytest.raises(ValueError, match=r"needs a model whose guide is the encoder\'s Gaussian \(encoder_is_guide"):
        METHODS.get(method)(small("two_layer"), TrainConfig(method=method))


# ---------------------------------------------------------------------------------------------
# Per-layer KL warm-up


def _site_terms(vae, x, seed):
    """log p(x|z1) and, per site, log p - log q, from one traced guide draw at KL weight 1."""
    torch.manual_seed(seed)
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    lik = model.nodes["x"]["fn"].log_prob(x).sum()
    terms = {
        s: (
            model.nodes[s]["fn"].log_prob(model.nodes[s]["value"])
            - guide.nodes[s]["fn"].log_prob(guide.nodes[s]["value"])
        ).sum()
        for s in vae.sites
    }
    return lik, terms


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_per_layer_kl_warmup_scales_each_layers_kl_term(name):
    vae = small(name, kl_warmup_fractions=[0.5, 1.0])
    assert vae.kl_weight_per_site and not supports_fused_elbo(vae)  # the fused ELBO has one weight
    assert vae.kl_weights(0.3) == pytest.approx((0.6, 0.3)) and vae.kl_weights(0.7) == pytest.approx((1.0, 0.7))
    assert vae.kl_weights(1.0) == (1.0, 1.0)
    x = binary()
    lik, terms = _site_terms(vae, x, seed=2)
    torch.manual_seed(2)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, kl_weight=0.3)
    expected = -(lik + 0.6 * terms["z1"] + 0.3 * terms["z2"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(-(lik + 0.3 * (terms["z1"] + terms["z2"]))), rel=1e-5)
    # and the training step goes through the traces with those weights
    stepper = METHODS.get("svi")(vae, TrainConfig(kl_warmup_epochs=2))  # (without a warm-up: refused)
    assert not stepper.fused
    torch.manual_seed(2)
    assert float(stepper.loss(x, num_data=6, kl_weight=0.3)) == pytest.approx(float(expected), rel=1e-5)


def test_per_layer_warmup_fractions_without_a_warmup_are_refused():
    """With the KL weight 1 from the first step every layer's weight is min(1, 1 / f) = 1: the
    fractions changed nothing but moved training onto Pyro's traces (a slower path)."""
    from ppl_vae.errors import ConfigError

    vae = small("ladder", kl_warmup_fractions=[0.5, 1.0])
    for config in (TrainConfig(), TrainConfig(kl_schedule="constant")):
        with pytest.raises(ConfigError, match=r"kl_warmup_fractions .* the KL weight is 1 from the first step"):
            METHODS.get("svi")(vae, config)
    METHODS.get("svi")(vae, TrainConfig(kl_schedule="constant", kl_weight=0.5))  # a weight below 1: it applies
    METHODS.get("svi")(vae, TrainConfig(kl_schedule="cyclical"))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_sizes_and_options_are_one_line_value_errors():
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        build_vae("two_layer", (1, 4, 4), latent_dim=0)
    with pytest.raises(ValueError, match=r"model 'ladder': option 'z1_dim' must be null or an integer >= 1, got 0"):
        build_vae("ladder", (1, 4, 4), model_options={"z1_dim": 0})
    prior = make_prior("standard_normal", 2)
    lik = make_likelihood("bernoulli", event_dims=3)
    with pytest.raises(ValueError, match=r"latent_dims must be a non-empty list of positive integers.*\[3, 0\]"):
        HierarchicalVAE((1, 4, 4), [3, 0], prior, lik)
    with pytest.raises(ValueError, match="hidden_dims must give one list of hidden sizes per stochastic layer"):
        build_vae("two_layer", (1, 4, 4), model_options={"hidden_dims": [[8]]})
    with pytest.raises(ValueError, match=r"option 'hidden_dims' must be null or a list of \(an integer >= 1 or a list"):
        build_vae("two_layer", (1, 4, 4), model_options={"hidden_dims": [[8], [0]]})
    with pytest.raises(ValueError, match=r"'kl_warmup_fractions' must be null or a list of finite numbers in \(0, 1\]"):
        build_vae("ladder", (1, 4, 4), model_options={"kl_warmup_fractions": [0.0, 1.0]})
    with pytest.raises(ValueError, match=r"kl_warmup_fractions must be 2 numbers in \(0, 1\]"):
        build_vae("ladder", (1, 4, 4), model_options={"kl_warmup_fractions": [0.5, 1.0, 1.0]})
    with pytest.raises(ValueError, match="model 'two_layer' has no option 'depth'; it takes z1_dim"):
        build_vae("two_layer", (1, 4, 4), model_options={"depth": 3})
    with pytest.raises(ValueError, match="model 'bernoulli_mlp' has no option 'z1_dim'; it takes no options"):
        build_vae("bernoulli_mlp", (1, 4, 4), model_options={"z1_dim": 3})
    with pytest.raises(ValueError, match="model 'two_layer': option 'activation' must be one of 'tanh', 'relu'"):
        build_vae("two_layer", (1, 4, 4), model_options={"activation": "swish"})
    with pytest.raises(ValueError, match="needs a prior that does not evaluate an encoder"):
        build_vae("two_layer", (1, 4, 4), prior="vamp")
    with pytest.raises(ValueError, match="guide 'iaf' needs a VAE whose guide is its encoder's Gaussian"):
        build_vae("ladder", (1, 4, 4), guide="iaf")


# ---------------------------------------------------------------------------------------------
# Closed forms


def test_precision_weighting_is_the_closed_form_gaussian_product():
    g = torch.Generator().manual_seed(0)
    la, lb = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    sa = torch.rand(50, 3, generator=g, dtype=torch.float64) + 0.1
    sb = torch.rand(50, 3, generator=g, dtype=torch.float64) * 3 + 0.1
    loc, scale = precision_weighted(la, sa, lb, sb)
    # N(z; la, sa) N(z; lb, sb) = N(la; lb, sqrt(sa^2 + sb^2)) N(z; loc, scale) for every z
    const = normal_log_prob(la, lb, (sa**2 + sb**2).sqrt())
    for z in torch.randn(4, 50, 3, generator=g, dtype=torch.float64) * 3:
        lhs = normal_log_prob(z, la, sa) + normal_log_prob(z, lb, sb)
        assert torch.allclose(lhs, const + normal_log_prob(z, loc, scale), atol=1e-10)
    assert torch.allclose(scale**-2, sa**-2 + sb**-2)
    assert torch.allclose(loc, (la / sa**2 + lb / sb**2) * scale**2)


def _instance(diagonal: bool, seed: int = 3):
    """A TwoLayerLinearGaussian (random A, W), or with ``diagonal`` one whose A A^T, A^T A and
    W^T W are diagonal, so that the exact posterior factorizes per coordinate; x simulated
    from it and the exact log p(x)."""
    torch.manual_seed(seed)
    lg = TwoLayerLinearGaussian(x_dim=5, z1_dim=3, z2_dim=2, dtype=torch.float64)
    if diagonal:
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))
            lg.W.copy_(q * torch.tensor([1.2, 0.8, -1.5], dtype=torch.float64))
            lg.A.copy_(torch.tensor([[0.9, 0.0], [0.0, -0.7], [0.0, 0.0]], dtype=torch.float64))
    x = simulate_data(lg.model, torch.zeros(24, 5, dtype=torch.float64), seed=1)[0]
    return lg, x, lg.exact_log_marginal(x).detach()


def _head(net, weight, bias, var):
    """Set a Gaussian head (loc, log-variance) to loc = weight @ h + bias, variance ``var``."""
    d = bias.shape[0]
    net.weight.zero_()
    net.weight[:d] = weight
    net.bias[:d] = bias
    net.bias[d:] = var.log()


def _conditional(mean, cov, u, v):
    """Gain, offset and covariance of coordinates u given coordinates v of N(mean, cov)."""
    gain = torch.linalg.solve(cov[v][:, v], cov[v][:, u]).T
    return gain, mean[u] - gain @ mean[v], cov[u][:, u] - gain @ cov[v][:, u]


@torch.no_grad()
def _linear_gaussian_vae(cls, lg: TwoLayerLinearGaussian, inflate: float = 1.0):
    """``cls`` with identity activations and no hidden layers, holding lg's model and (the diagonal
    part of) its exact posterior as the guide, the guide's scales times ``inflate``."""
    d2, d1, dx = lg.z2_dim, lg.z1_dim, lg.x_dim
    vae = cls(
        (dx,),
        [d1, d2],
        make_prior("standard_normal", d2),
        make_likelihood("gaussian_fixed", event_dims=1, scale=lg.s),
        hidden_dims=[[], []],
        activation="identity",
    ).double()
    _head(vae.generative[0].head, lg.A, lg.a, torch.full((d1,), lg.s1**2, dtype=torch.float64))
    vae.decoder.net[0].weight.copy_(lg.W)
    vae.decoder.net[0].bias.copy_(lg.b)
    mean, cov = lg.joint()
    i2, i1, ix = torch.arange(d2), torch.arange(d2, d2 + d1), torch.arange(d2 + d1, d2 + d1 + dx)
    if cls is LadderVAE:  # q(z2 | x) = p(z2 | x); q(z1 | z2, x) merges p(z1 | z2) with p(x | z1) as a Gaussian in z1
        gain, offset, c = _conditional(mean, cov, i2, ix)
        _head(vae.encoder[1].head, gain, offset, c.diagonal() * inflate**2)
        wtw = lg.W.T @ lg.W
        proj = torch.linalg.solve(wtw, lg.W.T)  # least squares: (W^T W)^-1 W^T
        _head(vae.encoder[0].head, proj, -proj @ lg.b, lg.s**2 / wtw.diagonal() * inflate**2)
    else:  # q(z1 | x) = p(z1 | x); q(z2 | z1) = p(z2 | z1) = p(z2 | z1, x)
        gain, offset, c = _conditional(mean, cov, i1, ix)
        _head(vae.encoder[0].head, gain, offset, c.diagonal() * inflate**2)
        gain, offset, c = _conditional(mean, cov, i2, i1)
        _head(vae.encoder[1].head, gain, offset, c.diagonal() * inflate**2)
    return vae


@pytest.mark.parametrize("cls", [HierarchicalVAE, LadderVAE])
def test_with_the_exact_posterior_as_guide_every_weight_is_log_px(cls):
    lg, x, exact = _instance(diagonal=True)
    vae = _linear_gaussian_vae(cls, lg)
    # the model is the closed-form one: same log p(x, z) at the closed form's own posterior draws
    est = importance_estimate(vae.model, vae.guide, x, num_samples=8, seed=0)
    assert torch.allclose(est.log_px, exact, atol=1e-8)
    assert torch.allclose(est.elbo, exact, atol=1e-8)  # zero-variance weights: ELBO = IW = log p(x)
    traced = importance_estimate(lambda x: vae.model(x), lambda x: vae.guide(x), x, num_samples=8, seed=0)
    assert torch.allclose(traced.log_px, exact, atol=1e-8)
    # a wrong noise scale in the model is seen at once
    with torch.no_grad():
        vae.generative[0].head.bias[lg.z1_dim :] += 0.2
    off = importance_estimate(vae.model, vae.guide, x, num_samples=8, seed=0).log_px
    assert (off - exact).abs().mean() > 0.05


def pooled_z(estimate, se, exact) -> float:
    return float((estimate - exact).mean() / (torch.sqrt((se**2).sum()) / len(se)))


@pytest.mark.parametrize("cls", [HierarchicalVAE, LadderVAE])
def test_iw_meets_the_exact_log_px_of_a_general_instance(cls, one_thread):
    lg, x, exact = _instance(diagonal=False)
    vae = _linear_gaussian_vae(cls, lg, inflate=1.6)  # diagonal and overdispersed: not the posterior
    est = importance_estimate(vae.model, vae.guide, x, num_samples=4000, seed=0)
    gap = (exact - est.elbo).mean()
    assert gap > 0.05  # the guide is visibly not the posterior ...
    assert abs(pooled_z(est.log_px, est.log_px_stderr, exact)) < 3  # ... and IW still finds log p(x)
    assert (est.log_px - exact).mean().abs() < 0.1 * gap
    # AIS on the same model (the fast path's log prior and tempered likelihood) meets it too
    ais = ais_log_px(vae.model, None, x, num_steps=100, num_chains=8, seed=0)
    se = torch.as_tensor(ais["log_px_stderr"].values)
    assert abs(pooled_z(torch.as_tensor(ais["log_px"].values), se, exact)) < 3


def test_active_units_of_a_lower_layer_average_over_the_draws_above_it():
    import pyro
    from pyro import distributions as dist

    from ppl_vae.analysis.diagnostics import collapse_diagnostics

    def model(x, y=None):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z1, 1.0).to_event(1), obs=x)

    def guide(x, y=None, informative=False):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x if informative else torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2, 0.1).to_event(1))

    x = torch.randn(200, 2)
    state = torch.get_rng_state()
    # E_q[z1 | x] = 0 for every x: no unit is active, though one draw of z2 would make z1 look active
    ds = collapse_diagnostics(model, guide, x)
    assert ds.attrs["num_active_z1"] == 0 and ds.attrs["num_active_z2"] == 0
    assert torch.equal(torch.get_rng_state(), state)
    ds = collapse_diagnostics(model, lambda x, y=None: guide(x, informative=True), x)
    assert ds.attrs["num_active_z1"] == 2 and ds.attrs["num_active_z2"] == 2
