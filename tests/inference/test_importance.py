"""Importance-weighted log p(x) against closed forms (linear-Gaussian VAE, a hand-written pair)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.inference.importance import (
    _WeightAccumulator,
    concat_estimates,
    elbo_per_datapoint,
    importance_estimate,
    importance_samples,
    iw_log_px,
)
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from tests.conftest import requires_cuda


@pytest.fixture
def lg():
    torch.manual_seed(3)
    model = LinearGaussianVAE(x_dim=5, latent_dim=3, sigma=0.5)
    x = torch.randn(12, 5)
    with torch.no_grad():
        exact = model.exact_log_marginal(x)
    return model, x, exact


@pytest.mark.parametrize("num_samples,particle_batch_size", [(1, None), (7, 3), (100, 32)])
def test_exact_posterior_guide_gives_log_marginal_for_every_k(lg, num_samples, particle_batch_size):
    model, x, exact = lg
    est = importance_estimate(
        model.model,
        model.exact_posterior_guide,
        x,
        num_samples=num_samples,
        batch_size=5,
        particle_batch_size=particle_batch_size,
    )
    assert torch.allclose(est.log_px, exact, atol=1e-4)
    assert torch.allclose(est.elbo, exact, atol=1e-4)  # every weight equals p(x)
    assert torch.allclose(est.ess, torch.full_like(est.ess, float(num_samples)), rtol=1e-4)


def test_iw_rises_toward_exact_with_k_and_bounds_the_elbo(lg):
    model, x, exact = lg
    repeats = 6
    bias, elbo_bias = {}, {}
    for k in (1, 10, 100, 1000):
        runs = [
            importance_estimate(model.model, model.guide, x, num_samples=k, particle_batch_size=250)
            for _ in range(repeats)
        ]
        bias[k] = torch.stack([r.log_px - exact for r in runs]).mean().item()
        elbo_bias[k] = torch.stack([r.elbo - exact for r in runs]).mean().item()
    closed_elbo_gap = (model.elbo_closed_form(x) - exact).mean().item()
    assert closed_elbo_gap < -1.0  # the untrained guide is poor, so K matters
    # log p̂_K is nondecreasing in K on average (Burda et al. 2015, theorem 1) and tends to log p(x).
    assert bias[1] < bias[10] < bias[100] + 0.05 < bias[1000] + 0.1
    assert abs(bias[1000]) < 0.1
    for k in bias:
        assert elbo_bias[k] <= bias[k] + 1e-6
        assert abs(elbo_bias[k] - closed_elbo_gap) < 4 * math.sqrt(10.0 / (k * repeats)) + 0.05


def test_elbo_from_the_estimate_matches_the_closed_form(lg):
    model, x, _ = lg
    est = importance_estimate(model.model, model.guide, x, num_samples=4000, particle_batch_size=1000)
    with torch.no_grad():
        exact_elbo = model.elbo_closed_form(x)
    assert torch.all((est.elbo - exact_elbo).abs() < 5 * est.elbo_stderr + 1e-3)


def test_standard_error_predicts_the_spread_of_repeated_estimates(lg):
    model, x, _ = lg
    repeats = 200
    est = importance_estimate(model.model, model.guide, x[:3].repeat(repeats, 1), num_samples=200, batch_size=600)
    estimates = est.log_px.reshape(repeats, 3)  # independent repetitions of the same 3 points
    spread = estimates.std(0)
    predicted = est.log_px_stderr.reshape(repeats, 3).median(0).values
    ratio = spread / predicted
    assert torch.all((ratio > 0.5) & (ratio < 2.0)), ratio


def test_accumulator_over_chunks_matches_direct_formulas():
    torch.manual_seed(0)
    log_w = torch.randn(50, 4, dtype=torch.float64) * 3 + torch.tensor([-1000.0, 0.0, 1000.0, 5.0], dtype=torch.float64)
    acc = _WeightAccumulator(4, torch.device("cpu"))
    for chunk in log_w.split(7):
        acc.add(chunk)
    log_p, log_p_se, elbo, elbo_se, ess = acc.result()
    assert torch.allclose(log_p, torch.logsumexp(log_w, 0) - math.log(50))
    w = (log_w - log_w.max(0).values).exp()
    assert torch.allclose(ess, w.sum(0) ** 2 / (w**2).sum(0))
    assert torch.allclose(elbo, log_w.mean(0))
    assert torch.allclose(elbo_se, log_w.std(0) / math.sqrt(50))
    wn = w / w.mean(0)
    assert torch.allclose(log_p_se, wn.std(0) / math.sqrt(50))  # delta method: sd(w) / (sqrt(K) mean(w))


def shifted_model(x, y):
    """A hand-written pair: z ~ N(0, 1), x ~ N(z + y, 1) per datapoint, so p(x) = N(x; y, 2)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z + y, 1.0), obs=x)


def exact_shifted_guide(x, y):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((x - y) / 2, math.sqrt(0.5)))


def wide_shifted_guide(x, y):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros_like(x), 2.0))


def test_hand_written_pair_with_labels_sliced_per_batch():
    x = torch.linspace(-2, 3, 9)
    y = torch.arange(9.0) - 4
    exact = dist.Normal(y, math.sqrt(2.0)).log_prob(x)
    est = importance_estimate(shifted_model, exact_shifted_guide, x, num_samples=3, batch_size=4, y=y)
    assert torch.allclose(est.log_px, exact, atol=1e-5)
    est = importance_estimate(
        shifted_model, wide_shifted_guide, x, num_samples=3000, batch_size=4, particle_batch_size=500, y=y
    )
    assert torch.all((est.log_px - exact).abs() < 5 * est.log_px_stderr + 0.02)
    assert torch.allclose(
        iw_log_px(shifted_model, exact_shifted_guide, x, num_samples=2, batch_size=2, y=y), exact, atol=1e-5
    )
    assert elbo_per_datapoint(shifted_model, exact_shifted_guide, x, y=y).shape == (9,)


def test_importance_samples_split_log_weight_into_likelihood_and_the_rest():
    x = torch.tensor([0.5, -1.0])
    y = torch.zeros(2)
    s = importance_samples(shifted_model, wide_shifted_guide, x, num_samples=6, y=y)
    z = s["latents"]["z"]
    assert z.shape == (6, 2)
    expected_lik = dist.Normal(z, 1.0).log_prob(x)
    expected_w = expected_lik + dist.Normal(0.0, 1.0).log_prob(z) - dist.Normal(0.0, 2.0).log_prob(z)
    assert torch.allclose(s["log_likelihood"], expected_lik, atol=1e-5)
    assert torch.allclose(s["log_weight"], expected_w, atol=1e-5)


def test_estimate_to_dataset_and_concat(lg):
    model, x, _ = lg
    a = importance_estimate(model.model, model.guide, x[:4], num_samples=10)
    b = importance_estimate(model.model, model.guide, x[4:], num_samples=10)
    both = concat_estimates([a, b])
    ds = both.to_dataset(range(100, 112))
    assert ds.sizes["datapoint"] == 12 and int(ds.datapoint[0]) == 100
    assert ds.attrs["num_samples"] == 10
    assert float(ds["log_px"][5]) == pytest.approx(float(b.log_px[1]))
    with pytest.raises(ValueError, match="same num_samples"):
        concat_estimates([a, importance_estimate(model.model, model.guide, x[:2], num_samples=3)])


@pytest.mark.parametrize("name", ["num_samples", "batch_size", "particle_batch_size"])
def test_bad_sizes_are_value_errors(lg, name):
    model, x, _ = lg
    with pytest.raises(ValueError, match=name):
        importance_estimate(model.model, model.guide, x, **{"num_samples": 5, name: 0})


@requires_cuda
def test_exact_guide_on_cuda(lg):
    model, x, exact = lg
    model = model.cuda()
    est = importance_estimate(
        model.model, model.exact_posterior_guide, x.cuda(), num_samples=50, particle_batch_size=16
    )
    assert est.log_px.is_cuda
    assert torch.allclose(est.log_px.cpu(), exact, atol=1e-3)


def test_psis_khat_small_for_exact_posterior_guide_and_large_for_a_mis_scaled_guide(lg):
    model, x, _ = lg
    exact_guide = importance_estimate(model.model, model.exact_posterior_guide, x, num_samples=500)
    assert exact_guide.khat is not None and exact_guide.khat.shape == (12,)
    assert bool((exact_guide.khat < 0.5).all())  # constant weights up to rounding: no heavy tail
    assert bool(torch.isinf(exact_guide.khat).all())  # reported as -inf, not as a fit to rounding noise

    def narrow_guide(x_, **kwargs):  # centred on p(z|x) but 10x too narrow: weights p/q explode in its tails
        loc, cov = model.exact_posterior(x_)
        with pyro.plate("data", x_.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.1 * cov.diagonal().sqrt()).to_event(1))

    narrow = importance_estimate(model.model, narrow_guide, x, num_samples=1000)
    # w = p/q has a Pareto tail with k = 1 - (0.1)^2 = 0.99 here; k-hat scatters around it
    assert float(narrow.khat.mean()) > 0.8 and bool((narrow.khat > 0.5).all()), narrow.khat
    ds = narrow.to_dataset()
    assert "khat" in ds and all(ds[v].attrs["bound"] in ("lower bound", "upper bound", "neither") for v in ds.data_vars)
    assert ds["log_px"].attrs["bound"] == "lower bound" and ds.attrs["estimator"] == "iw"


def test_psis_khat_needs_enough_samples_and_can_be_switched_off(lg):
    model, x, _ = lg
    assert torch.isnan(importance_estimate(model.model, model.guide, x, num_samples=10).khat).all()
    assert importance_estimate(model.model, model.guide, x, num_samples=50, tail_diagnostic=False).khat is None


def test_importance_estimate_scores_the_model_in_eval_mode_and_restores_its_mode():
    """A model left in training mode (dropout active) gets the test-time numbers, and stays in training mode."""
    from torch import nn

    from ppl_vae.models import build_vae

    class DroppingEncoder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.drop = inner, nn.Dropout(0.5)

        def forward(self, x):
            return self.inner(self.drop(x))

    vae = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=2, hidden_dim=8)
    vae.encoder = DroppingEncoder(vae.encoder)
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.4))
    scores = {}
    for mode in (True, False):
        vae.train(mode)
        torch.manual_seed(1)
        scores[mode] = importance_estimate(vae.model, vae.guide, x, num_samples=50).log_px
        assert vae.training is mode and vae.encoder.drop.training is mode
    torch.testing.assert_close(scores[True], scores[False])


@pytest.mark.parametrize("name, options", [("bernoulli_mlp", {}), ("two_layer", {"latent_dims": [4, 3]})])
def test_mean_field_q_star_is_scored_without_traces_as_with_them(name, options, monkeypatch, one_thread):
    """IW with mean-field q* as proposal (L[q*] in every fit_mean_field) under a model with the
    fast-path protocol: q* draws its own latents (MeanFieldGuide.draw_latents, one site or the
    flat vector of several) and the model scores them through its blocked log-likelihood. The
    same draws as Pyro's traces for the same seed, the same estimates to float32 rounding."""
    import ppl_vae.inference.latents as latents
    from ppl_vae.inference.meanfield import MeanFieldGuide
    from ppl_vae.models import build_vae

    torch.manual_seed(0)
    vae = build_vae(name, (1, 10, 10), hidden_dim=16, model_options=options).eval()
    x = (torch.rand(11, 1, 10, 10) < 0.3).float()
    layout = latents.model_layout(vae.model, x)
    loc = torch.randn(11, layout.size)
    mf = MeanFieldGuide(loc, torch.full_like(loc, -0.7), layout=layout)
    traced_model = lambda x_, **kw: vae.model(x_, **kw)  # noqa: E731  (no fast path: Pyro's traces)
    call = dict(num_samples=60, batch_size=4, particle_batch_size=25, seed=5)
    traced = importance_estimate(traced_model, mf, x, **call)

    def no_trace(*args, **kwargs):
        raise AssertionError("q* was traced")

    monkeypatch.setattr(latents, "trace_pair", no_trace)
    fast = importance_estimate(vae.model, mf, x, **call)
    for key in ("log_px", "elbo", "log_px_stderr", "elbo_stderr"):
        torch.testing.assert_close(getattr(fast, key), getattr(traced, key), rtol=2e-6, atol=1e-4, msg=key)
    torch.testing.assert_close(fast.ess, traced.ess, rtol=1e-4, atol=0)
