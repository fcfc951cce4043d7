"""Calibration of a discrete site's q(c|x) against known answers, and SIR against a bad guide.

- A two-component mixture with an exact p(c|x) (models/closed_form.TwoComponentLinearGaussian)
  and a guide q(c|x) q(z|x, c) that can be exact or tempered: the debiased calibration error of
  the exact q is within 3 bootstrap se of 0, against the model's IW posterior and against
  labels simulated from the model; tempered logits (x 0.3, x 3) are flagged.
- SIR with K = 1000 proposals from a biased, too-wide guide of the linear-Gaussian VAE: its SBC
  ranks pass the chi-square and ECDF tests at Bonferroni-sized thresholds of their null
  distributions, where the guide's own ranks fail them.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from matplotlib.figure import Figure
from pyro import distributions as dist

from ppl_vae.analysis.calibration import (
    coverage,
    discrete_calibration,
    discrete_posterior,
    expected_calibration_error,
    plot_reliability,
    plot_sbc_ecdf,
    posterior_distance,
    sbc_ranks,
    sbc_uniformity,
    sir_draws,
)
from ppl_vae.models.closed_form import TwoComponentLinearGaussian
from ppl_vae.models.discrete import clamp_logits
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.vae import data_plate

pytestmark = pytest.mark.usefixtures("one_thread")


class TemperedMixture(TwoComponentLinearGaussian):
    """The mixture (component means +-0.5) with a guide q(c|x) = softmax(temper * log p(c|x)) (exact at temper 1) and
    q(z|x, c) = N(E[z|x, c], scale^2 Cov[z|x, c]); ``component`` clamps c (enumerated_estimate's
    contract)."""

    def __init__(self, temper: float = 1.0, scale: float = 1.2):
        super().__init__(x_dim=4, z_dim=2, s=0.5, dtype=torch.float64)
        self.temper, self.scale = temper, scale
        with torch.no_grad():  # overlapping components: confidences spread over (0.5, 1)
            self.means.copy_(torch.tensor([[0.5, 0.5], [-0.5, -0.5]], dtype=torch.float64))

    def exact_posterior_probs(self, x):
        terms, _, _ = self._per_component(x)
        return torch.softmax(terms.T, -1).detach()

    def model(self, x, y=None, component=None):
        super().model(x)

    def guide(self, x, y=None, component=None):
        terms, locs, cov = self._per_component(x)
        logits = clamp_logits(self.temper * torch.log_softmax(terms.T, -1), component)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
            loc = torch.where((c == 0).unsqueeze(-1), locs[0], locs[1])
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=self.scale**2 * cov))

    def simulate(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            c = torch.multinomial(torch.softmax(self.logits, -1), n, replacement=True, generator=g)
            z = self.means[c] + torch.randn(n, 2, generator=g, dtype=torch.float64)
            x = z @ self.W.T + self.b + self.s * torch.randn(n, 4, generator=g, dtype=torch.float64)
        return x, c


@pytest.fixture(scope="module")
def mixture_data():
    torch.manual_seed(2)
    pair = TemperedMixture()
    x, c = pair.simulate(1500, seed=5)
    return pair, x, c


def test_the_iw_posterior_matches_the_exact_one_within_its_se(mixture_data):
    pair, x, _ = mixture_data
    post = discrete_posterior(pair.model, pair.guide, x[:300], site="c", num_values=2, seed=0, num_samples=200)
    exact = pair.exact_posterior_probs(x[:300]).numpy()
    np.testing.assert_allclose(post["q"].values, exact, atol=1e-9)  # temper 1: q(c|x) is exact
    z = (post["posterior"].values - exact) / np.maximum(post["posterior_se"].values, 1e-12)
    # 300 points, two values each (one free): P(|Z| > 4.5) * 300 < 2e-3
    assert float(np.abs(z).max()) < 4.5, float(np.abs(z).max())
    assert float(post["posterior_se"].max()) < 0.05


class _NoComponent(TemperedMixture):
    """The same pair without ``component=``: what a user writing the contract's pair would have."""

    def model(self, x, y=None):
        super().model(x)

    def guide(self, x, y=None):
        super().guide(x)


class _NoDiscreteGuide(TemperedMixture):
    """A guide of z alone: there is no q(c|x) (the model sums c out)."""

    def guide(self, x, y=None, component=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.MultivariateNormal(torch.zeros(x.shape[0], 2, dtype=x.dtype), torch.eye(2, dtype=x.dtype))
            )


def test_the_discrete_calibration_refuses_a_pair_it_cannot_run_on_before_any_estimate(mixture_data, monkeypatch):
    """QA: calibrate of a user's pair that declares enumerated_sites crashed with TypeError
    (guide() got an unexpected keyword argument 'component') after all the SBC work; now a
    one-line ValueError before the first estimate, naming what is missing."""
    from ppl_vae.analysis import calibration
    from ppl_vae.inference import importance

    _, x, _ = mixture_data
    monkeypatch.setattr(importance, "importance_estimate", lambda *a, **k: pytest.fail("estimated before the check"))
    for pair, message in (
        (_NoComponent(), "clamps it with component=.*which _NoComponent's model does not take"),
        (_NoDiscreteGuide(), "_NoDiscreteGuide: the guide has no categorical sample site 'c', so there is no q"),
    ):
        with pytest.raises(ValueError, match=message) as caught:
            discrete_posterior(pair.model, pair.guide, x[:10], site="c", num_values=2, seed=0)
        assert "\n" not in str(caught.value)
        with pytest.raises(ValueError, match=message):
            calibration.check_discrete_calibratable(pair.model, pair.guide, x[:10], "c")
    calibration.check_discrete_calibratable(TemperedMixture().model, TemperedMixture().guide, x[:10], "c")


@pytest.mark.parametrize("temper", [1.0, 0.3, 3.0])
def test_exact_q_is_calibrated_and_tempered_q_is_flagged(mixture_data, temper):
    """The debiased squared error (Kumar et al. 2019) has mean 0 for a calibrated q; its
    bootstrap se sizes the test: |ce2| < 3 se for the exact q (against the IW posterior, and
    against the simulated labels), ce2 > 3 se (flagged) for logits tempered by 0.3 or 3."""
    pair, x, c = mixture_data
    pair.temper = temper
    try:
        post = discrete_posterior(pair.model, pair.guide, x, site="c", num_values=2, seed=1, num_samples=200)
    finally:
        pair.temper = 1.0
    for binning in ("equal_width", "equal_mass"):
        cal = discrete_calibration(post, c.numpy(), num_bins=10, binning=binning, num_bootstrap=400, seed=3)
        assert list(cal["comparison"].values) == ["q(c|x) vs p(c|x)", "q(c|x) vs labels", "p(c|x) vs labels"]
        assert cal.attrs["binning"] == binning and int(cal["count"].sum("bin").max()) == x.shape[0]
        ce2, se = cal["ce2"].values, cal["ce2_se"].values
        if temper == 1.0:
            assert bool((np.abs(ce2) < 3 * se).all()), (binning, ce2, se)
            assert not cal["miscalibrated"].any()
            # the IW posterior, an estimate, is close to q = p(c|x): a small distance
            assert float(cal["mean_tv"]) < 0.02 and float(cal["mean_kl"]) < 0.01
        else:
            against_posterior, against_labels, posterior_vs_labels = ce2 / se
            assert against_posterior > 10 and against_labels > 3, (binning, ce2, se)
            assert bool(cal["miscalibrated"].values[:2].all())
            assert abs(posterior_vs_labels) < 3  # the model's own posterior stays calibrated
            over = temper > 1
            gap = (cal["bin_confidence"] - cal["bin_accuracy"]).sel(comparison="q(c|x) vs p(c|x)")
            assert bool(
                ((gap > 0) if over else (gap < 0))
                .where(cal["count"].sel(comparison="q(c|x) vs p(c|x)") > 20, True)
                .all()
            )
            assert float(cal["mean_tv"]) > 10 * float(cal["mean_tv_se"])
    fig = plot_reliability(cal)
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.get_visible()]) == 6
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_ece_is_the_weighted_mean_gap_and_its_bins_are_stated():
    """Hand-checkable: two bins of two points each."""
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    ds = expected_calibration_error(probs, labels, num_bins=2, num_bootstrap=50)
    # equal-width bins of [0.5, 1]: [0.5, 0.75) holds 0.6, 0.55 (accuracy 1), [0.75, 1] holds 0.9, 0.8 (0.5)
    np.testing.assert_allclose(ds["bin_lower"].values, [0.5, 0.75])
    np.testing.assert_allclose(ds["bin_confidence"].values, [0.575, 0.85])
    np.testing.assert_allclose(ds["bin_accuracy"].values, [1.0, 0.5])
    assert float(ds["ece"]) == pytest.approx(0.5 * 0.425 + 0.5 * 0.35)
    assert ds.attrs["binning"] == "equal_width" and ds.attrs["target"] == "labels"
    # debiased: each bin's squared mean gap less its variance over n
    gaps = [np.array([0.6 - 1, 0.55 - 1]), np.array([0.9 - 1, 0.8 - 0])]
    want = sum(0.5 * (g.mean() ** 2 - g.var(ddof=1) / 2) for g in gaps)
    assert float(ds["ce2"]) == pytest.approx(want)
    d = posterior_distance(probs, np.array([[1.0, 0.0]] * 4))
    assert float(d["mean_tv"]) == pytest.approx(np.mean([0.1, 0.2, 0.6, 0.55]))


def test_ece_bad_arguments_are_named():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    with pytest.raises(ValueError, match="binning"):
        expected_calibration_error(probs, np.array([0, 1]), binning="quantile")
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(probs, np.array([0, 1]), num_bins=0)
    with pytest.raises(ValueError, match="target"):
        expected_calibration_error(probs, np.array([0, 2]))
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(np.array([[0.9, 0.3], [0.5, 0.5]]), np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# SIR


N, L = 400, 99


@pytest.fixture
def vae() -> LinearGaussianVAE:
    torch.manual_seed(3)
    return LinearGaussianVAE(x_dim=4, latent_dim=2)


def bad_guide(vae, *, scale=1.5, shift=1.0):
    """q(z|x) = N(mu + shift * sd, scale^2 Sigma): biased by one posterior sd and too wide."""

    def guide(x, y=None):
        loc, cov = vae.exact_posterior(x)
        with data_plate(x, None):
            return pyro.sample(
                "z", dist.MultivariateNormal(loc + shift * cov.diagonal().sqrt(), covariance_matrix=scale**2 * cov)
            )

    return guide


def test_sir_with_many_proposals_is_calibrated_where_the_bad_guide_is_not(vae):
    """Same simulations for both (the seed fixes them whatever ranks them). Thresholds from the
    statistics' null distributions, Bonferroni over Q = 4 quantities: the chi-square and ECDF
    p-values of SIR are above 1e-3 / 4 (a calibrated sampler fails with probability <= 1e-3);
    the bad guide's are below 1e-3 for every quantity. SIR's 90% coverage is within 4 binomial
    se of nominal."""
    guide = bad_guide(vae)
    kw = dict(num_simulations=N, num_posterior_samples=L, seed=11, x_like=torch.zeros(1, 4))
    plain = sbc_ranks(vae.model, guide, **kw)
    sir = sbc_ranks(vae.model, guide, sir_num_samples=1000, **kw)
    assert (
        sir.attrs["posterior"] == "sir" and sir.attrs["sir_num_samples"] == 1000 and plain.attrs["posterior"] == "guide"
    )
    assert float(sir["sir_ess"].median()) > 100  # the proposals are usable: ESS far above 1
    u_plain, u_sir = sbc_uniformity(plain), sbc_uniformity(sir)
    q = sir.sizes["quantity"]
    assert float(u_plain["chi2_p_value"].max()) < 1e-3 and bool(u_plain["outside_band"].all())
    assert float(u_sir["chi2_p_value"].min()) > 1e-3 / q, u_sir["chi2_p_value"].values
    assert float(u_sir["ecdf_p_value"].min()) > 1e-3 / q, u_sir["ecdf_p_value"].values
    c_sir = coverage(sir, [0.9]).sel(level=0.9)
    assert float(abs(c_sir["coverage"] - 0.9).max()) < 4 * math.sqrt(0.09 / N), c_sir["coverage"].values
    fig = plot_sbc_ecdf(u_plain, compare={"SIR K=1000": u_sir})
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert all("SIR" in t for t in titles)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_sir_draws_shapes_seed_and_bad_input(vae):
    x = torch.randn(7, 4)
    guide = bad_guide(vae)
    state = torch.get_rng_state()
    a = sir_draws(vae.model, guide, x, seed=3, num_samples=50, num_draws=20, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.latents["z"].shape == (20, 7, 2) and a.ess.shape == (7,)
    assert bool(((a.ess >= 1) & (a.ess <= 50 + 1e-6)).all())
    b = sir_draws(vae.model, guide, x, seed=3, num_samples=50, num_draws=20, batch_size=4)
    assert torch.equal(a.latents["z"], b.latents["z"])
    # with the exact posterior as proposal the weights are equal: ESS = K
    exact = sir_draws(vae.model, vae.exact_posterior_guide, x, seed=0, num_samples=30, num_draws=5)
    np.testing.assert_allclose(exact.ess.numpy(), 30.0, rtol=1e-3)
    with pytest.raises(ValueError, match="num_samples"):
        sir_draws(vae.model, guide, x, seed=0, num_samples=1, num_draws=5)
    with pytest.raises(ValueError, match="num_draws"):
        sir_draws(vae.model, guide, x, seed=0, num_samples=10, num_draws=0)
    with pytest.raises(ValueError, match="num_samples"):
        sbc_ranks(vae.model, guide, num_simulations=5, seed=0, sir_num_samples=1)
