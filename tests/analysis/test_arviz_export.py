"""The ArviZ-facing layer (ppl_vae.arviz_compat and ppl_vae.analysis.results), torch-free, so that it runs under both
ArviZ 0.x (the main venv, Python 3.11) and ArviZ 1.x (``make test-arviz1``: a Python >= 3.12 venv
without torch, since ArviZ 1.x needs Python >= 3.12 and this project's torch build is for 3.11)."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_vae import arviz_compat
from ppl_vae.analysis import results


def numpy_draws(num_draws=6, num_datapoints=4, latent=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: {
            "latents": {
                "z": rng.normal(size=(num_draws, num_datapoints, latent)),
                "z2": rng.normal(size=(num_draws, num_datapoints, 2)),
            },
            "log_likelihood": rng.normal(size=(num_draws, num_datapoints)),
            "log_weight": rng.normal(size=(num_draws, num_datapoints)),
        }
        for name in ("amortized", "meanfield")
    }


def test_groups_dims_attrs_and_round_trip(tmp_path):
    draws = numpy_draws()
    idata = results.to_inference_data(draws, datapoint=[10, 11, 12, 13], attrs={"model": "m"})
    assert set(results.inference_data_groups(idata)) == {"posterior", "log_likelihood", "sample_stats"}
    assert idata.posterior["z_meanfield"].dims == ("chain", "draw", "datapoint", "latent")
    assert idata.posterior["z_meanfield"].shape == (1, 6, 4, 3)
    assert idata.log_likelihood["x_amortized"].dims == ("chain", "draw", "datapoint")
    np.testing.assert_array_equal(
        idata.sample_stats["log_weight_amortized"].values[0], draws["amortized"]["log_weight"]
    )
    assert idata.attrs["guides"] == "amortized, meanfield" and idata.attrs["model"] == "m"
    back = results.load_inference_data(results.save_inference_data(idata, tmp_path / "idata.nc"))
    np.testing.assert_array_equal(back.posterior["z_amortized"].values, draws["amortized"]["latents"]["z"][None])
    assert back.posterior["z2_meanfield"].dims == ("chain", "draw", "datapoint", "z2_latent")  # one variable per site
    assert back.posterior.datapoint.values.tolist() == [10, 11, 12, 13]
    assert results.inference_data_groups(back) == ["posterior", "log_likelihood", "sample_stats"]  # each once
    assert back.attrs["guides"] == "amortized, meanfield"
    with pytest.raises(ValueError, match="draws is empty"):
        results.to_inference_data({})


def test_save_draws_without_arviz_reads_back_as_to_inference_data(tmp_path):
    """compare writes its draws with save_draws, which builds the file without ArviZ; ArviZ (0.x here,
    1.x under make test-arviz1) reads it back as the groups to_inference_data builds."""
    draws = numpy_draws(seed=3)
    ref = results.to_inference_data(draws, datapoint=[5, 7, 9, 11], attrs={"run_dir": "r"})
    back = results.load_inference_data(
        results.save_draws(draws, tmp_path / "d.nc", datapoint=[5, 7, 9, 11], attrs={"run_dir": "r"})
    )
    assert results.inference_data_groups(back) == results.inference_data_groups(ref)
    for group in results.inference_data_groups(ref):
        a, b = ref[group], back[group]
        assert sorted(a.data_vars) == sorted(b.data_vars) and a.sizes == b.sizes, group
        for var in a.data_vars:
            assert a[var].dims == b[var].dims, var
            np.testing.assert_array_equal(a[var].values, b[var].values)
        for coord in a.coords:
            np.testing.assert_array_equal(a[coord].values, b[coord].values)
    assert back.attrs["guides"] == "amortized, meanfield" and back.attrs["run_dir"] == "r"
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"
    with pytest.raises(ValueError, match="draws is empty"):
        results.save_draws({}, tmp_path / "e.nc")
    assert not (tmp_path / "e.nc").exists()


@pytest.mark.parametrize("k", [0.3, 0.9])
def test_psis_khat_recovers_a_planted_pareto_tail(k):
    """w = U^(-k) has a generalized Pareto tail of shape k. Each k-hat from K = 2000 draws has a
    standard error of about (1 + k) / sqrt(134 tail draws) < 0.17; over 40 datapoints the mean's
    se is < 0.03, so 0.1 is over 3 se and a k-hat off by the sign of the weights fails it."""
    rng = np.random.default_rng(1)
    log_weights = -k * np.log(rng.uniform(size=(2000, 40)))
    khat = arviz_compat.psis_khat(log_weights)
    assert khat.shape == (40,) and np.isfinite(khat).all()
    assert abs(khat.mean() - k) < 0.1, khat.mean()


def test_psis_khat_flat_and_too_few_draws():
    assert np.isneginf(arviz_compat.psis_khat(np.full((100, 3), -2.0) + 1e-6 * np.arange(100)[:, None])).all()
    assert np.isnan(arviz_compat.psis_khat(np.random.default_rng(0).normal(size=(10, 3)))).all()
    with pytest.raises(ValueError, match="num_samples, num_datapoints"):
        arviz_compat.psis_khat(np.zeros(5))
