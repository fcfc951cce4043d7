"""PSIS k̂ computed in NumPy (ppl_vae.inference.stats.psis_khat) equals ArviZ's psislw (0.x, the
main environment's) and recovers a planted Pareto tail; scoring imports no ArviZ."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ppl_vae import arviz_compat
from ppl_vae.inference.stats import psis_khat


@pytest.mark.skipif(arviz_compat.ARVIZ_MAJOR >= 1, reason="the reference is ArviZ 0.x's psislw")
@pytest.mark.parametrize("k_draws", [21, 40, 1000, 5000])
def test_equals_arviz_psislw(k_draws):
    rng = np.random.default_rng(k_draws)
    for scale in (0.3, 1.0, 3.0, 10.0):  # light to very heavy weight tails
        log_w = rng.standard_t(3, size=(k_draws, 30)) * scale
        ours, theirs = psis_khat(log_w), arviz_compat.psis_khat(log_w)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [0.3, 0.8])
def test_recovers_a_planted_pareto_tail(k):
    rng = np.random.default_rng(1)
    u = rng.uniform(size=(4000, 40))
    log_w = np.log((u ** (-k) - 1) / k)  # generalized Pareto draws with shape k
    khat = psis_khat(log_w)
    assert khat.shape == (40,) and np.isfinite(khat).all()
    assert abs(khat.mean() - k) < 4 * khat.std(ddof=1) / np.sqrt(40) + 0.02, (khat.mean(), khat.std())


def test_flat_weights_too_few_draws_and_bad_shapes():
    assert np.isneginf(psis_khat(np.full((100, 3), -2.0) + 1e-6 * np.arange(100)[:, None])).all()
    assert np.isnan(psis_khat(np.random.default_rng(0).normal(size=(20, 3)))).all()
    with pytest.raises(ValueError, match="num_samples, num_datapoints"):
        psis_khat(np.zeros(5))


def test_iw_scoring_imports_no_arviz():
    code = (
        "import sys, torch\n"
        "from ppl_vae.inference.importance import importance_estimate\n"
        "from ppl_vae.models.linear_gaussian import LinearGaussianVAE\n"
        "vae = LinearGaussianVAE(4, 2)\n"
        "e = importance_estimate(vae.model, vae.guide, torch.randn(3, 4), num_samples=50, seed=0)\n"
        "assert e.khat is not None\n"
        "print('arviz' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
