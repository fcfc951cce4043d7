"""Figure 2 of Kingma & Welling (2013): the variational lower bound against the number of
training samples evaluated, AEVB against wake-sleep (same encoder), train and test, for a sweep
of latent dimensions. Adagrad, minibatches of 100, one hidden layer (500 units on MNIST,
200 on Frey Face).

A unit of work is one (dataset, latent dimension, method) training curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import xarray as xr

from ppl_vae.experiments import common

PAPER_LATENT_DIMS = {"mnist": (3, 5, 10, 20, 200), "frey-face": (2, 5, 10, 20)}
PAPER_HIDDEN = {"mnist": 500, "frey-face": 200}
METHODS = ("AEVB", "wake-sleep")  # figure 2 compares these two


@dataclass
class Fig2Settings:
    """What figure 2 trains. ``latent_dims``/``hidden_dim``: None takes the paper's per dataset."""

    datasets: Tuple[str, ...] = ("mnist",)
    latent_dims: Optional[Tuple[int, ...]] = (3, 10, 20)
    hidden_dim: Optional[int] = None
    methods: Tuple[str, ...] = METHODS
    max_samples: int = 200_000
    batch_size: int = 100
    lr: float = 0.02
    num_evals: int = 12
    eval_size: int = 1000
    train_size: Optional[int] = None
    seed: int = 0

    @classmethod
    def paper(cls) -> "Fig2Settings":
        """The paper's settings: both datasets, its latent sweep, 10^8 training samples."""
        return cls(
            datasets=("mnist", "frey-face"),
            latent_dims=None,
            hidden_dim=None,
            max_samples=100_000_000,
            num_evals=30,
            eval_size=10_000,
        )

    def latent_dims_for(self, dataset: str) -> Tuple[int, ...]:
        return self.latent_dims if self.latent_dims else PAPER_LATENT_DIMS.get(dataset, (2, 5, 10, 20))

    def hidden_for(self, dataset: str) -> int:
        return self.hidden_dim if self.hidden_dim else PAPER_HIDDEN.get(dataset, 200)

    def validate(self) -> None:
        for d in self.datasets:
            common.DATA_MODELS.get(d)
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"methods must be among {', '.join(METHODS)}, got {m!r}")
        common.validate_common(
            latent_dims=self.latent_dims,
            hidden_dim=self.hidden_dim,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            lr=self.lr,
            num_evals=self.num_evals,
            eval_size=self.eval_size,
            train_size=self.train_size,
        )


def run(settings: Fig2Settings, out_dir: Path, *, data_dir: Optional[Path] = None, progress: bool = True) -> xr.Dataset:
    """Train every missing curve, write numbers and figure to ``out_dir``; returns the numbers.

    Numbers: ``lower_bound`` (ELBO per datapoint, nats) with dims ``dataset``, ``latent_dim``,
    ``method``, ``split`` and ``num_train_samples``.
    """
    from tqdm.auto import tqdm

    settings.validate()
    data = common.load_experiment_data(settings.datasets, data_dir, train_size=settings.train_size)
    common.check_settings(out_dir, settings)
    table = common.ResultTable(
        out_dir,
        "fig2",
        ["dataset", "latent_dim", "method"],
        ["dataset", "latent_dim", "method", "split", "num_train_samples"],
        attrs=netcdf_attrs,
    )
    units = [(d, z, m) for d in settings.datasets for z in settings.latent_dims_for(d) for m in settings.methods]
    for dataset, latent_dim, method in tqdm(units, disable=not progress, desc="fig2 curves", unit="curve"):
        if table.done(dataset=dataset, latent_dim=latent_dim, method=method):
            continue
        common.seed_unit(settings.seed, "fig2", dataset, latent_dim, method)
        ds = data[dataset]
        vae = common.build_model(dataset, ds, latent_dim, settings.hidden_for(dataset))
        records = common.train_curve(
            vae,
            ds,
            common.METHOD_NAMES[method],
            max_samples=settings.max_samples,
            batch_size=settings.batch_size,
            lr=settings.lr,
            optimizer="adagrad",
            num_evals=settings.num_evals,
            evaluate=common.elbo_evaluator(ds, settings.eval_size),
            progress=progress,
            desc=f"{dataset} z={latent_dim} {method}",
        )
        table.add(
            {
                "dataset": dataset,
                "latent_dim": latent_dim,
                "method": method,
                "split": split,
                "num_train_samples": r["num_train_samples"],
                "lower_bound": r[split],
                "lower_bound_se": r[f"{split}_se"],
            }
            for r in records
            for split in ("train", "test")
        )
    result = table.to_xarray()
    fig = plot(table.frame)
    common.save_figure(fig, out_dir, "fig2")
    return result


def netcdf_attrs(result: xr.Dataset) -> xr.Dataset:
    """``result`` with what ``lower_bound`` is in its attributes."""
    result["lower_bound"].attrs.update(
        {
            "long_name": "mean ELBO per datapoint over the first eval_size points of the split (one particle each)",
            "units": "nats",
            "kind": "Monte Carlo estimate",
            "bound": "lower bound",
            "description": "ELBO per datapoint, nats",
            "note": "Monte Carlo estimate of the ELBO, itself a lower bound on log p(x)",
        }
    )
    if "lower_bound_se" in result:  # tables written before it have none
        result["lower_bound_se"].attrs.update(
            {
                "long_name": "standard error of lower_bound: the sd of the per-datapoint ELBOs over sqrt(eval_size)",
                "units": "nats",
            }
        )
    return result


def plot(frame):
    """Lower bound vs training samples, one column per (dataset, latent dim); returns the Figure.

    Top row: every evaluation, axes fitted to all of them. Bottom row: the second half of
    training (evaluations at or after the median number of samples), zoomed to where the
    curves settle as in the paper. No plotted point lies outside its axes; the legend sits
    below the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = frame[frame["num_train_samples"] > 0]
    panels = list(frame[["dataset", "latent_dim"]].drop_duplicates().itertuples(index=False))
    ncols = max(len(panels), 1)
    fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 5.8), squeeze=False, layout="constrained")
    legend = common.CurveLegend()
    for col, (dataset, latent_dim) in enumerate(panels):
        sub = frame[(frame["dataset"] == dataset) & (frame["latent_dim"] == latent_dim)]
        late = sub[sub["num_train_samples"] >= sub["num_train_samples"].median()]
        for row, (data, what) in enumerate(((sub, "all evaluations"), (late, "second half, zoomed"))):
            ax = axes[row, col]
            sns.lineplot(
                data=data,
                x="num_train_samples",
                y="lower_bound",
                hue="method",
                style="split",
                style_order=["train", "test"],
                markers=True,
                dashes=True,
                ax=ax,
                legend=True,
            )
            legend.style(ax, f"{dataset}, $N_z$ = {latent_dim}: {what}", "lower bound (nats)")
    return legend.finish(fig)


def summary(result: xr.Dataset) -> Dict[str, float]:
    """Final lower bound per (dataset, latent_dim, method, split), as ``"key": value``."""
    return {
        f"{k['dataset']} z={int(k['latent_dim'])} {k['method']} {k['split']}": value
        for k, value, _ in common.final_values(
            result["lower_bound"].transpose("dataset", "latent_dim", "method", "split", ...)
        )
    }


def summary_sections(result: xr.Dataset) -> List[Tuple[str, Dict[str, str]]]:
    """[(what the numbers are, {curve: final lower bound ± its standard error})], as
    ``ppl-vae experiment fig2`` prints them."""
    attrs = result["lower_bound"].attrs
    heading = (
        f"final {attrs['description']} ({attrs['bound']}: {attrs['note']}; ± its standard error over the "
        "evaluated datapoints), by dataset, latent dimension, method and split:"
    )
    curves = result["lower_bound"].transpose("dataset", "latent_dim", "method", "split", ...)
    lines = {}
    for k, value, at in common.final_values(curves):
        se = (
            float(result["lower_bound_se"].sel(k).sel(num_train_samples=at)) if "lower_bound_se" in result else math.nan
        )
        key = f"{k['dataset']} z={int(k['latent_dim'])} {k['method']} {k['split']}"
        lines[key] = f"{value:.2f} ± {se:.2f}" if math.isfinite(se) else f"{value:.2f} (se not recorded)"
    return [(heading, lines)]


__all__ = ["Fig2Settings", "plot", "run", "summary", "summary_sections"]
