"""Simulation-based calibration (SBC) of an amortized guide against the model it was trained with.

If q(z|x) is the exact posterior, then for (z*, x) drawn from the model's prior predictive
(z* ~ p(z), x ~ p(x|z*)) and z_1..z_L ~ q(z|x), the rank of z* among the draws (the number of
draws below it, 0..L) is uniform on {0, ..., L}, for every scalar quantity f(z, x) computed
alike from z* and from the draws (Talts et al. 2018, "Validating Bayesian inference
algorithms with simulation-based calibration"; Modrák et al. 2023 for quantities that depend
on the data, such as the log-likelihood). A guide that is too narrow gives U-shaped ranks, one
that is too wide gives a hump, a biased one skewed ranks.

- :func:`sbc_ranks` simulates and ranks: each dimension of each continuous latent site, the
  norm ``|z|`` of each site, and ``log p(x|z)`` (the model's observed-site log-density).
- :func:`sbc_uniformity` tests the ranks: a chi-square statistic over bins of ranks, and the
  ECDF of the ranks against a *simultaneous* band (Säilynoja, Bürkner & Vehtari 2022,
  "Graphical test for discrete uniformity and its applications in goodness-of-fit evaluation
  and multiple sample comparison"), with the band's own p-value.
- :func:`coverage` gives the empirical coverage of central intervals of the L draws.
- :func:`plot_sbc_ecdf` draws the ECDF differences and their bands, one panel per quantity.

The library never reads a run directory here: the caller passes a model and a guide.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import xarray as xr
from scipy import stats
from torch import Tensor

from ppl_vae.inference.ais import simulate_data
from ppl_vae.inference.latents import guide_layout, log_prior_and_likelihood, model_layout, sample_guide
from ppl_vae.inference.modes import check_positive, in_eval_mode, rows, seeded

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SBC_REFERENCE = (
    "Talts, Betancourt, Simpson, Vehtari & Gelman (2018), Validating Bayesian inference algorithms "
    "with simulation-based calibration"
)
ECDF_REFERENCE = (
    "Säilynoja, Bürkner & Vehtari (2022), Graphical test for discrete uniformity and its applications "
    "in goodness-of-fit evaluation and multiple sample comparison"
)
LOG_LIKELIHOOD = "log p(x|z)"
"""The name of the log-likelihood quantity in :func:`sbc_ranks`' ``quantity`` coordinate."""


def _x_template(model: Callable, x_like: Optional[Tensor]) -> Tensor:
    """One datapoint's worth of ``x`` (``(1, *event_shape)``) to shape the simulated data."""
    if x_like is not None:
        if not torch.is_tensor(x_like) or x_like.dim() < 1 or x_like.shape[0] < 1:
            raise ValueError("x_like must be a tensor with at least one datapoint (row)")
        return x_like[:1]
    owner = getattr(model, "__self__", None)
    event_shape = getattr(owner, "event_shape", None)  # ppl_vae.models.VAE declares its datapoint shape
    if event_shape is None or not isinstance(owner, torch.nn.Module):
        raise ValueError("x_like is needed: a tensor whose rows have the shape of one datapoint of the model")
    param = next(owner.parameters(), None)
    device = param.device if param is not None else None
    return torch.zeros((1, *event_shape), device=device)


def _quantities(layout_sites: Sequence[Any]) -> Tuple[List[str], List[str], List[str]]:
    """(name, site, kind) of every ranked quantity, in the order of the rank columns."""
    names, sites, kinds = [], [], []
    for site in layout_sites:
        if site.event_shape:
            names += [f"{site.name}[{i}]" for i in range(site.size)]
        else:
            names.append(site.name)
        sites += [site.name] * site.size
        kinds += ["dimension"] * site.size
    for site in layout_sites:
        names.append(f"|{site.name}|")
        sites.append(site.name)
        kinds.append("norm")
    names.append(LOG_LIKELIHOOD)
    sites.append("x")
    kinds.append("log_likelihood")
    return names, sites, kinds


@torch.no_grad()
@in_eval_mode("model", "guide")
def sbc_ranks(
    model: Callable,
    guide: Callable,
    *,
    num_simulations: int,
    num_posterior_samples: int = 99,
    seed: int,
    latent_sites: Optional[Sequence[str]] = None,
    x_like: Optional[Tensor] = None,
    batch_size: int = 256,
    **kwargs: Any,
) -> xr.Dataset:
    """SBC ranks of the guide q(z|x) against the model's prior predictive (Talts et al. 2018).

    ``num_simulations`` pairs (z*, x) are drawn from the model with its observed site ``"x"``
    unconditioned (:func:`ppl_vae.inference.ais.simulate_data`); for each x, the guide draws
    ``L = num_posterior_samples`` latents, and the rank of z* among them (the number of draws
    below it, in 0..L) is recorded for each dimension of each continuous latent site (or of
    ``latent_sites``), for each site's Euclidean norm ``|z|``, and for ``log p(x|z)``
    (at z* vs at each draw; discrete sites the model enumerates are summed out). With an exact
    guide every rank is uniform on {0, ..., L}; ``L + 1`` dividing evenly into bins (the
    default 99 gives 100 rank values) keeps histograms simple.

    ``x_like``: a tensor whose rows have the shape of one datapoint (only its shape, dtype
    and device are used); optional for a :class:`ppl_vae.models.VAE`'s own ``model``, which
    declares its ``event_shape``. ``kwargs`` go to model and guide; a tensor with
    ``num_simulations`` rows (labels ``y``) is sliced with the simulations. The draws come
    from ``seed`` alone (the caller's random state is left as found); the same ``seed`` and
    ``batch_size`` give identical ranks.

    Returns a Dataset with ``rank`` ``(simulation, quantity)`` (int), coordinates ``quantity``
    (``"z[0]"``, ..., ``"|z|"``, ``"log p(x|z)"``), ``site`` and ``kind`` (``"dimension"``,
    ``"norm"``, ``"log_likelihood"``) per quantity; attrs ``num_posterior_samples``, ``seed``,
    ``reference``.
    """
    check_positive("num_simulations", num_simulations)
    check_positive("num_posterior_samples", num_posterior_samples)
    check_positive("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    template = _x_template(model, x_like)
    n, L = int(num_simulations), int(num_posterior_samples)

    def shaped(count: int) -> Tensor:
        return template.expand((count,) + tuple(template.shape[1:]))

    probe_kwargs = {k: rows(v, n, slice(0, 1)) for k, v in kwargs.items()}
    layout = model_layout(model, shaped(1), **probe_kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site in the 'data' plate to rank")
    guide_layout(guide, shaped(1), layout, **probe_kwargs)
    if latent_sites is None:
        ranked = list(layout.sites)
    else:
        unknown = [s for s in latent_sites if s not in layout.names]
        if unknown or not latent_sites:
            raise ValueError(
                f"latent_sites must name latent sites of the model ({', '.join(layout.names)}); got {list(latent_sites)}"
            )
        ranked = [s for s in layout.sites if s.name in latent_sites]
    columns = np.concatenate(
        [np.arange(start, start + s.size) for s, start in zip(layout.sites, layout.offsets) if s in ranked]
    )
    names, sites, kinds = _quantities(ranked)

    blocks = []
    with seeded(int(seed), template.device):
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            count = sl.stop - sl.start
            kw = {k: rows(v, n, sl) for k, v in kwargs.items()}
            x, z_star = simulate_data(model, shaped(count), seed=None, **kw)  # (B, ...), (B, size)
            draws, _ = sample_guide(model, guide, x, L, **kw)
            z = layout.join({s: draws[s] for s in layout.names}, 2)  # (L, B, size)
            # per-quantity values at z* (B, Q) and at the draws (L, B, Q)
            true_parts = [z_star[:, columns]]
            draw_parts = [z[..., columns]]
            for site in ranked:
                i = layout.names.index(site.name)
                cols = slice(layout.offsets[i], layout.offsets[i] + site.size)
                true_parts.append(z_star[:, cols].norm(dim=-1, keepdim=True))
                draw_parts.append(z[..., cols].norm(dim=-1, keepdim=True))
            _, lik_star = log_prior_and_likelihood(model, x, layout.split(z_star), layout=layout, **kw)
            _, lik_draws = log_prior_and_likelihood(model, x, layout.split(z), layout=layout, **kw)
            true_parts.append(lik_star.reshape(count, 1))
            draw_parts.append(lik_draws.reshape(L, count, 1))
            truth, sampled = torch.cat(true_parts, -1), torch.cat(draw_parts, -1)
            blocks.append((sampled < truth).sum(0).cpu().numpy().astype(np.int64))
    rank = np.concatenate(blocks, 0)
    return xr.Dataset(
        {"rank": (("simulation", "quantity"), rank)},
        coords={
            "simulation": np.arange(n),
            "quantity": np.asarray(names, dtype=object),
            "site": ("quantity", np.asarray(sites, dtype=object)),
            "kind": ("quantity", np.asarray(kinds, dtype=object)),
        },
        attrs={
            "num_posterior_samples": L,
            "num_simulations": n,
            "seed": int(seed),
            "batch_size": int(batch_size),
            "reference": SBC_REFERENCE,
        },
    )


# ---------------------------------------------------------------------------------------------
# Uniformity: chi-square over bins, and the ECDF with simultaneous bands


def _num_ranks(ranks: xr.Dataset) -> int:
    """L + 1, the number of possible rank values."""
    if "rank" not in ranks or "num_posterior_samples" not in ranks.attrs:
        raise ValueError("ranks must be the Dataset sbc_ranks returns (a 'rank' variable, num_posterior_samples)")
    return int(ranks.attrs["num_posterior_samples"]) + 1


def _pointwise_p_values(num_simulations: int, probs: np.ndarray) -> np.ndarray:
    """Two-sided binomial tail probabilities ``(K, N + 1)``: for evaluation point k and count c
    of ranks below it, min(1, 2 min(P(C <= c), P(C >= c))) with C ~ Binomial(N, probs[k])."""
    c = np.arange(num_simulations + 1)[None, :]
    p = probs[:, None]
    return np.minimum(
        1.0, 2.0 * np.minimum(stats.binom.cdf(c, num_simulations, p), stats.binom.sf(c - 1, num_simulations, p))
    )


@functools.lru_cache(maxsize=16)
def _band(
    num_simulations: int, num_ranks: int, level: float, num_band_simulations: int, band_seed: int
) -> Tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, probs, gamma, lower, upper, sorted simulated minima) of the simultaneous band.

    Evaluation points are rank thresholds t_k (the ECDF counts ranks < t_k), at most
    min(L + 1, N) of them, evenly spread; under uniformity the count is Binomial(N, t_k / (L + 1)).
    Säilynoja et al. (2022, sec. 2.2): simulate ``num_band_simulations`` samples of N uniform
    ranks, take for each the smallest pointwise two-sided tail probability over the points, and
    set the pointwise level gamma to the (1 - level) quantile of these minima (the lower order
    statistic, so at most 1 - level of uniform samples leave the band). The band at point k is
    every count whose tail probability is at least gamma.
    """
    num_points = min(num_ranks, num_simulations)
    thresholds = np.unique(np.round(np.arange(1, num_points) * num_ranks / num_points).astype(np.int64))
    thresholds = thresholds[(thresholds > 0) & (thresholds < num_ranks)]
    probs = thresholds / num_ranks
    table = _pointwise_p_values(num_simulations, probs)  # (K, N + 1)
    rng = np.random.default_rng(band_seed)  # its own generator: the caller's NumPy state is untouched
    chunk = max(1, int(2e7 // max(num_simulations, num_ranks)))
    minima = []
    for start in range(0, num_band_simulations, chunk):
        m = min(chunk, num_band_simulations - start)
        r = rng.integers(0, num_ranks, size=(m, num_simulations))
        counts = _counts_below(r, num_ranks, thresholds)  # (m, K)
        minima.append(table[np.arange(len(thresholds))[None, :], counts].min(1))
    mins = np.sort(np.concatenate(minima))
    gamma = float(mins[int(math.floor((1.0 - level) * num_band_simulations))])
    inside = table >= gamma
    lower = inside.argmax(1)
    upper = num_simulations - inside[:, ::-1].argmax(1)
    return thresholds, probs, gamma, lower, upper, mins


def _counts_below(r: np.ndarray, num_ranks: int, thresholds: np.ndarray) -> np.ndarray:
    """For ranks ``r`` ``(M, N)`` (rows are samples): the number below each threshold, ``(M, K)``."""
    m = r.shape[0]
    hist = np.bincount((r + num_ranks * np.arange(m)[:, None]).ravel(), minlength=m * num_ranks)
    cum = np.cumsum(hist.reshape(m, num_ranks), 1)
    return cum[:, thresholds - 1]


def sbc_uniformity(
    ranks: xr.Dataset,
    *,
    num_bins: Optional[int] = None,
    level: float = 0.95,
    num_band_simulations: int = 10000,
    band_seed: int = 0,
) -> xr.Dataset:
    """Tests of the uniformity of SBC ranks (from :func:`sbc_ranks`), per quantity.

    - ``chi2``, ``chi2_p_value``: Pearson's chi-square over ``num_bins`` bins of ranks (default
      min(20, L + 1, N // 10), at least 2), each bin's expected count exact for the discrete
      uniform on {0, ..., L} (Talts et al. 2018, sec. 4.1).
    - ``ecdf_diff`` ``(quantity, fractional_rank)``: the ECDF of the ranks minus the uniform CDF at
      rank thresholds t/(L + 1), with ``band_lower``/``band_upper`` ``(fractional_rank)``: a band
      that a uniform ECDF stays inside at every point at once with probability ``level``
      (Säilynoja et al. 2022; the pointwise level is adjusted by simulating
      ``num_band_simulations`` uniform rank samples with ``band_seed``, see :func:`_band`).
    - ``outside_band``: whether the ECDF leaves the band somewhere; ``ecdf_p_value``: the Monte
      Carlo p-value of the smallest pointwise tail probability against the same simulations,
      (1 + #{simulated <= observed}) / (1 + num_band_simulations), a valid p-value whose
      rejection at 1 - level matches leaving the band.

    The result depends only on the ranks and the arguments (no global random state).
    """
    num_ranks = _num_ranks(ranks)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    check_positive("num_band_simulations", num_band_simulations)
    r = np.asarray(ranks["rank"].transpose("simulation", "quantity").values, dtype=np.int64)
    n, q = r.shape
    if n < 2:
        raise ValueError("sbc_uniformity needs at least 2 simulations")
    if r.min() < 0 or r.max() >= num_ranks:
        raise ValueError(f"ranks must lie in 0..{num_ranks - 1} (num_posterior_samples)")
    if num_bins is None:
        num_bins = max(2, min(20, num_ranks, n // 10))
    check_positive("num_bins", num_bins)
    if num_bins < 2 or num_bins > num_ranks:
        raise ValueError(f"num_bins must be in 2..{num_ranks} (L + 1), got {num_bins}")

    # chi-square: bin b holds ranks r with floor(r * B / (L + 1)) == b
    bin_of_rank = np.arange(num_ranks) * num_bins // num_ranks
    expected = n * np.bincount(bin_of_rank, minlength=num_bins) / num_ranks
    observed = np.stack([np.bincount(bin_of_rank[r[:, j]], minlength=num_bins) for j in range(q)])
    chi2 = ((observed - expected) ** 2 / expected).sum(1)
    chi2_p = stats.chi2.sf(chi2, num_bins - 1)

    thresholds, probs, gamma, lower, upper, mins = _band(
        n, num_ranks, float(level), int(num_band_simulations), int(band_seed)
    )
    counts = _counts_below(r.T, num_ranks, thresholds)  # (Q, K)
    table = _pointwise_p_values(n, probs)
    pointwise = table[np.arange(len(thresholds))[None, :], counts]  # (Q, K)
    observed_min = pointwise.min(1)
    outside = observed_min < gamma
    ecdf_p = (1 + np.searchsorted(mins, observed_min, side="right")) / (1 + len(mins))

    coords = {k: v for k, v in ranks.coords.items() if v.dims == ("quantity",)}
    coords["fractional_rank"] = probs
    coords["rank_threshold"] = ("fractional_rank", thresholds)
    return xr.Dataset(
        {
            "chi2": ("quantity", chi2),
            "chi2_p_value": ("quantity", chi2_p),
            "ecdf_diff": (("quantity", "fractional_rank"), counts / n - probs[None, :]),
            "band_lower": ("fractional_rank", lower / n - probs),
            "band_upper": ("fractional_rank", upper / n - probs),
            "outside_band": ("quantity", outside),
            "ecdf_p_value": ("quantity", ecdf_p),
        },
        coords=coords,
        attrs={
            "num_posterior_samples": num_ranks - 1,
            "num_simulations": n,
            "num_bins": int(num_bins),
            "chi2_df": int(num_bins - 1),
            "level": float(level),
            "pointwise_level": gamma,
            "num_band_simulations": int(num_band_simulations),
            "band_seed": int(band_seed),
            "reference": f"{SBC_REFERENCE}; {ECDF_REFERENCE}",
        },
    )


def coverage(ranks: xr.Dataset, levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95)) -> xr.Dataset:
    """Empirical coverage of central intervals of the L draws, per level and quantity.

    The central interval at level a excludes k = floor((1 - a)(L + 1) / 2) draws on each side:
    it is (z_(k), z_(L+1-k)) in order statistics, and contains z* exactly when its rank is in
    k..L-k, with probability ``nominal`` = (L + 1 - 2k) / (L + 1) >= a under calibration
    (equal to a when (1 - a)(L + 1) is an even integer, e.g. L = 99 and a = 0.5, 0.8, 0.9). Returns ``coverage``, its binomial standard error ``coverage_se`` =
    sqrt(c (1 - c) / N), and ``nominal`` ``(level)``, over dims ``(level, quantity)``.
    """
    num_ranks = _num_ranks(ranks)
    levels_arr = np.asarray(list(levels), dtype=np.float64)
    if levels_arr.ndim != 1 or not len(levels_arr) or np.any((levels_arr <= 0) | (levels_arr >= 1)):
        raise ValueError(f"levels must be numbers in (0, 1), got {list(levels)}")
    r = np.asarray(ranks["rank"].transpose("simulation", "quantity").values)
    n = r.shape[0]
    # the widest exclusion with nominal >= level (rounded first: 0.1 * 100 / 2 must give 5, not 4)
    k = np.floor(np.round((1.0 - levels_arr) * num_ranks / 2.0, 9)).astype(np.int64)
    if np.any(num_ranks - 2 * k <= 0):
        raise ValueError("a level is too low for num_posterior_samples: its central interval holds no rank")
    inside = (r[None] >= k[:, None, None]) & (r[None] <= (num_ranks - 1 - k)[:, None, None])  # (level, N, Q)
    cov = inside.mean(1)
    coords = {k_: v for k_, v in ranks.coords.items() if v.dims == ("quantity",)}
    coords["level"] = levels_arr
    return xr.Dataset(
        {
            "coverage": (("level", "quantity"), cov),
            "coverage_se": (("level", "quantity"), np.sqrt(cov * (1 - cov) / n)),
            "nominal": ("level", (num_ranks - 2 * k) / num_ranks),
        },
        coords=coords,
        attrs={"num_posterior_samples": num_ranks - 1, "num_simulations": n, "reference": SBC_REFERENCE},
    )


def plot_sbc_ecdf(uniformity: xr.Dataset, *, max_dimensions: int = 4, ncols: int = 3) -> Figure:
    """ECDF differences of the ranks with their simultaneous band (:func:`sbc_uniformity`), one
    panel per quantity: the first ``max_dimensions`` latent dimensions and every summary (norms,
    log-likelihood). A curve leaving the grey band rejects uniformity at the band's level."""
    from ppl_vae.analysis.plots import plt  # selects the Agg backend

    if "kind" in uniformity.coords:
        kinds = np.asarray(uniformity["kind"].values)
        dims = np.flatnonzero(kinds == "dimension")[:max_dimensions]
        chosen = np.sort(np.concatenate([dims, np.flatnonzero(kinds != "dimension")]))
    else:
        chosen = np.arange(uniformity.sizes["quantity"])[:max_dimensions]
    num = len(chosen)
    ncols = max(1, min(ncols, num))
    nrows = math.ceil(num / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False, sharex=True, layout="constrained"
    )
    frac = uniformity["fractional_rank"].values
    lower, upper = uniformity["band_lower"].values, uniformity["band_upper"].values
    for ax, j in zip(axes.flat, chosen):
        diff = uniformity["ecdf_diff"].isel(quantity=int(j)).values
        ax.fill_between(frac, lower, upper, step="mid", color="0.85", label=f"{uniformity.attrs['level']:.0%} band")
        colour = "#c0392b" if bool(uniformity["outside_band"].values[j]) else "#1f4e79"
        ax.step(frac, diff, where="mid", color=colour, lw=1.2)
        out = (diff < lower) | (diff > upper)  # where it leaves the band: a step can be too short to see
        ax.plot(frac[out], diff[out], "o", ms=2.5, color=colour)
        ax.axhline(0.0, color="0.4", lw=0.6)
        ax.set_title(f"{uniformity['quantity'].values[j]}  (p = {float(uniformity['ecdf_p_value'].values[j]):.2g})")
        ax.set_xlim(0, 1)
        low = min(float(lower.min()), float(diff.min()))
        high = max(float(upper.max()), float(diff.max()))
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
    for ax in axes.flat[num:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("fractional rank")
    for row in axes:
        row[0].set_ylabel("ECDF difference")
    fig.suptitle(
        f"SBC: {uniformity.attrs['num_simulations']} simulations, L = {uniformity.attrs['num_posterior_samples']}"
    )
    return fig


__all__ = ["LOG_LIKELIHOOD", "coverage", "plot_sbc_ecdf", "sbc_ranks", "sbc_uniformity"]
