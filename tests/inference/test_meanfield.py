"""Per-datapoint mean-field VI against the linear-Gaussian closed form (Bishop 2006, 10.1.2)."""

from __future__ import annotations

import re

import pyro
import pytest
import torch
from pyro import distributions as dist
from torch.distributions.transforms import AffineTransform

from ppl_vae.inference.meanfield import MEAN_FIELD_INITS, fit_mean_field, guide_moments, matched_normals, prior_moments
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.zoo import build_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # small loops: one thread is several times faster


@pytest.fixture
def lg():
    torch.manual_seed(5)
    model = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.5)
    return model, torch.randn(6, 5)


@pytest.mark.slow
@pytest.mark.parametrize("init, fast", [("encoder", True), ("prior", False)])
def test_default_settings_reach_the_best_diagonal_gaussian(init, fast):
    """Bishop (2006, 10.1.2): for a Gaussian posterior N(m, S) the KL(q||p)-optimal diagonal
    Gaussian has mean m and precisions diag(S^-1). With default settings every q* must be
    within 0.005 nat of that optimum's ELBO (closed form), and say it converged."""
    torch.manual_seed(5)
    model = LinearGaussianVAE(x_dim=5, latent_dim=3, sigma=0.5)
    x = torch.randn(40, 5)
    before = [p.detach().clone() for p in model.parameters()]
    fn = model.model if fast else (lambda x_, **kw: model.model(x_, **kw))  # a lambda goes through traces
    result = fit_mean_field(fn, model.guide, x, init=init, progress=False)
    with torch.no_grad():
        loc, scale = model.optimal_mean_field(x)
        post_loc, _ = model.exact_posterior(x)
        best_elbo = model.elbo_closed_form(x, loc, scale)
        reached = model.elbo_closed_form(x, result.loc, result.scale)
        amortized_elbo = model.elbo_closed_form(x)
    assert torch.allclose(loc, post_loc)
    assert bool(result.converged.all()) and result.converged.shape == (40,)
    assert torch.all(best_elbo - reached < 0.005) and torch.all(reached <= best_elbo + 1e-4)
    assert (result.loc - loc).abs().max() < 0.01 and (result.scale - scale).abs().max() < 0.01
    # the fresh Monte Carlo L[q*] agrees with the closed form, and beats the amortized q
    assert torch.all((result.elbo - best_elbo).abs() < 5 * result.estimate.elbo_stderr + 1e-3)
    assert torch.all(reached > amortized_elbo)
    # the model is frozen: parameters unchanged and no gradients left on them
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    assert result.to_dataset()["converged"].dtype == bool


def test_without_the_polish_noisy_adam_is_reported_not_converged(lg):
    model, x = lg
    result = fit_mean_field(model.model, model.guide, x, polish=False, max_steps=100, progress=False)
    assert result.converged.shape == (6,) and not bool(result.converged.any())
    assert result.grad_norm is None
    with torch.no_grad():
        shortfall = model.elbo_closed_form(x, *model.optimal_mean_field(x)) - model.elbo_closed_form(
            x, result.loc, result.scale
        )
    assert float(shortfall.max()) > 0.005  # what the polish is for


def test_matched_normals_have_exact_moments():
    eps = matched_normals(64, 3, 4, dtype=torch.float64)
    assert eps.shape == (64, 3, 4)
    torch.testing.assert_close(eps.mean(0), torch.zeros(3, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    second = torch.einsum("sbi,sbj->bij", eps, eps) / 64
    torch.testing.assert_close(second, torch.eye(4, dtype=torch.float64).expand(3, 4, 4), atol=1e-10, rtol=0)
    few = matched_normals(4, 2, 5)  # fewer draws than dimensions: unit mean square per coordinate
    torch.testing.assert_close(few.pow(2).mean(0), torch.ones(2, 5), atol=1e-5, rtol=0)


def test_encoder_init_starts_at_the_guide_and_batches_are_independent(lg):
    model, x = lg
    one_step = fit_mean_field(
        model.model,
        model.guide,
        x,
        init="encoder",
        lr=1e-9,
        max_steps=1,
        polish=False,
        batch_size=4,
        num_eval_samples=5,
        progress=False,
    )
    loc, scale = model.encoder(x)
    assert torch.allclose(one_step.loc, loc.detach(), atol=1e-6)
    assert torch.allclose(one_step.scale, scale.detach(), atol=1e-6)
    assert one_step.trace.shape == (2, 1)  # two batches: 4 + 2 datapoints
    assert one_step.to_dataset().sizes == {"datapoint": 6, "latent": 2}


def test_moments_of_prior_and_full_covariance_guide(lg):
    model, x = lg
    loc, scale = prior_moments(model.model, x)
    assert torch.equal(loc, torch.zeros(6, 2)) and torch.equal(scale, torch.ones(6, 2))
    loc, scale = guide_moments(model.exact_posterior_guide, x)
    post_loc, cov = model.exact_posterior(x)
    assert torch.allclose(loc, post_loc.detach(), atol=1e-6)
    assert torch.allclose(scale, cov.diagonal().sqrt().expand(6, 2).detach(), atol=1e-6)


def test_moments_of_a_guide_without_closed_form_moments_are_sampled(lg):
    model, x = lg
    loc, scale = torch.randn(6, 2), torch.rand(6, 2) + 0.5

    def flow_guide(x, *args, **kwargs):  # a TransformedDistribution: torch gives it no mean
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.TransformedDistribution(base, [AffineTransform(loc, scale, event_dim=1)]))

    got_loc, got_scale = guide_moments(flow_guide, x)
    assert got_loc.shape == (6, 2)
    # 1024 draws: the mean is within 4 standard errors, the sd within 15 %
    assert torch.all((got_loc - loc).abs() < 4 * scale / 32) and torch.allclose(got_scale, scale, rtol=0.15)


def test_bad_arguments(lg):
    model, x = lg
    with pytest.raises(ValueError, match="needs the amortized guide"):
        fit_mean_field(model.model, None, x, init="encoder", progress=False)
    with pytest.raises(ValueError, match="valid mean-field inits: encoder, prior"):
        fit_mean_field(model.model, None, x, init="nowhere", progress=False)
    with pytest.raises(ValueError, match="lr must be"):
        fit_mean_field(model.model, None, x, init="prior", lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        fit_mean_field(model.model, None, x, init="prior", max_steps=0, progress=False)
    with pytest.raises(ValueError, match="gtol must be"):
        fit_mean_field(model.model, None, x, init="prior", gtol=0.0, progress=False)
    with pytest.raises(ValueError, match="polish_particles"):
        fit_mean_field(model.model, None, x, init="prior", polish_particles=0, progress=False)
    assert set(MEAN_FIELD_INITS) == {"encoder", "prior"}


def test_the_polish_in_chunks_of_datapoints_reaches_the_same_optimum(monkeypatch):
    """The polish scores at most POLISH_CHUNK_VALUES values of x per forward and backward pass (fewer fresh
    pages from the allocator); each datapoint's objective is its own, so a polish in chunks of
    2 datapoints must reach the closed-form optimum (Bishop 2006, 10.1.2) as the whole batch
    does, and every pass must hold at most 2 datapoints."""
    import ppl_vae.inference.meanfield as mf

    torch.manual_seed(5)
    model = LinearGaussianVAE(x_dim=5, latent_dim=3, sigma=0.5)
    x = torch.randn(9, 5)
    widths = []
    real = mf._flat_log_joint

    def spy(model_, xb, z, layout, kw):
        if z.shape[0] == 64:  # the polish's particles (Adam's phase draws 1)
            widths.append(xb.shape[0])
        return real(model_, xb, z, layout, kw)

    monkeypatch.setattr(mf, "_flat_log_joint", spy)
    results = {}
    for draws in (10**9, 2 * 64 * 5):  # x has 5 values: 2 datapoints at 64 particles
        monkeypatch.setattr(mf, "POLISH_CHUNK_VALUES", draws)
        widths.clear()
        results[draws] = fit_mean_field(model.model, model.guide, x, max_steps=5, progress=False, seed=0)
        assert widths and max(widths) == (x.shape[0] if draws == 10**9 else 2), widths
    whole, chunked = results[10**9], results[2 * 64 * 5]
    with torch.no_grad():
        loc, scale = model.optimal_mean_field(x)
    for r in (whole, chunked):
        assert bool(r.converged.all())
        assert (r.loc - loc).abs().max() < 0.01 and (r.scale - scale).abs().max() < 0.01
    assert torch.allclose(whole.loc, chunked.loc, atol=1e-4) and torch.allclose(whole.scale, chunked.scale, atol=1e-4)


def test_a_polish_held_above_gtol_by_rounding_stops_and_says_it_converged():
    """gtol = 1e-12 is below what float32 rounding lets the gradient reach: each datapoint's
    L-BFGS reaches the closed-form optimum (Bishop 2006, 10.1.2), then its objective stops
    falling beyond rounding, and after POLISH_STALL such iterations it stops, long before
    polish_steps, and counts as converged; the gradient it stopped at is reported."""
    import ppl_vae.inference.meanfield as mf

    torch.manual_seed(5)
    model = LinearGaussianVAE(x_dim=5, latent_dim=3, sigma=0.5)
    x = torch.randn(6, 5)
    options = dict(max_steps=50, progress=False, seed=0)
    result = fit_mean_field(model.model, model.guide, x, polish_steps=500, gtol=1e-12, **options)
    adam_only = fit_mean_field(model.model, model.guide, x, polish=False, **options)  # the same first phase
    polish_iterations = result.num_steps - adam_only.num_steps
    with torch.no_grad():
        loc, scale = model.optimal_mean_field(x)
    assert (result.loc - loc).abs().max() < 0.01 and (result.scale - scale).abs().max() < 0.01
    assert bool(result.converged.all())
    assert bool((result.grad_norm > 1e-12).all())  # not by the gradient rule
    assert bool((polish_iterations >= mf.POLISH_STALL).all()) and int(polish_iterations.max()) < 100, polish_iterations


def test_compare_flags_show_and_pass_fit_mean_fields_own_defaults():
    """The mean-field settings are declared once (ppl_vae.estimator_options): compare's --mf-*
    flags and --init default to fit_mean_field's own defaults, and --init offers exactly the
    registered starts."""
    import inspect

    from ppl_vae.cli.compare import compare

    signature = inspect.signature(fit_mean_field).parameters
    flags = {p.name: p for p in compare.params}
    pairs = {"init": "init", "mf_lr": "lr", "mf_tol": "tol", "mf_polish_steps": "polish_steps", "mf_gtol": "gtol"}
    for flag, arg in pairs.items():
        assert flags[flag].default == signature[arg].default, (flag, flags[flag].default, signature[arg].default)
    assert flags["mf_steps"].default is None and signature["max_steps"].default is None  # default_max_steps decides
    assert tuple(flags["init"].type.choices) == tuple(MEAN_FIELD_INITS.names())


def test_polish_chunks_are_bounded_by_draws_and_by_values_of_x():
    """At most 2,048 draws (hidden layers can be wider than x) and 2,048 MNIST images' worth of
    values of x per pass, and at least one datapoint."""
    from ppl_vae.inference.meanfield import POLISH_CHUNK_DRAWS, POLISH_CHUNK_VALUES, polish_chunk_rows

    assert (POLISH_CHUNK_DRAWS, POLISH_CHUNK_VALUES) == (2048, 2048 * 784)
    assert polish_chunk_rows(64, 784) == 32  # MNIST: both bounds
    assert polish_chunk_rows(64, 64) == 32  # the 8x8 digits: the draws bound
    assert polish_chunk_rows(64, 64 * 64) == 6  # dSprites' 64x64: the values bound
    assert polish_chunk_rows(4096, 784) == 1


def test_the_declared_mean_field_settings_are_the_fits_arguments_and_each_is_checked():
    """MEAN_FIELD_OPTIONS, which every caller's options dict is checked against, names exactly
    fit_mean_field's keyword-only arguments but progress, and the fit's own messages are kept."""
    import inspect

    from ppl_vae.inference.meanfield import MEAN_FIELD_OPTIONS, check_mean_field_options

    params = inspect.signature(fit_mean_field).parameters.values()
    assert list(MEAN_FIELD_OPTIONS) == [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "progress"]
    check_mean_field_options({"max_steps": None, "seed": None, "polish": False, "tol": 0.0, "init": "prior"})
    for options, message in [
        ({"max_steps": 2.5}, "'max_steps' must be a positive integer, got 2.5"),
        ({"num_lr_decays": -1}, "'num_lr_decays' must be an integer >= 0, got -1"),
        ({"tol": float("nan")}, "'tol' must be >= 0, got nan"),
        ({"gtol": "1e-3"}, "'gtol' must be a positive number, got '1e-3'"),
        ({"elbo": "exact"}, "unknown mean-field elbo 'exact'"),
        ({"progress": True}, "unknown 'progress'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_mean_field_options(options)
    vae = build_vae("bernoulli_mlp", (1, 2, 2), latent_dim=2, hidden_dim=4)
    with pytest.raises(ValueError, match=r"^max_steps must be a positive integer, got 0$"):
        fit_mean_field(vae.model, vae.guide, torch.rand(3, 1, 2, 2).round(), max_steps=0)
