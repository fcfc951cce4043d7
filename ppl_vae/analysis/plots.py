"""Figures for a fitted model (matplotlib; seaborn where it does what matplotlib does not). Every
function returns a Figure.

Nothing is shown: the Agg backend is selected here so figures render without a display,
and callers save or embed them (:mod:`ppl_vae.reports.compare`). Conventions shared by every
figure of the library: images use :data:`IMAGE_CMAP` (dark ink on white, values in [0, 1])
through :func:`show_images`, tiles are separated by gaps drawn in :data:`TILE_GAP_COLOUR`
(:func:`tile_images`), legends sit outside the axes (:func:`legend_outside`), and no
plotted point falls outside its axes.

The figures of ``compare``'s report are drawn with matplotlib alone: importing seaborn (with
scipy.stats) took 0.63-0.68 s of every report on the benchmark machine, about a tenth of a
``compare`` on the digits. Figures that need seaborn import it when they are drawn.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from ppl_vae.analysis.gaps import LABELS  # noqa: E402

IMAGE_CMAP = "gray_r"
"""The one colour map for every image the library draws: 0 white, 1 black (ink on paper)."""
TILE_GAP_COLOUR = "#9fb8d0"
"""Colour of the gaps between tiled images: not a data value, so tiles stay distinct."""
GAP_COLOURS = ("#0173b2", "#de8f05")
"""The approximation and amortization gaps' colours (seaborn's colour-blind palette, first two)."""
UNIT_COLOURS = {"active": "#3274a1", "inactive": "#7f7f7f"}
"""Active and inactive latent units (matplotlib's tab:blue and tab:gray at seaborn's bar saturation)."""


def image_cmap() -> matplotlib.colors.Colormap:
    """:data:`IMAGE_CMAP` with NaN (the gaps of :func:`tile_images`) drawn in :data:`TILE_GAP_COLOUR`."""
    return matplotlib.colormaps[IMAGE_CMAP].with_extremes(bad=TILE_GAP_COLOUR)


def tile_images(images: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """Tile ``(N, H, W)`` images row-major into one array with ``pad``-pixel NaN gaps between tiles.

    Missing tiles of the last row are gaps too. Draw it with :func:`show_images`.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {images.shape}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    n, h, w = images.shape
    nrows = max(1, math.ceil(n / ncols))
    canvas = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad), np.nan)
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[i]
    return canvas


def show_images(ax: matplotlib.axes.Axes, image: np.ndarray) -> None:
    """Draw one image or a :func:`tile_images` canvas with the library's colour map, no ticks."""
    ax.imshow(np.clip(image, 0.0, 1.0), cmap=image_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def legend_outside(ax: matplotlib.axes.Axes, **kwargs) -> None:
    """Move an axes' legend to the right of it, where it cannot cover data (its entries and
    title kept)."""
    legend = ax.get_legend()
    if legend is None:
        return
    handles = [h for h in legend.legend_handles if h is not None]
    labels = [t.get_text() for t in legend.get_texts()]
    title = kwargs.pop("title", legend.get_title().get_text() or None)
    legend.remove()
    kwargs.update(title=title, bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.legend(handles, labels, loc="upper left", **kwargs)


def _as_numpy(t: Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def plot_training_curves(history: xr.Dataset) -> Figure:
    """Train and test ELBO per epoch (nats per datapoint) from a run's history."""
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    names = [
        v
        for v in history.data_vars
        if "elbo" in str(v) and "epoch" in history[v].dims and bool(np.isfinite(history[v].values).any())
    ]  # a series the run never recorded (val_elbo without a validation split) gets no legend entry
    if not names or not history.sizes.get("epoch"):
        ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    epochs = history["epoch"].values
    words = {"train_elbo": "train", "test_elbo": "test", "val_elbo": "validation"}
    for name in names:
        ax.plot(epochs, history[name].values, marker="o", label=words.get(str(name), str(name)))
    ax.legend(title="ELBO on")
    ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    legend_outside(ax)
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.set_title("Training curves (Monte Carlo estimates of lower bounds)", fontsize=10)
    return fig


def plot_gap_distributions(gaps: xr.Dataset, zoom_quantile: float = 0.98) -> Figure:
    """Histograms over datapoints of the approximation and amortization gaps (Cremer et al. 2018).

    Left: the central ``zoom_quantile`` of the values on a linear axis, so a few outliers do not
    squeeze the bulk into one bin (how many lie outside is written on the panel). Right: every
    datapoint on a symmetric-log axis, outliers included.
    """
    if not 0 < zoom_quantile <= 1:
        raise ValueError(f"zoom_quantile must be in (0, 1], got {zoom_quantile}")
    names = ["approximation_gap", "amortization_gap"]
    frame = pd.DataFrame({LABELS[n]: gaps[n].values for n in names}).melt(var_name="gap", value_name="nats")
    values = frame["nats"].to_numpy()
    tail = (1 - zoom_quantile) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    inside = frame[(frame["nats"] >= lo) & (frame["nats"] <= hi)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    palette = dict(zip(frame["gap"].unique(), GAP_COLOURS))
    _step_histograms(axes[0], inside, palette, np.histogram_bin_edges(inside["nats"].to_numpy(), bins="auto"))
    outside = len(frame) - len(inside)
    axes[0].set_title(
        f"central {zoom_quantile:.0%} of values ({outside} outside [{lo:.3g}, {hi:.3g}])", fontsize="medium"
    )
    # linear within ± a typical gap (a power of ten), logarithmic beyond
    width = 10.0 ** math.floor(math.log10(max(float(np.median(np.abs(values))), 1e-4)))
    _step_histograms(axes[1], frame, palette, _symlog_bins(values, width))
    axes[1].legend(title="gap")
    axes[1].set_xscale("symlog", linthresh=width, linscale=0.5)
    axes[1].set_xticks(_symlog_ticks(values, width))
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[1].set_title(f"all {gaps.sizes['datapoint']} datapoints (symmetric log axis)", fontsize="medium")
    for ax in axes:
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_xlabel("gap (nats)")
    legend_outside(axes[1])
    fig.suptitle("Per-datapoint gaps")
    return fig


def _step_histograms(ax: matplotlib.axes.Axes, frame: pd.DataFrame, palette: dict, bins: np.ndarray) -> None:
    """Counts of ``frame["nats"]`` per ``frame["gap"]`` over common ``bins``: each a lightly
    filled step outline in its colour, labelled for a legend."""
    edges = [float(b) for b in bins]
    for gap, colour in palette.items():
        values = frame.loc[frame["gap"] == gap, "nats"].to_numpy()
        ax.hist(values, bins=edges, histtype="stepfilled", color=colour, alpha=0.25, linewidth=0)
        ax.hist(values, bins=edges, histtype="step", color=colour, linewidth=1.2, label=gap)
    ax.set_ylabel("Count")


def _symlog_ticks(values: np.ndarray, width: float) -> List[float]:
    """0, ± ``width`` and the powers of ten beyond it that the values reach (at most ~6 ticks)."""
    ticks = [0.0]
    for sign, extreme in ((1, float(np.max(values))), (-1, float(np.min(values)))):
        v = width
        while sign * extreme >= v * 0.999:
            ticks.append(sign * v)
            v *= 10
    ticks = sorted(ticks)
    while len(ticks) > 7:
        ticks = ticks[::2] if 0.0 in ticks[::2] else ticks[1::2]
    return ticks


def _symlog_bins(values: np.ndarray, width: float, num: int = 40) -> np.ndarray:
    """Bin edges evenly spaced on a symlog axis with linear part ± ``width``, covering ``values``."""
    f = lambda v: np.sign(v) * np.log1p(np.abs(v) / width)  # noqa: E731
    inv = lambda u: np.sign(u) * width * np.expm1(np.abs(u))  # noqa: E731
    lo, hi = f(np.min(values)), f(np.max(values))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 1e-9 * (hi - lo)
    return inv(np.linspace(lo - pad, hi + pad, num + 1))


def plot_estimators(gaps: xr.Dataset) -> Figure:
    """Mean of each estimator over datapoints with a 2-standard-error bar, labelled with its kind."""
    from ppl_vae.analysis.gaps import BOUNDS

    est = gaps["estimate"]
    n = gaps.sizes["datapoint"]
    means = est.mean("datapoint").values
    ses = est.std("datapoint", ddof=1).values / math.sqrt(n) if n > 1 else np.zeros_like(means)
    from ppl_vae.analysis.gaps import for_evidence

    evidence = str(gaps.attrs.get("evidence", "log p(x)"))  # log p(x | y) for a model given labels
    labels = [for_evidence(f"{LABELS[str(e)]}\n({BOUNDS[str(e)]} on log p(x))", evidence) for e in est.estimator.values]
    fig, ax = plt.subplots(figsize=(7, 0.75 * len(labels) + 1.2), layout="constrained")
    ax.errorbar(means, np.arange(len(labels)), xerr=2 * ses, fmt="o", capsize=3)
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.invert_yaxis()
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("nats per datapoint (mean ± 2 se over datapoints)")
    ax.set_title("Estimators")
    return fig


def plot_kl_per_dimension(diagnostics: xr.Dataset) -> Figure:
    """Mean KL per latent dimension, coloured by whether the unit is active (Burda et al. 2015).

    With several latent sites (coordinate ``latent_site``) each site's units are one labelled
    block, separated by vertical lines, and the x-axis counts units within the site.
    """
    n = diagnostics.sizes["latent"]
    sites = diagnostics["latent_site"].values.astype(str) if "latent_site" in diagnostics.coords else np.full(n, "z")
    frame = pd.DataFrame(
        {
            "position": np.arange(n),
            "KL (nats)": diagnostics["kl"].values,
            "activity": diagnostics["activity"].values,
            "unit": np.where(diagnostics["active"].values, "active", "inactive"),
        }
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for ax, column in zip(axes, ("KL (nats)", "activity")):
        for unit, colour in UNIT_COLOURS.items():
            rows = frame[frame["unit"] == unit]
            if len(rows):
                ax.bar(rows["position"], rows[column], width=0.9, color=colour, label=unit)
        ax.set_ylabel(column)
        ax.legend(title="unit")
        starts = [0] + [i for i in range(1, n) if sites[i] != sites[i - 1]]
        for start in starts[1:]:
            ax.axvline(start - 0.5, color="black", lw=0.8)
        ticks = np.arange(n)
        if n > 20:  # a readable axis: at most about ten ticks per site
            ticks = np.concatenate([np.arange(a, b, max(1, (b - a) // 5)) for a, b in zip(starts, starts[1:] + [n])])
        ax.set_xticks(ticks)
        offsets = {name: a for a, name in zip(starts, (sites[a] for a in starts))}
        ax.set_xticklabels([str(t - offsets[sites[t]]) for t in ticks], fontsize=7)
        ax.set_xlabel(
            "latent unit"
            if len(starts) == 1
            else "latent unit, per site: "
            + ", ".join(f"{sites[a]} ({b - a})" for a, b in zip(starts, starts[1:] + [n]))
        )
        ax.set_xlim(-0.5, n - 0.5)
        if len(starts) > 1:
            for a, b in zip(starts, starts[1:] + [n]):
                ax.text(
                    (a + b - 1) / 2,
                    1.0,
                    sites[a],
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    if axes[0].get_legend() is not None:
        axes[0].get_legend().remove()
    legend_outside(axes[1])
    axes[1].axhline(diagnostics.attrs.get("threshold", 0.01), color="black", lw=0.8, ls="--")
    axes[1].set_yscale("log")
    from ppl_vae.analysis.gaps import for_evidence

    kl_title = for_evidence("KL(q(z_u|x) || p(z_u)) per dimension", str(diagnostics.attrs.get("evidence", "log p(x)")))
    axes[0].set_title(kl_title, pad=14 if len(set(sites)) > 1 else 6)
    axes[1].set_title(
        f"Activity Cov_x(E_q[z_u]): {diagnostics.attrs.get('num_active', '?')} active",
        pad=14 if len(set(sites)) > 1 else 6,
    )
    return fig


def _image_batch(x: np.ndarray) -> Optional[np.ndarray]:
    """``(N, H, W)`` images from (N, 1, H, W), (N, H, W) or square vectors; None otherwise."""
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 3:
        return x
    flat = x.reshape(x.shape[0], -1)
    side = int(round(math.sqrt(flat.shape[1])))
    if side * side == flat.shape[1] and side > 1:
        return flat.reshape(-1, side, side)
    return None


def _draw_rows(rows: Sequence[np.ndarray], row_titles: Sequence[str], title: str) -> Figure:
    images = [_image_batch(r) for r in rows]
    ncol = rows[0].shape[0]
    if all(im is not None for im in images):
        # one canvas per titled row (one in all when no row has a title) drawn by one imshow:
        # an axes per image made the 30 prior samples cost 0.6 s to draw and save
        batches = [im for im in images if im is not None]
        groups = [np.concatenate(batches)] if not any(row_titles) else batches
        fig, axes = plt.subplots(
            len(groups), 1, figsize=(0.9 * ncol + 0.5, 0.95 * len(rows) + 0.4), squeeze=False, layout="constrained"
        )
        for r, batch in enumerate(groups):
            show_images(axes[r, 0], tile_images(batch, ncol))
            if any(row_titles):
                axes[r, 0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center")
    else:  # not images: draw each datapoint as a line over its features
        fig, axes = plt.subplots(1, ncol, figsize=(1.6 * ncol, 2.0), squeeze=False, layout="constrained")
        for c in range(ncol):
            for batch, name in zip(rows, row_titles):
                axes[0, c].plot(batch[c].reshape(-1), lw=0.8, label=name)
            axes[0, c].set_xticks([])
        fig.legend(
            *axes[0, 0].get_legend_handles_labels(),
            loc="outside lower center",
            ncols=len(rows),
            fontsize="small",
            frameon=False,
        )
    fig.suptitle(title)
    return fig


def plot_reconstructions(x: Tensor, reconstruction: Tensor) -> Figure:
    """Datapoints (top) and E[x | z = E_q[z|x]] (bottom)."""
    return _draw_rows([_as_numpy(x), _as_numpy(reconstruction)], ["data", "reconstruction"], "Reconstructions")


def plot_samples(samples: Tensor, ncol: int = 10) -> Figure:
    """E[x|z] for z drawn from the prior, ``ncol`` per row."""
    s = _as_numpy(samples)
    nrow = max(1, s.shape[0] // ncol)
    s = s[: nrow * ncol]
    return _draw_rows(
        [s[i * ncol : (i + 1) * ncol] for i in range(nrow)],
        [""] * nrow,
        "Decoded prior draws: E[x|z] for z ~ p(z) (means, not draws of x)",
    )


def plot_manifold(
    decode: Callable[[Tensor], Tensor], num_per_axis: int = 15, *, device: str | torch.device = "cpu"
) -> Figure:
    """The learned 2-D manifold: E[x|z] on a grid z = Φ⁻¹(u), u evenly spaced in (0, 1) (AEVB fig. 4)."""
    if num_per_axis < 2:
        raise ValueError(f"num_per_axis must be >= 2, got {num_per_axis}")
    u = torch.linspace(0.5 / num_per_axis, 1 - 0.5 / num_per_axis, num_per_axis, dtype=torch.float64)
    grid = torch.distributions.Normal(0.0, 1.0).icdf(u).float()
    z1, z2 = torch.meshgrid(grid, grid.flip(0), indexing="xy")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1).to(device)
    with torch.no_grad():
        images = _image_batch(_as_numpy(decode(z)))
    if images is None:
        raise ValueError("the manifold plot needs image-shaped datapoints")
    h, w = images.shape[1:]
    fig, ax = plt.subplots(figsize=(6, 6 * h / w), layout="constrained")
    show_images(ax, tile_images(images, num_per_axis))
    ax.set_title("Learned manifold, z = Φ⁻¹(u) on a grid (AEVB fig. 4)")
    return fig


def plot_latent_scatter(loc: Tensor | np.ndarray, labels: Optional[Tensor] = None) -> Figure:
    """Encoder means E_q[z|x] of 2-D latents, coloured by label when given."""
    loc = _as_numpy(loc)
    if loc.ndim != 2 or loc.shape[1] != 2:
        raise ValueError(f"the latent scatter needs 2-D latents, got shape {loc.shape}")
    frame = pd.DataFrame({"z1": loc[:, 0], "z2": loc[:, 1]})
    hue, order = None, None
    if labels is not None:
        raw = _as_numpy(labels)
        frame["label"] = raw.astype(str)
        order = [str(v) for v in np.unique(raw)]
        hue = "label"
    fig, ax = plt.subplots(figsize=(6.2, 5), layout="constrained")
    import seaborn as sns  # only this figure needs it (and only for 2-D latents)

    sns.scatterplot(
        frame, x="z1", y="z2", hue=hue, s=10, linewidth=0, palette="tab10" if hue else None, hue_order=order, ax=ax
    )
    legend_outside(ax, title="label", markerscale=2)
    ax.set_title("Encoder means E_q[z|x]")
    return fig
