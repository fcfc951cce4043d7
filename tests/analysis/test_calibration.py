"""Simulation-based calibration against closed forms: the exact posterior of a linear-Gaussian
model gives uniform ranks; a guide too narrow gives U-shaped ranks, a biased one skewed ranks.

Every Monte Carlo assertion is sized by a union bound so that a correct implementation fails
it with probability at most about 1e-3, whatever the seed; the broken guides miss by tens of se.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
import xarray as xr
from matplotlib.figure import Figure
from pyro import distributions as dist
from scipy import stats

from ppl_vae.analysis.calibration import (
    LOG_LIKELIHOOD,
    coverage,
    format_ecdf_p_value,
    plot_sbc_ecdf,
    sbc_ranks,
    sbc_uniformity,
)
from ppl_vae.models.closed_form import TwoComponentLinearGaussian, TwoLayerLinearGaussian
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.vae import data_plate

N, L = 400, 99  # L + 1 = 100 rank values: central intervals at 0.5, 0.8, 0.9 are exact
LEVELS = (0.5, 0.8, 0.9, 0.95)


@pytest.fixture
def vae() -> LinearGaussianVAE:
    torch.manual_seed(3)
    return LinearGaussianVAE(x_dim=4, latent_dim=2)


def gaussian_guide(vae: LinearGaussianVAE, *, scale: float = 1.0, shift: float = 0.0):
    """q(z|x) = N(mu + shift * sd, scale^2 Sigma) around the exact posterior N(mu, Sigma)."""

    def guide(x, y=None):
        loc, cov = vae.exact_posterior(x)
        sd = cov.diagonal().sqrt()
        with data_plate(x, None):
            return pyro.sample("z", dist.MultivariateNormal(loc + shift * sd, covariance_matrix=scale**2 * cov))

    return guide


def ranks_of(vae, guide, seed, num_simulations=N):
    return sbc_ranks(
        vae.model, guide, num_simulations=num_simulations, num_posterior_samples=L, seed=seed, x_like=torch.zeros(1, 4)
    )


def test_ranks_dataset_layout(vae):
    ranks = ranks_of(vae, vae.exact_posterior_guide, seed=0, num_simulations=30)
    assert ranks["rank"].dims == ("simulation", "quantity")
    assert list(ranks["quantity"].values) == ["z[0]", "z[1]", "|z|", LOG_LIKELIHOOD]
    assert list(ranks["kind"].values) == ["dimension", "dimension", "norm", "log_likelihood"]
    assert ranks["rank"].shape == (30, 4)
    assert int(ranks["rank"].min()) >= 0 and int(ranks["rank"].max()) <= L
    assert (
        ranks.attrs["num_posterior_samples"] == L and ranks.attrs["seed"] == 0 and "Talts" in ranks.attrs["reference"]
    )
    # a VAE's own model declares its datapoint shape: x_like may be left out
    assert sbc_ranks(vae.model, vae.guide, num_simulations=5, seed=0)["rank"].shape == (5, 4)


def test_exact_posterior_gives_uniform_ranks_and_nominal_coverage(vae):
    """R independent runs of N simulations. Each run: P(any of its Q = 4 ECDFs leaves its 95%
    simultaneous band) <= 4 * 0.05 = 0.2 (union bound), so the number of runs with a quantity
    outside is at most Binomial(R, 0.2): P(>= 7 of 10) < 9e-4. The chi-square p-values are
    Bonferroni-sized (R * Q of them, threshold 1e-3 / (R * Q)). Coverage pooled over the runs
    (R * N simulations) is within 4 binomial se of nominal at each of 16 (level, quantity)
    pairs: 16 * P(|Z| > 4) = 1e-3."""
    runs = 10
    all_ranks, outside, chi2_p = [], [], []
    for seed in range(runs):
        ranks = ranks_of(vae, vae.exact_posterior_guide, seed=100 + seed)
        u = sbc_uniformity(ranks)
        outside.append(u["outside_band"].values)
        chi2_p.append(u["chi2_p_value"].values)
        all_ranks.append(ranks)
    outside, chi2_p = np.array(outside), np.array(chi2_p)
    q = outside.shape[1]
    runs_with_outside = int(outside.any(1).sum())
    assert runs_with_outside <= 6, (
        f"{runs_with_outside}/{runs} runs leave the band ({outside.mean():.3f} of quantities)"
    )
    assert chi2_p.min() > 1e-3 / (runs * q), chi2_p.min()
    # the p-values are not systematically small: their mean is 1/2 within 4 se of a uniform's
    assert abs(chi2_p.mean() - 0.5) < 4 * math.sqrt(1 / 12 / chi2_p.size) + 0.02

    pooled = xr.concat(all_ranks, "simulation")
    pooled["simulation"] = np.arange(pooled.sizes["simulation"])
    cov = coverage(pooled, LEVELS)
    nominal = cov["nominal"]
    np.testing.assert_allclose(nominal.sel(level=[0.5, 0.8, 0.9]).values, [0.5, 0.8, 0.9])
    se = np.sqrt(nominal * (1 - nominal) / pooled.sizes["simulation"])
    z = (cov["coverage"] - nominal) / se
    assert float(abs(z).max()) < 4, z.values


def test_a_too_narrow_guide_gives_u_shaped_ranks(vae):
    ranks = ranks_of(vae, gaussian_guide(vae, scale=0.3), seed=5)
    u, cov = sbc_uniformity(ranks), coverage(ranks, LEVELS)
    c90, se90 = cov["coverage"].sel(level=0.9), cov["coverage_se"].sel(level=0.9)
    assert bool(((0.9 - c90) > 5 * np.maximum(se90, math.sqrt(0.09 / N))).all()), c90.values
    assert bool((u["chi2_p_value"] < 1e-3).all()) and bool(u["outside_band"].all())
    # U-shaped: both extreme tenths of the latent dimensions' ranks are overfull (expected 0.05 each)
    r = ranks["rank"].sel(quantity=["z[0]", "z[1]"])
    se_tail = math.sqrt(0.05 * 0.95 / N)
    assert bool(((r < 5).mean("simulation") > 0.05 + 5 * se_tail).all())
    assert bool(((r > L - 5).mean("simulation") > 0.05 + 5 * se_tail).all())


def test_a_biased_guide_gives_skewed_ranks(vae):
    """The guide's mean one posterior sd too high: z* sits low among the draws."""
    ranks = ranks_of(vae, gaussian_guide(vae, shift=1.0), seed=6)
    u = sbc_uniformity(ranks)
    assert bool((u["chi2_p_value"] < 1e-3).all()) and bool(u["outside_band"].all())
    frac = ranks["rank"].sel(quantity=["z[0]", "z[1]"]) / (L + 1)
    assert bool((frac.mean("simulation") < 0.5 - 5 * math.sqrt(1 / 12 / N)).all()), frac.mean("simulation").values


@pytest.mark.parametrize("which", ["hierarchy", "mixture"])
def test_exact_posteriors_of_models_with_several_or_enumerated_sites_are_calibrated(which):
    """Two latent sites (z2, z1), and a discrete site the model sums out: the ranks of the exact
    posterior pass the chi-square test at a Bonferroni-sized threshold (1e-3 over Q quantities)."""
    torch.manual_seed(4)
    pair = TwoLayerLinearGaussian() if which == "hierarchy" else TwoComponentLinearGaussian()
    x_dim = pair.x_dim if which == "hierarchy" else 4
    ranks = sbc_ranks(
        pair.model, pair.exact_posterior_guide, num_simulations=300, num_posterior_samples=L, seed=1,
        x_like=torch.zeros(1, x_dim),
    )  # fmt: skip
    names = list(ranks["quantity"].values)
    if which == "hierarchy":
        assert names == ["z2[0]", "z2[1]", "z1[0]", "z1[1]", "z1[2]", "|z2|", "|z1|", LOG_LIKELIHOOD]
    u = sbc_uniformity(ranks)
    assert float(u["chi2_p_value"].min()) > 1e-3 / len(names), u["chi2_p_value"].values
    if which == "hierarchy":
        only = sbc_ranks(
            pair.model, pair.exact_posterior_guide, num_simulations=20, seed=1, latent_sites=["z1"],
            x_like=torch.zeros(1, x_dim),
        )  # fmt: skip
        assert list(only["quantity"].values) == ["z1[0]", "z1[1]", "z1[2]", "|z1|", LOG_LIKELIHOOD]


def test_the_simultaneous_band_has_its_coverage_and_the_statistics_their_size():
    """Uniform ranks drawn directly, 2000 independent quantities: the fraction leaving the 95%
    band, and of chi-square p-values below 0.05, are 0.05 within 4 binomial se (the band is
    conservative by the discreteness of the counts, so only a little below)."""
    rng = np.random.default_rng(11)
    q = 2000
    ranks = xr.Dataset(
        {"rank": (("simulation", "quantity"), rng.integers(0, L + 1, size=(N, q)))},
        coords={"quantity": [f"u[{i}]" for i in range(q)]},
        attrs={"num_posterior_samples": L},
    )
    u = sbc_uniformity(ranks)
    assert 0 < u.attrs["pointwise_level"] < 0.05
    se = math.sqrt(0.05 * 0.95 / q)
    assert abs(float(u["outside_band"].mean()) - 0.05) < 4 * se
    assert abs(float((u["chi2_p_value"] < 0.05).mean()) - 0.05) < 4 * se
    assert abs(float((u["ecdf_p_value"] <= 0.05).mean()) - 0.05) < 4 * se
    # leaving the band is rejecting with the band's own p-value at 1 - level (up to ties at gamma)
    agree = (u["outside_band"] == (u["ecdf_p_value"] <= 0.05)).mean()
    assert float(agree) > 0.99
    # the band is the same whatever the ranks: a function of (N, L, level, simulations, band_seed)
    again = sbc_uniformity(ranks.isel(quantity=slice(0, 3)))
    np.testing.assert_array_equal(again["band_lower"].values, u["band_lower"].values)


def test_the_caller_random_state_is_left_as_found_and_the_seed_fixes_the_ranks(vae):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = ranks_of(vae, vae.exact_posterior_guide, seed=7, num_simulations=50)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    torch.randn(10)  # the caller's stream moves on: the ranks do not
    b = ranks_of(vae, vae.exact_posterior_guide, seed=7, num_simulations=50)
    xr.testing.assert_identical(a, b)
    c = ranks_of(vae, vae.exact_posterior_guide, seed=8, num_simulations=50)
    assert not np.array_equal(a["rank"].values, c["rank"].values)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    sbc_uniformity(a, band_seed=123)  # the band's simulations use their own generator
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_bad_arguments_are_named(vae):
    with pytest.raises(ValueError, match="latent_sites"):
        sbc_ranks(vae.model, vae.guide, num_simulations=5, seed=0, latent_sites=["w"])
    with pytest.raises(ValueError, match="num_simulations"):
        sbc_ranks(vae.model, vae.guide, num_simulations=0, seed=0)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="x_like"):
        sbc_ranks(model, vae.guide, num_simulations=5, seed=0)
    ranks = ranks_of(vae, vae.guide, seed=0, num_simulations=20)
    with pytest.raises(ValueError, match="levels"):
        coverage(ranks, [0.0, 0.5])
    with pytest.raises(ValueError, match="num_bins"):
        sbc_uniformity(ranks, num_bins=L + 2)


def test_plot_has_one_panel_per_quantity_and_returns_a_figure(vae):
    u = sbc_uniformity(ranks_of(vae, gaussian_guide(vae, scale=0.3), seed=0, num_simulations=100))
    fig = plot_sbc_ecdf(u)
    assert isinstance(fig, Figure)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split("  (")[0] for ax in visible] == list(u["quantity"].values)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_ecdf_p_values_floor_is_printed_as_a_bound(vae):
    """(1 + 0) / (1 + B) is the smallest ECDF p-value B band simulations can give: an upper bound
    ("≤ 1.0e-04" at B = 10000), not an estimate; one above it is a plain estimate."""
    assert format_ecdf_p_value(1 / 10001, 10000) == "≤ 1.0e-04"
    assert format_ecdf_p_value(2 / 10001, 10000) == "2.0e-04"
    assert format_ecdf_p_value(1 / 101, 100) == "≤ 0.010" and format_ecdf_p_value(0.5, 100) == "0.500"
    import matplotlib.pyplot as plt

    # a guide 0.3 times too narrow: every quantity far outside the band, its p-value at the floor
    u = sbc_uniformity(ranks_of(vae, gaussian_guide(vae, scale=0.3), seed=0, num_simulations=200))
    floor = 1 / (1 + u.attrs["num_band_simulations"])
    assert np.allclose(u["ecdf_p_value"].values, floor)
    for fig in (plot_sbc_ecdf(u), plot_sbc_ecdf(u, compare={"other": u})):
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert len(titles) == u.sizes["quantity"]
        assert all(t.count("≤ 1.0e-04") == (2 if "other" in t else 1) for t in titles), titles
        assert not any("0.0001" in t for t in titles), titles
        plt.close(fig)
    # three posteriors' p-values at the floor, the widest title: inside the figure (QA: cut at its right edge)
    fig = plot_sbc_ecdf(u, compare={"mean-field q*": u, "SIR K=100": u}, label="guide q(z|x)")
    fig.canvas.draw()
    edge = fig.bbox.x1
    for ax in fig.axes:
        if ax.get_visible() and ax.get_title():
            assert ax.title.get_window_extent().x1 <= edge, ax.get_title()
    plt.close(fig)


COLOURS = {"blue": "#1f4e79", "red": "#c0392b", "green": "#2e8b57", "purple": "#7b3fa0", "orange": "#d35400"}
STYLES = {"solid": "-", "dashed": "--", "dotted": ":", "dash-dot": "-."}


def test_the_docs_describe_the_sbc_figures_colours_as_drawn(vae):
    """docs/calibration.md names each posterior's colour and line style; the figure draws them."""
    import re
    from pathlib import Path

    import matplotlib.pyplot as plt

    docs = " ".join((Path(__file__).parents[2] / "docs" / "calibration.md").read_text().split())
    alone = re.search(r"With the guide alone its curve is (\w+), or (\w+) when it leaves the band", docs)
    order = re.search(
        r"the guide (\S+) (\w+), then, in the order refined q, mean-field q\\\*, SIR, those drawn take "
        r"(\S+) (\w+), (\S+) (\w+) and (\S+) (\w+)",
        docs,
    )
    assert alone and order, "docs/calibration.md no longer describes the SBC figure's colours"
    inside = sbc_uniformity(ranks_of(vae, gaussian_guide(vae), seed=0, num_simulations=100))
    outside = sbc_uniformity(ranks_of(vae, gaussian_guide(vae, scale=0.3), seed=0, num_simulations=100))
    assert not inside["outside_band"].values[0] and outside["outside_band"].values[0]
    for u, colour in ((inside, alone[1]), (outside, alone[2])):
        fig = plot_sbc_ecdf(u)
        assert fig.axes[0].get_lines()[0].get_color() == COLOURS[colour]
        plt.close(fig)
    names = ["guide q(z|x)", "refined K=5", "mean-field q*", "SIR K=100"]
    fig = plot_sbc_ecdf(inside, compare={name: inside for name in names[1:]}, label=names[0])
    drawn = {line.get_label(): line for line in fig.axes[0].get_lines()}
    words = order.groups()
    for k, name in enumerate(names):
        style, colour = words[2 * k], words[2 * k + 1]
        assert (drawn[name].get_linestyle(), drawn[name].get_color()) == (STYLES[style], COLOURS[colour]), name
    plt.close(fig)


def test_the_sbc_figure_says_which_latent_dimensions_it_leaves_out(vae):
    import matplotlib.pyplot as plt

    u = sbc_uniformity(ranks_of(vae, gaussian_guide(vae), seed=0, num_simulations=50))
    dims = [str(q) for q, k in zip(u["quantity"].values, u["kind"].values) if k == "dimension"]
    assert dims == ["z[0]", "z[1]"]
    fig = plot_sbc_ecdf(u, max_dimensions=1)
    panels = [ax.get_title().split("  (")[0] for ax in fig.axes if ax.get_visible()]
    assert "z[1]" not in panels and "1 more latent dimension (z[1]) left out" in fig.get_suptitle()
    plt.close(fig)
    fig = plot_sbc_ecdf(u)  # every dimension drawn: nothing to say
    assert "left out" not in fig.get_suptitle()
    plt.close(fig)


def test_chi_square_expected_counts_are_exact_for_uneven_bins():
    """L + 1 = 7 rank values in 3 bins (3, 2, 2 values): uniform counts give chi2 = 0."""
    ranks = xr.Dataset(
        {"rank": (("simulation", "quantity"), np.repeat(np.arange(7), 10)[:, None])},
        coords={"quantity": ["a"]},
        attrs={"num_posterior_samples": 6},
    )
    u = sbc_uniformity(ranks, num_bins=3)
    assert float(u["chi2"].values[0]) == pytest.approx(0.0)
    assert float(u["chi2_p_value"].values[0]) == pytest.approx(stats.chi2.sf(0.0, 2))
