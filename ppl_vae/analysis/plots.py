"""Figures for a fitted model (seaborn/matplotlib). Every function returns a Figure.

Nothing is shown: the Agg backend is selected here so figures render without a display,
and callers save or embed them (:mod:`ppl_vae.analysis.report`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from ppl_vae.analysis.gaps import LABELS  # noqa: E402


def _as_numpy(t: Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def plot_training_curves(history: xr.Dataset) -> Figure:
    """Train and test ELBO per epoch (nats per datapoint) from a run's history."""
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    names = [v for v in history.data_vars if "elbo" in str(v) and "epoch" in history[v].dims]
    if not names or not history.sizes.get("epoch"):
        ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    frame = history[names].to_dataframe().reset_index().melt(id_vars="epoch", var_name="series", value_name="ELBO")
    sns.lineplot(frame, x="epoch", y="ELBO", hue="series", marker="o", ax=ax)
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.set_title("Training curves")
    return fig


def plot_gap_distributions(gaps: xr.Dataset) -> Figure:
    """Histograms over datapoints of the approximation and amortization gaps (Cremer et al. 2018)."""
    names = ["approximation_gap", "amortization_gap"]
    frame = pd.DataFrame({LABELS[n]: gaps[n].values for n in names}).melt(var_name="gap", value_name="nats")
    fig, ax = plt.subplots(figsize=(6.5, 3.5), layout="constrained")
    sns.histplot(frame, x="nats", hue="gap", element="step", stat="count", common_bins=True, ax=ax)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_title(f"Per-datapoint gaps ({gaps.sizes['datapoint']} datapoints)")
    return fig


def plot_estimators(gaps: xr.Dataset) -> Figure:
    """Mean of each estimator over datapoints with a 2-standard-error bar."""
    est = gaps["estimate"]
    n = gaps.sizes["datapoint"]
    means = est.mean("datapoint").values
    ses = est.std("datapoint", ddof=1).values / math.sqrt(n) if n > 1 else np.zeros_like(means)
    labels = [LABELS[str(e)] for e in est.estimator.values]
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(labels) + 1.2), layout="constrained")
    ax.errorbar(means, np.arange(len(labels)), xerr=2 * ses, fmt="o", capsize=3)
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("nats per datapoint (mean ± 2 se)")
    ax.set_title("Estimators")
    return fig


def plot_kl_per_dimension(diagnostics: xr.Dataset) -> Figure:
    """Mean KL per latent dimension, coloured by whether the unit is active (Burda et al. 2015)."""
    frame = pd.DataFrame({
        "latent": diagnostics.latent.values,
        "KL (nats)": diagnostics["kl"].values,
        "activity": diagnostics["activity"].values,
        "unit": np.where(diagnostics["active"].values, "active", "inactive"),
    })
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    palette = {"active": "tab:blue", "inactive": "tab:gray"}
    sns.barplot(frame, x="latent", y="KL (nats)", hue="unit", palette=palette, dodge=False, ax=axes[0])
    axes[0].set_title("KL(q(z_u|x) || p(z_u)) per dimension")
    sns.barplot(frame, x="latent", y="activity", hue="unit", palette=palette, dodge=False, ax=axes[1])
    axes[1].axhline(diagnostics.attrs.get("threshold", 0.01), color="black", lw=0.8, ls="--")
    axes[1].set_yscale("log")
    axes[1].set_title(f"Activity Cov_x(E_q[z_u]): {diagnostics.attrs.get('num_active', '?')} active")
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
        fig, axes = plt.subplots(len(rows), ncol, figsize=(0.9 * ncol + 0.5, 0.95 * len(rows) + 0.4),
                                 squeeze=False, layout="constrained")
        for r, (batch, name) in enumerate(zip(images, row_titles)):
            for c in range(ncol):
                axes[r, c].imshow(batch[c], cmap="gray", vmin=0.0, vmax=1.0)
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
            axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    else:  # not images: draw each datapoint as a line over its features
        fig, axes = plt.subplots(1, ncol, figsize=(1.6 * ncol, 2.0), squeeze=False, layout="constrained")
        for c in range(ncol):
            for batch, name in zip(rows, row_titles):
                axes[0, c].plot(batch[c].reshape(-1), lw=0.8, label=name)
            axes[0, c].set_xticks([])
        axes[0, 0].legend(fontsize="small")
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
    return _draw_rows([s[i * ncol : (i + 1) * ncol] for i in range(nrow)], [""] * nrow, "Samples from the prior")


def plot_manifold(decode: Callable[[Tensor], Tensor], num_per_axis: int = 15, *, device: str | torch.device = "cpu") -> Figure:
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
    canvas = np.ones((num_per_axis * h, num_per_axis * w))
    for k, im in enumerate(images):
        r, c = divmod(k, num_per_axis)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    fig, ax = plt.subplots(figsize=(6, 6 * h / w), layout="constrained")
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Learned manifold, z = Φ⁻¹(u) on a grid (AEVB fig. 4)")
    return fig


def plot_latent_scatter(loc: Tensor, labels: Optional[Tensor] = None) -> Figure:
    """Encoder means E_q[z|x] of 2-D latents, coloured by label when given."""
    loc = _as_numpy(loc)
    if loc.ndim != 2 or loc.shape[1] != 2:
        raise ValueError(f"the latent scatter needs 2-D latents, got shape {loc.shape}")
    frame = pd.DataFrame({"z1": loc[:, 0], "z2": loc[:, 1]})
    hue = None
    if labels is not None:
        frame["label"] = _as_numpy(labels).astype(str)
        hue = "label"
    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    sns.scatterplot(frame, x="z1", y="z2", hue=hue, s=10, linewidth=0, palette="tab10" if hue else None, ax=ax)
    ax.set_title("Encoder means E_q[z|x]")
    return fig
