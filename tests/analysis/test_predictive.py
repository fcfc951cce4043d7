"""Posterior predictive checks against closed forms: a linear-Gaussian model checked on its own
data (uniform prior predictive p-values; posterior predictive p-values equal to the Gaussian
closed form), on data it cannot produce (p-values at the edges), and the bookkeeping (shapes,
seeds, the caller's RNG, counts, the mid-p convention) on a Bernoulli VAE."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scipy import stats

from ppl_vae.analysis.predictive import (
    DEFAULT_STATISTICS,
    IMAGES_IN_UNIT_INTERVAL,
    STATISTICS,
    inapplicable_statistics,
    mid_p_value,
    plot_p_values,
    plot_worst_fitting,
    posterior_predictive_check,
    worst_fitting,
)
from ppl_vae.models import build_vae
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

D, LATENT, SIGMA = 10, 2, 0.5


def spread(x: torch.Tensor) -> torch.Tensor:
    """Within-datapoint variance of the elements: scaled data have more of it."""
    return x.var(-1)


def linear_gaussian() -> LinearGaussianVAE:
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(D, LATENT, generator=gen)
    b = 0.3 * torch.randn(D, generator=gen)
    return LinearGaussianVAE(D, LATENT, sigma=SIGMA, W=W, b=b)


def from_model(vae: LinearGaussianVAE, n: int) -> torch.Tensor:
    cov = vae.W @ vae.W.T + SIGMA**2 * torch.eye(D)
    return torch.distributions.MultivariateNormal(vae.b, cov).sample((n,)).detach()


def extreme_fraction(p: np.ndarray) -> float:
    return float(((p < 0.05) | (p > 0.95)).mean())


@torch.no_grad()
def test_prior_predictive_p_values_are_uniform_on_the_models_own_data():
    """x_i and its replicates are exchangeable draws of p(x): the p-value k/R has mean 1/2 and,
    with R large, a uniform distribution (sd of the mean sqrt(1/12 / N))."""
    vae = linear_gaussian()
    n, r = 2000, 200
    x = from_model(vae, n)
    ds = posterior_predictive_check(
        vae.model,
        None,
        x,
        statistics={"mean": lambda t: t.mean(-1), "spread": spread},
        num_replicates=r,
        seed=1,
        source="prior",
        elementwise=False,
    )
    se = math.sqrt(((r + 1) ** 2 - 1) / (12 * r**2) / n)  # k/R, k uniform on 0..R
    for s in ("mean", "spread"):
        p = ds["p_value"].sel(statistic=s).values
        assert abs(p.mean() - 0.5) < 3 * se, (s, p.mean())
        assert stats.kstest(p, "uniform").pvalue > 1e-3, s


@torch.no_grad()
def test_posterior_predictive_p_values_match_the_gaussian_closed_form():
    """With the exact posterior as guide, x_rep | x ~ N(W mu + b, W Sigma W^T + s^2 I), so for
    T(x) = mean(x) the p-value is 1 - Phi((T(x) - a.(W mu + b)) / sd) with a = 1/D. The MC
    p-value is k/R with k ~ Binomial(R, p): each within 5 se (plus 1/R), the mean within 3 se."""
    vae = linear_gaussian()
    n, r = 300, 400
    x = from_model(vae, n)
    ds = posterior_predictive_check(
        vae.model, vae.exact_posterior_guide, x, statistics={"mean": lambda t: t.mean(-1)}, num_replicates=r, seed=2
    )
    mu, cov = vae.exact_posterior(x)
    a = torch.full((D,), 1.0 / D)
    loc = (mu @ vae.W.T + vae.b) @ a
    sd = (a @ (vae.W @ cov @ vae.W.T + SIGMA**2 * torch.eye(D)) @ a).sqrt()
    exact = (1 - torch.distributions.Normal(loc, sd).cdf(x.mean(-1))).double().numpy()
    p = ds["p_value"].sel(statistic="mean").values
    se = np.sqrt(exact * (1 - exact) / r)
    assert (np.abs(p - exact) <= 5 * se + 1 / r).all()
    assert abs((p - exact).mean()) < 3 * math.sqrt((exact * (1 - exact)).mean() / r / n)
    # The pooled posterior p-values centre on 1/2 (the data are used twice, so they gather
    # there rather than spread uniformly: Meng 1994).
    assert abs(p.mean() - 0.5) < 3 * p.std() / math.sqrt(n)


@pytest.mark.parametrize("source", ["posterior", "prior"])
@pytest.mark.parametrize("misfit", ["scaled", "shifted"])
@torch.no_grad()
def test_data_the_model_cannot_produce_get_extreme_p_values(source, misfit):
    """Under the model the fraction of p-values below 0.05 or above 0.95 is about 10%; data
    scaled by 5 (more spread) or shifted by 4 off the model's mean sit far above it."""
    vae = linear_gaussian()
    n = 400
    x = from_model(vae, n)
    x = 5 * x if misfit == "scaled" else x + 4.0
    statistic = {"scaled": spread, "shifted": lambda t: t.mean(-1)}[misfit]
    ds = posterior_predictive_check(
        vae.model,
        vae.exact_posterior_guide,
        x,
        statistics={misfit: statistic},
        num_replicates=100,
        seed=3,
        source=source,
        elementwise=False,
    )
    frac = extreme_fraction(ds["p_value"].values[:, 0])
    assert frac > 0.1 + 5 * math.sqrt(0.1 * 0.9 / n), frac


@pytest.fixture
def bernoulli():
    return build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)


def test_shapes_seeds_caller_rng_and_counts(bernoulli):
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.3))
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    ds = posterior_predictive_check(bernoulli.model, bernoulli.guide, x, num_replicates=5, seed=7, batch_size=4)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state

    assert dict(ds["replicated"].sizes) == {"datapoint": 6, "statistic": 2, "replicate": 5}
    assert ds["observed"].dims == ds["p_value"].dims == ("datapoint", "statistic")
    assert list(ds["statistic"].values) == ["mean_intensity", "active_pixels"]
    assert ds["predictive_mean"].dims == ("datapoint", "channel", "row", "col")
    assert ds["predictive_mean"].shape == (6, 1, 8, 8) and ds["element_p_value"].shape == (6, 1, 8, 8)
    assert {k: ds.attrs[k] for k in ("source", "num_replicates", "seed")} == {
        "source": "posterior",
        "num_replicates": 5,
        "seed": 7,
    }
    assert "Gelman" in ds.attrs["reference"]
    assert all(ds[v].attrs["description"] for v in ds.data_vars)

    counts = ds["replicated"].sel(statistic="active_pixels").values
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0 and counts.max() <= 64
    assert np.array_equal(ds["observed"].sel(statistic="active_pixels").values, x.flatten(1).sum(-1).numpy())
    assert ((ds["p_value"] >= 0) & (ds["p_value"] <= 1)).all()

    again = posterior_predictive_check(bernoulli.model, bernoulli.guide, x, num_replicates=5, seed=7, batch_size=4)
    assert again.equals(ds)
    other = posterior_predictive_check(bernoulli.model, bernoulli.guide, x, num_replicates=5, seed=8, batch_size=4)
    assert not np.array_equal(other["replicated"].values, ds["replicated"].values)


def test_mid_p_convention_on_hand_built_cases(bernoulli):
    # P(>) = 1/4, P(=) = 1/2: mid-p 1/4 + 1/4
    assert mid_p_value(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([2.0])).item() == 0.5
    # A decoder that ignores z and puts every pixel on: x_rep is all ones, 64 active pixels.
    with torch.no_grad():
        bernoulli.decoder.net[-1].weight.zero_()
        bernoulli.decoder.net[-1].bias.fill_(50.0)
    x = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)])
    ds = posterior_predictive_check(bernoulli.model, bernoulli.guide, x, statistics=["active_pixels"], seed=0)
    # all ones: every replicate ties (p = 0.5, not 1); all zeros: every replicate is above (p = 1)
    assert ds["p_value"].values[:, 0].tolist() == [0.5, 1.0]
    assert (ds["element_p_value"].values[0] == 0.5).all() and (ds["element_p_value"].values[1] == 1.0).all()
    assert (ds["predictive_mean"].values == 1.0).all()


def test_worst_fitting_and_figures(bernoulli):
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.5))
    ds = posterior_predictive_check(bernoulli.model, bernoulli.guide, x, num_replicates=10, seed=0)
    ds["p_value"].values[:, 0] = [0.5, 0.99, 0.02, 0.3, 0.97]
    worst = worst_fitting(ds, "mean_intensity", 3)
    assert worst["datapoint"].values.tolist() == [1, 2, 4]
    np.testing.assert_allclose(worst.values, [0.01, 0.02, 0.03])
    assert isinstance(plot_p_values(ds), Figure)
    assert isinstance(plot_worst_fitting(x, ds, "mean_intensity", k=3), Figure)
    with pytest.raises(ValueError, match="statistic must be one of"):
        worst_fitting(ds, "nope", 2)


def test_bad_arguments_are_named(bernoulli):
    x = torch.zeros(2, 1, 8, 8)
    check = lambda **kw: posterior_predictive_check(bernoulli.model, bernoulli.guide, x, seed=0, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="unknown statistic 'nope'.*active_pixels"):
        check(statistics=["nope"])
    with pytest.raises(ValueError, match="statistic 'flat' must return one value per datapoint"):
        check(statistics={"flat": lambda t: t.flatten()})
    with pytest.raises(ValueError, match="source must be one of"):
        check(source="likelihood")
    with pytest.raises(ValueError, match="num_replicates"):
        check(num_replicates=0)


def test_the_builtin_statistics_are_refused_for_data_they_do_not_apply_to(bernoulli):
    """mean_intensity and active_pixels (elements > 0.5) declare images with values in [0, 1]:
    standardized readings (negative values) and a model declaring non-image x (text's character
    indices) are refused by name, never silently scored; a mapping of the caller's own
    statistics still runs on them."""
    assert all(STATISTICS.get(s).applies_to is IMAGES_IN_UNIT_INTERVAL for s in STATISTICS.names())
    assert all(IMAGES_IN_UNIT_INTERVAL.description in STATISTICS.describe(s) for s in STATISTICS.names())
    image = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    readings = torch.randn(3, 1, 8, 8)
    assert inapplicable_statistics(DEFAULT_STATISTICS, image) == {}
    refused = inapplicable_statistics(DEFAULT_STATISTICS, readings)
    assert set(refused) == set(DEFAULT_STATISTICS) and all("not in [0, 1]" in r for r in refused.values())
    as_text = inapplicable_statistics(DEFAULT_STATISTICS, image, images=False)
    assert set(as_text) == set(DEFAULT_STATISTICS) and all("not images" in r for r in as_text.values())

    check = lambda x, **kw: posterior_predictive_check(bernoulli.model, bernoulli.guide, x, seed=0, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"active_pixels applies to images with values in \[0, 1\]"):
        check(readings, statistics=["active_pixels"])
    with pytest.raises(ValueError, match="mean_intensity applies to images.*not images"):
        check(image, images=False)
    ds = check(readings, statistics={"mean": lambda t: t.flatten(-3).mean(-1)}, num_replicates=3)
    assert list(ds["statistic"].values) == ["mean"]


def test_the_worst_fitting_figure_labels_datapoints_with_their_stored_ids(bernoulli):
    """A subset's results carry the datapoints' ids in the split (``datapoint`` coordinate); the
    figure labels each image with that id, not with its position in the subset, and draws the
    row of x at that position."""
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.5))
    x[1] = 1.0  # the worst datapoint below: all pixels on
    ds = posterior_predictive_check(bernoulli.model, bernoulli.guide, x, num_replicates=10, seed=0)
    ds = ds.assign_coords(datapoint=[20, 42, 7, 3, 99])
    ds["p_value"].values[:, 0] = [0.5, 0.999, 0.02, 0.3, 0.97]
    fig = plot_worst_fitting(x, ds, "mean_intensity", k=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split("\n")[0] for t in titles] == ["#42", "#7", "#99"]
    assert f"T={float(x[1].mean()):.3f}" in titles[0]
    # every T to the same three decimals (QA: T=0.25 beside T=0.263)
    assert all(len(t.split("\n")[1].split("=")[1].split(".")[1]) == 3 for t in titles), titles
    assert float(fig.axes[0].get_images()[0].get_array().min()) == 1.0  # x[1], all on
