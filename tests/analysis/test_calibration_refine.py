"""SBC of the refined posterior (semi-amortized inference) and of the per-datapoint mean-field
q* against a closed form: on a linear-Gaussian VAE whose exact posterior is a diagonal Gaussian,
an encoder biased by one posterior sd and twice too wide fails SBC, and the same encoder refined
per simulated x by K Adam steps on its own ELBO passes it on the same simulations, as does the
mean-field q* fitted to each simulated x (whose family holds the exact posterior).

Thresholds come from the statistics' null distributions, as in test_calibration.py: the refined
q's chi-square p-values are above 1e-3 / (runs * Q) (Bonferroni: a calibrated posterior fails
with probability at most 1e-3), its pooled coverage within 4 se of nominal; the biased encoder
misses by tens of se, so a refinement that did nothing fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppl_vae.analysis.calibration import REFINE_DEFAULTS, dispersion, sbc_ranks, sbc_uniformity
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

SHIFT, WIDEN = 1.0, 2.0
ENCODER_KL = 2 * (math.log(1 / WIDEN) + (WIDEN**2 + SHIFT**2) / 2 - 0.5)
"""KL(encoder || exact posterior) in nats, the same for every x: per dimension N(mu + s sd, (w sd)^2)
against N(mu, sd^2) gives log(1 / w) + (w^2 + s^2) / 2 - 1/2; two dimensions."""

N, L = 400, 99
SIGMA = 0.5


def _biased_vae(shift: float = SHIFT, widen: float = WIDEN) -> LinearGaussianVAE:
    """Decoder W with orthogonal columns (the posterior precision I + W^T W / sigma^2 is diagonal,
    so the exact posterior N(A (x - b), Sigma) lies in the encoder's family); the encoder is that
    posterior with its mean moved up by ``shift`` posterior sds and its scale times ``widen``."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 2))
    vae = LinearGaussianVAE(5, 2, sigma=SIGMA, W=q * torch.tensor([1.5, 0.7]), b=torch.randn(5) * 0.3)
    with torch.no_grad():
        cov = torch.linalg.inv(torch.eye(2) + vae.W.T @ vae.W / SIGMA**2)
        sd = cov.diagonal().sqrt()
        a = cov @ vae.W.T / SIGMA**2
        loc, exact_cov = vae.exact_posterior(torch.zeros(1, 5))
        assert torch.allclose(exact_cov, cov, atol=1e-5) and torch.allclose(loc[0], -(a @ vae.b), atol=1e-5)
        vae.encoder.linear.weight.copy_(a)
        vae.encoder.linear.bias.copy_(-(a @ vae.b) + shift * sd)
        vae.encoder.log_scale.copy_((widen * sd).log())
    return vae


def _ranks(vae, seed, **kwargs):
    return sbc_ranks(
        vae.model, vae.guide, num_simulations=N, num_posterior_samples=L, seed=seed, x_like=torch.zeros(1, 5), **kwargs
    )


def test_a_biased_encoder_fails_sbc_and_its_refined_q_passes(one_thread):
    vae = _biased_vae()
    runs, chi2_p, outside = 2, [], []
    for seed in range(runs):
        encoder = _ranks(vae, seed)
        refined = _ranks(vae, seed, refine_steps=300, refine_options={"lr": 0.05})
        # the same simulations: the refined posterior is ranked against the same z*
        assert refined.attrs["posterior"] == "refined" and refined.attrs["refine_steps"] == 300
        assert (
            refined.attrs["refine_lr"] == 0.05 and refined.attrs["refine_num_samples"] == REFINE_DEFAULTS["num_samples"]
        )
        u_enc, u_ref = sbc_uniformity(encoder), sbc_uniformity(refined)
        # the encoder: every quantity rejected, its mean one sd off shows as skewed ranks
        assert bool((u_enc["chi2_p_value"] < 1e-6).all()) and bool(u_enc["outside_band"].all())
        d_enc = dispersion(encoder)
        assert d_enc["verdict"].sel(level=0.9).item() == "too wide"  # twice too wide outweighs the shift here
        assert float(d_enc["mean_fractional_rank"]) < 0.5 - 10 * math.sqrt(1 / 12 / N)
        chi2_p.append(u_ref["chi2_p_value"].values)
        outside.append(u_ref["outside_band"].values)
        d_ref = dispersion(refined)
        z = (d_ref["coverage"] - d_ref["nominal"]) / d_ref["coverage_se"]
        assert float(abs(z).max()) < 4, (d_ref["coverage"].values, d_ref["coverage_se"].values)
        assert abs(float(d_ref["mean_fractional_rank"]) - 0.5) < 4 * math.sqrt(1 / 12 / N)
        # the K steps gained ELBO on (almost) every simulated x, by far more than their MC error
        gap, gap_se = refined["refine_gap"].values, refined["refine_gap_se"].values
        assert gap.mean() > 0.5 and (gap > -4 * gap_se).mean() > 0.99
    chi2_p = np.array(chi2_p)
    assert chi2_p.min() > 1e-3 / chi2_p.size, chi2_p
    # each of the 8 (run, quantity) ECDFs leaves its 95% band with probability <= 0.05 under
    # calibration: 4 or more of them, P <= C(8, 4) 0.05^4 < 5e-4 (the biased encoder: all 8)
    assert int(np.array(outside).sum()) <= 3, outside


def test_a_biased_encoder_fails_sbc_and_its_mean_field_q_star_passes(one_thread):
    """q* per simulated x (its family holds the exact posterior) passes where the encoder fails, on
    the same simulations; the ELBO it gains over the encoder is KL(encoder || posterior), a known
    number, within 4 se of its Monte Carlo error."""
    vae = _biased_vae()
    runs, chi2_p, outside = 2, [], []
    for seed in range(runs):
        encoder = _ranks(vae, seed)
        q_star = _ranks(vae, seed, mean_field=True, mean_field_options={"max_steps": 300})
        assert q_star.attrs["posterior"] == "meanfield" and q_star.attrs["meanfield_max_steps"] == 300
        assert q_star.attrs["meanfield_init"] == "encoder" and q_star.attrs["meanfield_polish"] == 1
        assert bool((sbc_uniformity(encoder)["chi2_p_value"] < 1e-6).all())
        u = sbc_uniformity(q_star)
        chi2_p.append(u["chi2_p_value"].values)
        outside.append(u["outside_band"].values)
        d = dispersion(q_star)
        z = (d["coverage"] - d["nominal"]) / d["coverage_se"]
        assert float(abs(z).max()) < 4, (d["coverage"].values, d["coverage_se"].values)
        assert abs(float(d["mean_fractional_rank"]) - 0.5) < 4 * math.sqrt(1 / 12 / N)
        assert q_star["meanfield_converged"].values.mean() > 0.99
        gap, gap_se = q_star["meanfield_gap"].values, q_star["meanfield_gap_se"].values
        se = max(math.sqrt(float((gap_se**2).sum())) / N, float(gap.std(ddof=1)) / math.sqrt(N))
        assert abs(gap.mean() - ENCODER_KL) < 4 * se, (gap.mean(), ENCODER_KL, se)
    chi2_p = np.array(chi2_p)
    assert chi2_p.min() > 1e-3 / chi2_p.size, chi2_p
    assert int(np.array(outside).sum()) <= 3, outside  # as for the refined q above


def test_dispersion_calls_a_narrow_and_a_wide_posterior(one_thread):
    """Exact mean, scale x0.5 and x2: the pooled 90% coverage is called too narrow and too wide,
    and the rank sd ratio is above and below 1 (by far more than 4 se of the uniform's)."""
    narrow, wide = _ranks(_biased_vae(0.0, 0.5), 3), _ranks(_biased_vae(0.0, 2.0), 3)
    dn, dw = dispersion(narrow), dispersion(wide)
    assert dn["verdict"].sel(level=0.9).item() == "too narrow" and dw["verdict"].sel(level=0.9).item() == "too wide"
    assert float(dn["rank_sd_ratio"]) > 1.1 and float(dw["rank_sd_ratio"]) < 0.9
    assert float(dn["excess"].sel(level=0.5)) < 0 < float(dw["excess"].sel(level=0.5))
    np.testing.assert_allclose(dn["nominal"].values, [0.5, 0.9])


def test_a_coverage_of_one_in_every_simulation_has_se_zero_and_the_report_words_it(one_thread):
    """A guide 50 times too wide puts every z* inside its 90% interval in every simulation: the
    coverage is 1 with a standard error of 0, a 'too wide' verdict whose wording divided by
    that se (ZeroDivisionError after all the work of ``calibrate``)."""
    from ppl_vae.reports.calibration import _short_verdict, _verdict_words

    d = dispersion(_ranks(_biased_vae(0.0, 50.0), 0))
    assert float(d["coverage"].sel(level=0.9)) == 1.0 and float(d["coverage_se"].sel(level=0.9)) == 0.0
    assert d["verdict"].sel(level=0.9).item() == "too wide"
    assert _short_verdict(d) == "too wide (+0.100, its se is 0: every simulation gave the same coverage)"
    assert _verdict_words(d).startswith("over-dispersed (too wide): 90% coverage +0.100 from nominal (its se is 0")


def test_refined_sbc_refuses_bad_arguments():
    vae = _biased_vae()
    with pytest.raises(ValueError, match="refine_steps must be a positive integer"):
        _ranks(vae, 0, refine_steps=0)
    with pytest.raises(ValueError, match="give one of them"):
        _ranks(vae, 0, refine_steps=5, sir_num_samples=200)
    with pytest.raises(ValueError, match="refine_options: unknown step_size"):
        _ranks(vae, 0, refine_steps=5, refine_options={"step_size": 0.1})
    with pytest.raises(ValueError, match="refine_steps and mean_field choose different posteriors"):
        _ranks(vae, 0, refine_steps=5, mean_field=True)
    with pytest.raises(ValueError, match="sir_num_samples and mean_field choose different posteriors"):
        _ranks(vae, 0, sir_num_samples=200, mean_field=True)
    with pytest.raises(ValueError, match="mean_field_options: unknown 'steps'"):
        _ranks(vae, 0, mean_field=True, mean_field_options={"steps": 10})
    with pytest.raises(ValueError, match="mean_field_options apply to the mean-field q. only"):
        _ranks(vae, 0, mean_field_options={"max_steps": 10})
    with pytest.raises(ValueError, match="mean_field must be True or False"):
        _ranks(vae, 0, mean_field="yes")
    with pytest.raises(ValueError, match="mean_field_options: 'max_steps' must be a positive integer"):
        _ranks(vae, 0, mean_field=True, mean_field_options={"max_steps": 0})
    with pytest.raises(ValueError, match="mean_field_options: unknown 'seed'"):  # each fit is seeded by the SBC
        _ranks(vae, 0, mean_field=True, mean_field_options={"seed": 3})
    with pytest.raises(ValueError, match="kind 'norm2'"):
        dispersion(_ranks(vae, 0).isel(simulation=slice(0, 20)), kind="norm2")


def test_mean_field_ranks_repeat_with_the_seed(one_thread):
    vae = _biased_vae()
    kw = dict(num_simulations=30, num_posterior_samples=19, x_like=torch.zeros(1, 5), mean_field=True)
    a, b = (sbc_ranks(vae.model, vae.guide, seed=4, **kw) for _ in range(2))
    np.testing.assert_array_equal(a["rank"].values, b["rank"].values)


def test_refined_ranks_repeat_with_the_seed(one_thread):
    """The refined q's draws come from their own generator: two identical calls (and two identical
    ``ppl-vae calibrate --refine`` processes: 100 simulations of a digits run, 1,096 ranks used to differ) agree."""
    vae = _biased_vae()
    kw = dict(num_simulations=30, num_posterior_samples=19, x_like=torch.zeros(1, 5), refine_steps=20)
    a, b = (sbc_ranks(vae.model, vae.guide, seed=4, **kw) for _ in range(2))
    np.testing.assert_array_equal(a["rank"].values, b["rank"].values)
