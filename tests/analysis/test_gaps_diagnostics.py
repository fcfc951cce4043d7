"""Gap decomposition, collapse diagnostics and ArviZ results against closed forms and planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae.analysis import results
from ppl_vae.analysis.diagnostics import active_units, collapse_diagnostics, kl_per_dimension
from ppl_vae.analysis.gaps import BOUNDS, ESTIMATORS, gap_decomposition, gap_table, mixture_estimates
from ppl_vae.inference.meanfield import MeanFieldGuide
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

pytestmark = pytest.mark.usefixtures("one_thread")  # small loops: one thread is several times faster


@pytest.fixture
def lg():
    torch.manual_seed(7)
    W = torch.randn(5, 2)
    W[:, 1] = 0.0  # planted collapse: z_1 does not affect x, so p(z_1|x) is the prior
    model = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.5, W=W)
    return model, torch.randn(8, 5)


def test_gaps_are_nonnegative_and_match_closed_forms(lg, tmp_path):
    model, x = lg
    gaps = gap_decomposition(
        model.model, model.guide, x, num_samples=500, progress=False, mean_field_options=dict(init="prior")
    )
    with torch.no_grad():
        exact = model.exact_log_marginal(x).numpy()
        best_mf = model.elbo_closed_form(x, *model.optimal_mean_field(x)).numpy()
        amortized = model.elbo_closed_form(x).numpy()
    assert bool(gaps["meanfield_converged"].all())
    approx, amort = gaps["approximation_gap"].values, gaps["amortization_gap"].values
    approx_se, amort_se = gaps["approximation_gap_stderr"].values, gaps["amortization_gap_stderr"].values
    # each gap within 5 of its own standard errors of the closed form (q* is the best diagonal Gaussian)
    assert np.all(np.abs(approx - (exact - best_mf)) < 5 * approx_se + 1e-3)
    assert np.all(np.abs(amort - (best_mf - amortized)) < 5 * amort_se + 1e-3)
    log_px = gaps["estimate"].sel(estimator="log_px").values
    assert np.all(np.abs(log_px - exact) < 5 * gaps["stderr"].sel(estimator="log_px").values + 1e-3)
    table = gap_table(gaps)
    inference = table.loc["inference_gap"]
    assert abs(inference["mean"] - float(np.mean(exact - amortized))) < 5 * inference["mc_se"] + 1e-3
    assert list(table["bound"]) == [BOUNDS[q] for q in table.index]
    # every estimate says what it is, and survives a netCDF round trip
    results.save_netcdf(gaps, tmp_path / "gaps.nc")
    back = results.load_netcdf(tmp_path / "gaps.nc")
    assert back["estimate"].dims == ("datapoint", "estimator")
    assert list(back["bound"].values) == [BOUNDS[e] for e in ESTIMATORS]
    assert "stochastic lower bound" in back.attrs["estimate_log_px"]
    assert back["amortization_gap"].attrs["bound"] == "neither"
    np.testing.assert_allclose(
        back["amortization_gap"],
        back["estimate"].sel(estimator="elbo_meanfield") - back["estimate"].sel(estimator="elbo_amortized"),
        atol=1e-9,
    )


@pytest.mark.slow
def test_mixture_estimate_is_unbiased_and_its_stderr_is_calibrated():
    """Over repeated runs on the closed-form model: mean of p̂-based log p̂ within MC error of
    exact log p(x), observed spread / stated se in [0.7, 1.4] for log p̂ and each gap; the
    per-datapoint maximum of the two IW estimates (the old log p̂) overshoots."""
    torch.manual_seed(7)
    model = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.5)  # untrained: a poor amortized q
    x = torch.randn(6, 5)
    with torch.no_grad():
        exact = model.exact_log_marginal(x).numpy()
        loc, scale = model.optimal_mean_field(x)
    q_star = MeanFieldGuide(loc.detach(), scale.detach().log())
    runs = [mixture_estimates(model.model, model.guide, q_star, x, num_samples=200) for _ in range(60)]
    stack = lambda name: np.stack([r[name].numpy() for r in runs])  # noqa: E731  (run, datapoint)
    log_px = stack("log_px")
    mc_error = log_px.std(0, ddof=1) / np.sqrt(len(runs))
    assert np.all(np.abs(log_px.mean(0) - exact) < 4 * mc_error + 1e-3)
    for name in ("log_px", "approximation_gap", "amortization_gap", "inference_gap"):
        ratio = np.sqrt(stack(name).var(0, ddof=1).mean()) / stack(f"{name}_stderr").mean()
        assert 0.7 <= ratio <= 1.4, (name, ratio)
    best_of_two = np.maximum(stack("iw_amortized"), stack("iw_meanfield"))
    assert (best_of_two.mean(0) - exact).mean() > 5 * mc_error.mean()


def test_planted_collapsed_unit_has_zero_kl_and_is_inactive(lg):
    model, x = lg
    loc, scale = (t.detach() for t in model.optimal_mean_field(x))
    kl = kl_per_dimension(model.model, MeanFieldGuide(loc, scale.log()), x)
    expected0 = 0.5 * (scale[:, 0] ** 2 + loc[:, 0] ** 2 - 1 - 2 * scale[:, 0].log())
    np.testing.assert_allclose(kl.sel(latent=0).values, expected0.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(kl.sel(latent=1).values, 0.0, atol=1e-6)
    diag = active_units(loc.detach())
    assert diag.attrs["num_active"] == 1 and bool(diag["active"][0]) and not bool(diag["active"][1])
    assert float(diag["activity"][0]) == pytest.approx(float(loc[:, 0].var()), rel=1e-5)
    assert collapse_diagnostics(model.model, model.guide, x).sizes["latent"] == 2


def test_active_units_threshold_on_planted_means():
    means = np.stack([np.linspace(-1, 1, 11), np.linspace(-0.05, 0.05, 11), np.zeros(11)], axis=1)
    ds = active_units(means)
    assert ds["active"].values.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="posterior_mean"):
        active_units(np.zeros(3))


def test_inference_data_groups_and_round_trip(lg, tmp_path):
    model, x = lg
    draws = results.guide_draws(
        model.model, {"amortized": model.guide, "exact": model.exact_posterior_guide}, x, num_draws=7
    )
    idata = results.to_inference_data(draws, datapoint=np.arange(10, 18))
    assert set(results.inference_data_groups(idata)) == {"posterior", "log_likelihood", "sample_stats"}
    assert idata.posterior["z_exact"].dims == ("chain", "draw", "datapoint", "latent")
    # with the exact posterior as guide every log-weight equals log p(x)
    np.testing.assert_allclose(
        idata.sample_stats["log_weight_exact"].values[0],
        np.broadcast_to(model.exact_log_marginal(x).detach().numpy(), (7, 8)),
        atol=1e-4,
    )
    path = results.save_inference_data(idata, tmp_path / "idata.nc")
    back = results.load_inference_data(path)
    np.testing.assert_array_equal(back.posterior["z_amortized"].values, idata.posterior["z_amortized"].values)
    assert back.posterior.datapoint.values.tolist() == list(range(10, 18))


@pytest.mark.parametrize(
    "name, shape, prior", [("bernoulli_mlp", (1, 12, 12), None), ("gaussian_mlp", (20,), "mixture_of_gaussians")]
)
def test_mixture_estimates_fast_path_draws_and_scores_as_the_traced_path(name, shape, prior, monkeypatch):
    """Without Pyro's traces (the pair's protocol; Bernoulli through its fused scorer) the MIS
    estimates take the same draws and give the traced numbers to float32 rounding (issue 28)."""
    import ppl_vae.analysis.gaps as gaps
    from ppl_vae.models import build_vae

    torch.manual_seed(0)
    vae = build_vae(name, shape, latent_dim=4, **({"prior": prior} if prior else {})).eval()
    x = (torch.rand(13, *shape) < 0.3).float() if name == "bernoulli_mlp" else torch.randn(13, *shape)
    loc, scale = vae.encoder(x)
    mf = MeanFieldGuide(loc.detach() + 0.3, (1.5 * scale.detach()).log())
    call = dict(num_samples=90, batch_size=5, particle_batch_size=40, seed=3)
    traced = mixture_estimates(vae.model, vae.guide, mf, x, fast_path=False, **call)

    def no_trace(*args, **kwargs):
        raise AssertionError("the fast path traced")

    monkeypatch.setattr(gaps, "_draws", no_trace)
    fast = mixture_estimates(vae.model, vae.guide, mf, x, **call)
    assert set(fast) == set(traced)
    for key in fast:
        if key.startswith("khat"):  # a tail fit over the largest weights: amplifies rounding
            torch.testing.assert_close(fast[key], traced[key], rtol=0, atol=5e-3)
        elif key.startswith("ess"):  # exp of log-weight differences: 1e-5 nats of rounding move it 1e-5
            torch.testing.assert_close(fast[key], traced[key], rtol=1e-4, atol=0, msg=key)
        else:
            torch.testing.assert_close(fast[key], traced[key], rtol=2e-6, atol=1e-4, msg=key)


def test_mixture_estimates_trace_pairs_without_the_encoder_guide(monkeypatch):
    """A flow guide (IAF) is no encoder Gaussian: log q at q*'s draws needs its trace, so the MIS
    estimates keep Pyro's path for it, and for a subclass that overrides the guide."""
    import ppl_vae.analysis.gaps as gaps
    from ppl_vae.models import build_vae
    from ppl_vae.models.guides import GUIDES

    torch.manual_seed(0)
    base = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=3)
    flow = GUIDES.get("iaf")(base)

    class Tempered(type(base)):
        def guide(self, x, *args, **kwargs):
            return super().guide(x, *args, **kwargs)

    tempered = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=3)
    tempered.__class__ = Tempered
    mf = MeanFieldGuide(torch.zeros(4, 3), torch.zeros(4, 3))
    for vae in (flow, tempered):
        assert gaps._fast_mixture_pair(vae.model, vae.guide, mf, {}) is None
    assert gaps._fast_mixture_pair(base.model, base.guide, mf, {}) is base
    assert gaps._fast_mixture_pair(base.model, base.guide, mf.take(slice(0, 2)), {"y": None}) is base
    assert gaps._fast_mixture_pair(base.model, base.guide, lambda x: None, {}) is None
