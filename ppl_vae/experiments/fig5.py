"""Figure 5 of Kingma & Welling (2013): random samples from VAEs trained on MNIST with latent
spaces of 2, 5, 10 and 20 dimensions (E[x|z] for z ~ p(z)). A unit of work is one latent
dimension (training plus its samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import xarray as xr

from ppl_vae.experiments import common
from ppl_vae.io import write_netcdf


@dataclass
class Fig5Settings:
    """What figure 5 trains and draws."""

    dataset: str = "mnist"
    latent_dims: Tuple[int, ...] = (2, 5, 10, 20)
    hidden_dim: int = 500
    max_samples: int = 100_000
    batch_size: int = 100
    lr: float = 0.02
    num_images: int = 100
    eval_size: int = 1000
    seed: int = 0

    @classmethod
    def paper(cls) -> "Fig5Settings":
        """The paper's settings (10^7 training samples)."""
        return cls(max_samples=10_000_000, eval_size=10_000)

    def validate(self) -> None:
        common.DATA_MODELS.get(self.dataset)
        common.validate_common(
            latent_dims=self.latent_dims,
            hidden_dim=self.hidden_dim,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            lr=self.lr,
            num_images=self.num_images,
            eval_size=self.eval_size,
        )


def run(
    settings: Fig5Settings, out_dir: Path, *, data_dir: Optional[Path] = None, progress: bool = True
) -> xr.DataArray:
    """Train a VAE per missing latent dimension; writes ``fig5_z<d>.nc`` (samples), ``fig5_samples.nc``
    (all of them), ``fig5.csv``/``.nc`` (final ELBOs) and the figure. Returns the samples with
    dims ``latent_dim``, ``sample``, ``height``, ``width``."""
    from tqdm.auto import tqdm

    settings.validate()
    data = common.load_experiment_data([settings.dataset], data_dir)[settings.dataset]
    out_dir = Path(out_dir)
    common.check_settings(out_dir, settings)
    table = common.ResultTable(out_dir, "fig5", ["latent_dim"], ["latent_dim"], attrs=common.elbo_attrs)
    for latent_dim in tqdm(settings.latent_dims, disable=not progress, desc="fig5 models", unit="model"):
        path = out_dir / f"fig5_z{latent_dim}.nc"
        if table.done(latent_dim=latent_dim) and path.is_file():
            continue
        common.seed_unit(settings.seed, "fig5", settings.dataset, latent_dim)
        vae, record = common.train_aevb(
            settings.dataset,
            data,
            latent_dim,
            settings.hidden_dim,
            max_samples=settings.max_samples,
            batch_size=settings.batch_size,
            lr=settings.lr,
            eval_size=settings.eval_size,
            progress=progress,
            desc=f"{settings.dataset} z={latent_dim}",
        )
        with torch.no_grad():
            images = vae.sample(settings.num_images).reshape(settings.num_images, *data.event_shape[-2:]).numpy()
        samples = xr.DataArray(
            images.astype(np.float64),
            dims=("sample", "height", "width"),
            name="mean_image",
            attrs={"description": "E[x|z] for z ~ p(z)"},
        )
        write_netcdf(samples.to_dataset(), path)
        table.add([{"latent_dim": latent_dim, **record}])
    parts = []
    for latent_dim in settings.latent_dims:
        with xr.open_dataset(out_dir / f"fig5_z{latent_dim}.nc", engine="h5netcdf") as ds:
            parts.append(ds["mean_image"].load())
    samples = xr.concat(parts, dim=xr.DataArray(list(settings.latent_dims), dims="latent_dim", name="latent_dim"))
    write_netcdf(samples.to_dataset(), out_dir / "fig5_samples.nc")
    common.save_figure(plot(samples), out_dir, "fig5")
    return samples


def plot(samples: xr.DataArray):
    """A tiled panel of samples per latent dimension; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppl_vae.analysis.plots import show_images, tile_images

    dims = samples["latent_dim"].values
    fig, axes = plt.subplots(1, len(dims), figsize=(3.5 * len(dims), 3.8), squeeze=False)
    for ax, d in zip(axes.flat, dims):
        images = samples.sel(latent_dim=d).values
        ncols = int(np.ceil(np.sqrt(images.shape[0])))
        show_images(ax, tile_images(images, ncols))
        ax.set_title(f"{int(d)}-D latent space")
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.tight_layout()
    return fig


def summary_sections(out_dir: Path) -> List[Tuple[str, Dict[str, str]]]:
    """[(what the numbers are, {latent_dim: final train and test ELBO ± se})] from ``out_dir``'s table,
    as ``ppl-vae experiment fig5`` prints them."""
    table = common.ResultTable(Path(out_dir), "fig5", ["latent_dim"], ["latent_dim"], attrs=common.elbo_attrs)
    return common.elbo_summary(table.to_xarray(), "latent_dim")
