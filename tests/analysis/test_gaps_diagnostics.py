"""Gap decomposition, collapse diagnostics and ArviZ results against closed forms and planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae.analysis import results
from ppl_vae.analysis.diagnostics import active_units, collapse_diagnostics, kl_per_dimension
from ppl_vae.analysis.gaps import decompose, gap_decomposition, gap_table
from ppl_vae.inference.meanfield import MeanFieldGuide
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


@pytest.fixture
def lg():
    torch.manual_seed(7)
    W = torch.randn(5, 2)
    W[:, 1] = 0.0  # planted collapse: z_1 does not affect x, so p(z_1|x) is the prior
    model = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.5, W=W)
    return model, torch.randn(8, 5)


def test_gaps_are_nonnegative_and_match_closed_forms(lg, tmp_path):
    model, x = lg
    gaps = gap_decomposition(model.model, model.guide, x, num_samples=1000, progress=False,
                             mean_field_options=dict(init="prior", lr=0.3, max_steps=600, num_particles=64,
                                                     tol=1e-3, window=20))
    with torch.no_grad():
        exact = model.exact_log_marginal(x).numpy()
        best_mf = model.elbo_closed_form(x, *model.optimal_mean_field(x)).numpy()
        amortized = model.elbo_closed_form(x).numpy()
    approx, amort = gaps["approximation_gap"].values, gaps["amortization_gap"].values
    assert np.all(approx > -4 * gaps["approximation_gap_stderr"].values - 0.02)
    assert np.all(amort > -4 * gaps["amortization_gap_stderr"].values - 0.02)
    np.testing.assert_allclose(approx, exact - best_mf, atol=0.1)
    # L[q] of this untrained guide is a noisy Monte Carlo mean: compare within its standard error
    assert np.all(np.abs(amort - (best_mf - amortized)) < 5 * gaps["amortization_gap_stderr"].values + 0.05)
    table = gap_table(gaps)
    inference = table.loc["inference_gap"]
    assert abs(inference["mean"] - float(np.mean(exact - amortized))) < 5 * inference["mc_se"] + 0.05
    # netCDF round trip, and decompose() recomputes the same gaps from the stored estimates
    results.save_netcdf(gaps, tmp_path / "gaps.nc")
    back = results.load_netcdf(tmp_path / "gaps.nc")
    np.testing.assert_allclose(decompose(back)["amortization_gap"], gaps["amortization_gap"])
    assert back["estimate"].dims == ("datapoint", "estimator")


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
    draws = results.guide_draws(model.model, {"amortized": model.guide, "exact": model.exact_posterior_guide},
                                x, num_draws=7)
    idata = results.to_inference_data(draws, datapoint=np.arange(10, 18))
    assert set(idata.groups()) == {"posterior", "log_likelihood", "sample_stats"}
    assert idata.posterior["z_exact"].dims == ("chain", "draw", "datapoint", "latent")
    # with the exact posterior as guide every log-weight equals log p(x)
    np.testing.assert_allclose(idata.sample_stats["log_weight_exact"].values[0],
                               np.broadcast_to(model.exact_log_marginal(x).detach().numpy(), (7, 8)), atol=1e-4)
    path = results.save_inference_data(idata, tmp_path / "idata.nc")
    back = results.load_inference_data(path)
    np.testing.assert_array_equal(back.posterior["z_amortized"].values, idata.posterior["z_amortized"].values)
    assert back.posterior.datapoint.values.tolist() == list(range(10, 18))
