"""Figure 4 of Kingma & Welling (2013): learned 2-D manifolds of Frey Face and MNIST.

A VAE with a 2-D latent space is trained with AEVB; linearly spaced coordinates of the unit
square are mapped through the inverse Gaussian CDF to z, and each cell shows E[x|z]. A unit of
work is one dataset (training plus its grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import xarray as xr
from scipy.stats import norm

from ppl_vae.experiments import common
from ppl_vae.io import write_netcdf
from ppl_vae.models.vae import VAE

PAPER_HIDDEN = {"mnist": 500, "frey-face": 200}


@dataclass
class Fig4Settings:
    """What figure 4 trains and draws; ``hidden_dim`` None takes the paper's per dataset."""

    datasets: Tuple[str, ...] = ("frey-face", "mnist")
    hidden_dim: Optional[int] = None
    max_samples: int = 100_000
    batch_size: int = 100
    lr: float = 0.02
    grid_size: int = 20
    eval_size: int = 1000
    seed: int = 0

    @classmethod
    def paper(cls) -> "Fig4Settings":
        """The paper's settings (10^7 training samples)."""
        return cls(max_samples=10_000_000, eval_size=10_000)

    def hidden_for(self, dataset: str) -> int:
        return self.hidden_dim if self.hidden_dim else PAPER_HIDDEN.get(dataset, 200)

    def validate(self) -> None:
        for d in self.datasets:
            common.DATA_MODELS.get(d)
        common.validate_common(
            hidden_dim=self.hidden_dim,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            lr=self.lr,
            grid_size=self.grid_size,
            eval_size=self.eval_size,
        )


def manifold_grid(vae: VAE, grid_size: int) -> xr.DataArray:
    """E[x|z] on a ``grid_size`` x ``grid_size`` grid z = Phi^-1(u), u linearly spaced in (0, 1).

    Dims ``row`` (z_2, top = largest), ``col`` (z_1) and the image's ``height``, ``width``.
    """
    if vae.latent_dim != 2:
        raise ValueError(f"a 2-D manifold needs latent_dim 2, got {vae.latent_dim}")
    u = np.linspace(0.5 / grid_size, 1 - 0.5 / grid_size, grid_size)
    z_axis = norm.ppf(u)
    z1, z2 = np.meshgrid(z_axis, z_axis[::-1])  # rows from the top: z_2 decreasing
    z = torch.tensor(np.stack([z1.ravel(), z2.ravel()], -1), dtype=torch.float32)
    with torch.no_grad():
        images = vae.decode(z).reshape(grid_size, grid_size, *vae.event_shape[-2:]).numpy()
    return xr.DataArray(
        images.astype(np.float64),
        dims=("row", "col", "height", "width"),
        coords={"z1": ("col", z_axis), "z2": ("row", z_axis[::-1])},
        attrs={"description": "E[x|z] at z = inverse Gaussian CDF of a regular grid"},
    )


def run(settings: Fig4Settings, out_dir: Path, *, data_dir: Optional[Path] = None, progress: bool = True):
    """Train a 2-D VAE per missing dataset; writes ``fig4_<dataset>.nc`` (the grid), ``fig4.csv``/``.nc``
    (final ELBOs) and the figure. Returns the per-dataset grids as a dict of DataArrays."""
    from tqdm.auto import tqdm

    settings.validate()
    data = common.load_experiment_data(settings.datasets, data_dir)
    out_dir = Path(out_dir)
    common.check_settings(out_dir, settings)
    table = common.ResultTable(out_dir, "fig4", ["dataset"], ["dataset"], attrs=common.elbo_attrs)
    for dataset in tqdm(settings.datasets, disable=not progress, desc="fig4 manifolds", unit="dataset"):
        if table.done(dataset=dataset) and (out_dir / f"fig4_{dataset}.nc").is_file():
            continue
        common.seed_unit(settings.seed, "fig4", dataset)
        vae, record = common.train_aevb(
            dataset,
            data[dataset],
            2,
            settings.hidden_for(dataset),
            max_samples=settings.max_samples,
            batch_size=settings.batch_size,
            lr=settings.lr,
            eval_size=settings.eval_size,
            progress=progress,
            desc=f"{dataset} z=2",
        )
        write_netcdf(
            manifold_grid(vae, settings.grid_size).to_dataset(name="mean_image"), out_dir / f"fig4_{dataset}.nc"
        )
        table.add([{"dataset": dataset, **record}])
    grids = {}
    for dataset in settings.datasets:
        with xr.open_dataset(out_dir / f"fig4_{dataset}.nc", engine="h5netcdf") as ds:
            grids[dataset] = ds["mean_image"].load()
    common.save_figure(plot(grids), out_dir, "fig4")
    return grids


def plot(grids):
    """One tiled manifold per dataset, side by side; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppl_vae.analysis.plots import show_images, tile_images

    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 5), squeeze=False)
    for ax, (dataset, grid) in zip(axes.flat, grids.items()):
        rows, cols, h, w = grid.shape
        tiles = grid.values.reshape(rows * cols, h, w)
        show_images(ax, tile_images(tiles, cols))
        ax.set_title(f"learned 2-D manifold: {dataset}")
        # each tile decodes the z at its centre: label a few of them with their values
        for axis, size, step, values, name in (
            (ax.xaxis, cols, w + 1, grid["z1"].values, "z1 (columns)"),
            (ax.yaxis, rows, h + 1, grid["z2"].values, "z2 (rows)"),
        ):
            shown = np.unique(np.linspace(0, size - 1, min(size, 5)).round().astype(int))
            axis.set_ticks([i * step + (step - 2) / 2 for i in shown], [f"{values[i]:.2f}" for i in shown])
            axis.set_label_text(f"{name}, through the inverse Gaussian CDF")
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.tight_layout()
    return fig


def summary_sections(out_dir: Path) -> List[Tuple[str, Dict[str, str]]]:
    """[(what the numbers are, {dataset: final train and test ELBO ± se})] from ``out_dir``'s table,
    as ``ppl-vae experiment fig4`` prints them."""
    table = common.ResultTable(Path(out_dir), "fig4", ["dataset"], ["dataset"], attrs=common.elbo_attrs)
    return common.elbo_summary(table.to_xarray(), "dataset")
