"""The jackknife-debiased estimate of log p(x) (Nowozin 2018) against the linear-Gaussian closed form.

Its bias falls as O(1/K^2) where IW's falls as O(1/K): pooled over many independent draws, its
error is smaller than IW's at K = 8 and 32 by more than 3 standard errors, indistinguishable from
0 at K = 32, and at K = 2 it overshoots log p(x): an estimate, not a lower bound.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.inference import estimators
from ppl_vae.inference.stats import jackknife_log_mean_exp, leave_one_out_log_mean_exp
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

REPEATS = 800  # 12 datapoints x 800 independent K-sample sets: standard errors of a few 1e-3 nats


@pytest.fixture(scope="module")
def errors():
    torch.manual_seed(3)
    model = LinearGaussianVAE(x_dim=5, latent_dim=3, sigma=0.5)
    x = torch.randn(12, 5)
    exact = model.exact_log_marginal(x).detach().double().repeat(REPEATS)

    def wide_guide(x_, **kwargs):  # the posterior's mean and 1.5x its marginal sds: light-tailed weights
        loc, cov = model.exact_posterior(x_)
        with pyro.plate("data", x_.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.5 * cov.diagonal(dim1=-2, dim2=-1).sqrt()).to_event(1))

    out = {}
    for k in (2, 8, 32):
        e = estimators.estimate(
            "jackknife", model.model, wide_guide, x.repeat(REPEATS, 1), num_samples=k, batch_size=2400, seed=k
        )
        iw, jk = e["log_px_iw"].double() - exact, e.log_px.double() - exact
        n = iw.numel()
        out[k] = (iw.mean(), iw.std() / math.sqrt(n), jk.mean(), jk.std() / math.sqrt(n))
    return out


@pytest.mark.parametrize("k", [8, 32])
def test_jackknife_bias_is_smaller_than_iw_bias(errors, k):
    iw, iw_se, jk, jk_se = errors[k]
    assert iw < -3 * iw_se  # IW is biased low
    assert abs(jk) < abs(iw) - 3 * (iw_se + jk_se), errors[k]


def test_jackknife_bias_vanishes_faster(errors):
    iw, iw_se, jk, jk_se = errors[32]
    assert abs(jk) < 3 * jk_se + 0.005, errors[32]  # O(1/K^2): nothing left at K = 32 at this precision
    # IW's O(1/K): from K = 8 to 32 its bias shrinks about 4-fold, not 16-fold
    ratio = errors[8][0] / iw
    ratio_se = ratio * math.sqrt((errors[8][1] / errors[8][0]) ** 2 + (iw_se / iw) ** 2)
    assert 2.0 < ratio - 3 * ratio_se and ratio + 3 * ratio_se < 8.0, (ratio, ratio_se)


def test_at_two_samples_the_jackknife_overshoots_it_is_no_lower_bound(errors):
    iw, iw_se, jk, jk_se = errors[2]
    assert jk > 3 * jk_se and iw < -3 * iw_se


def test_leave_one_out_and_jackknife_match_direct_computation():
    torch.manual_seed(0)
    log_w = torch.randn(7, 5, dtype=torch.float64) * 3
    log_w[2, 1] = 40.0  # one dominant weight: its leave-one-out sum needs the others' logsumexp
    loo = leave_one_out_log_mean_exp(log_w)
    direct = torch.stack([torch.logsumexp(torch.cat([log_w[:i], log_w[i + 1 :]]), 0) for i in range(7)]) - math.log(6)
    assert torch.allclose(loo, direct, atol=1e-12)
    est, se = jackknife_log_mean_exp(log_w)
    full = torch.logsumexp(log_w, 0) - math.log(7)
    assert torch.allclose(est, 7 * full - 6 * direct.mean(0), atol=1e-12)
    assert torch.allclose(se, (6 / 7 * ((direct - direct.mean(0)) ** 2).sum(0)).sqrt(), atol=1e-12)
    with pytest.raises(ValueError, match="K >= 2"):
        leave_one_out_log_mean_exp(log_w[:1])


def test_the_dataset_says_it_bounds_neither_way_and_its_iw_is_the_iw_estimators():
    torch.manual_seed(1)
    model = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5)
    x = torch.randn(3, 4)
    ds = estimators.estimate("jackknife", model.model, model.guide, x, num_samples=10, seed=0).to_dataset()
    assert ds["log_px"].attrs["bound"] == "neither"
    assert "neither a lower nor an upper bound" in ds["log_px"].attrs["long_name"]
    assert ds["log_px_iw"].attrs["bound"] == "lower bound"
    # the same draws as IW for the same seed: its IW part is the "iw" estimator's number
    iw = estimators.estimate("iw", model.model, model.guide, x, num_samples=10, seed=0)
    assert ds["log_px_iw"].values.tolist() == pytest.approx(iw.log_px.tolist(), rel=1e-6)
    with pytest.raises(ValueError, match="needs num_samples >= 2"):
        estimators.estimate("jackknife", model.model, model.guide, x, num_samples=1)
