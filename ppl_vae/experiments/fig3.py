"""Figure 3 of Kingma & Welling (2013): estimated marginal likelihood against the number of
training samples evaluated, for AEVB, wake-sleep and Monte Carlo EM (HMC E-step), on MNIST with
100 hidden units and a 3-dimensional latent space, with 1000 and 50000 training points.

log p(x) is estimated with the paper's appendix-D estimator (HMC posterior samples, a fitted
Gaussian, harmonic-mean-style estimate), which needs no encoder, so it rates MCEM's models
too; the importance-weighted estimate (K samples from each model's encoder) is written beside
it. The two bound log p(x) from opposite sides: appendix D averages q(z)/p(x, z) over
posterior draws, an unbiased estimate of 1/p(x), so minus its log is a *stochastic upper
bound* on log p(x) (E[log p̂] >= log p(x) by Jensen); the IW estimate is a stochastic
*lower* bound (Burda et al. 2015). The figure draws both and names each. A unit of work is
one (train size, method) curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import xarray as xr

from ppl_vae.data.datasets import Dataset
from ppl_vae.experiments import common
from ppl_vae.inference.importance import iw_log_px
from ppl_vae.inference.marginal import hmc_log_marginal
from ppl_vae.models.vae import VAE

ESTIMATORS = ("appendix_d", "iw")
ESTIMATOR_LABELS = {
    "appendix_d": "appendix D (HMC): stochastic upper bound",
    "iw": "IW with the encoder: stochastic lower bound",
}


@dataclass
class Fig3Settings:
    """What figure 3 trains and how log p(x) is estimated.

    ``mcem_max_samples``: MCEM's own budget of training samples (its HMC E-step costs about 20
    times an AEVB step); None: ``max_samples``. ``hmc_samples``: HMC samples to fit the density
    and as many again for the estimate, per evaluated datapoint; ``iw_samples``: K of the IW
    estimate.
    """

    dataset: str = "mnist"
    latent_dim: int = 3
    hidden_dim: int = 100
    train_sizes: Tuple[int, ...] = (1000, 50000)
    methods: Tuple[str, ...] = ("AEVB", "wake-sleep", "MCEM")
    max_samples: int = 100_000
    mcem_max_samples: Optional[int] = 20_000
    batch_size: int = 100
    lr: float = 0.02
    num_evals: int = 5
    eval_size: int = 50
    hmc_samples: int = 30
    hmc_warmup: int = 30
    iw_samples: int = 100
    seed: int = 0

    @classmethod
    def paper(cls) -> "Fig3Settings":
        """The paper's settings: up to 10^8 training samples for every method."""
        return cls(
            max_samples=100_000_000,
            mcem_max_samples=None,
            num_evals=20,
            eval_size=1000,
            hmc_samples=500,
            hmc_warmup=200,
            iw_samples=1000,
        )

    def validate(self) -> None:
        common.DATA_MODELS.get(self.dataset)
        for m in self.methods:
            if m not in common.METHOD_NAMES:
                raise ValueError(f"methods must be among {', '.join(common.METHOD_NAMES)}, got {m!r}")
        if not 1 <= self.latent_dim <= 4:
            raise ValueError(
                f"latent_dim must be between 1 and 4 (the appendix-D estimator needs < 5), got {self.latent_dim}"
            )
        common.validate_common(
            hidden_dim=self.hidden_dim,
            train_sizes=self.train_sizes,
            max_samples=self.max_samples,
            mcem_max_samples=self.mcem_max_samples,
            batch_size=self.batch_size,
            lr=self.lr,
            num_evals=self.num_evals,
            eval_size=self.eval_size,
            hmc_samples=self.hmc_samples,
            iw_samples=self.iw_samples,
        )
        if self.hmc_samples < self.latent_dim + 2:
            raise ValueError(f"hmc_samples must be >= latent_dim + 2, got {self.hmc_samples}")


def marginal_evaluator(data: Dataset, settings: Fig3Settings) -> Callable[[VAE], Dict[str, float]]:
    """Mean estimated log p(x) (nats) on the first ``eval_size`` train and test points, both estimators."""
    x_train, x_test = data.train[: settings.eval_size], data.test[: settings.eval_size]

    def evaluate(vae: VAE) -> Dict[str, float]:
        vae.eval()
        out = {}
        for split, x in (("train", x_train), ("test", x_test)):
            out[f"appendix_d/{split}"] = float(
                hmc_log_marginal(
                    vae.model,
                    None,
                    x,
                    latent_dim=vae.latent_dim,
                    num_samples=settings.hmc_samples,
                    warmup_steps=settings.hmc_warmup,
                ).mean()
            )
            with torch.no_grad():
                out[f"iw/{split}"] = float(iw_log_px(vae.model, vae.guide, x, num_samples=settings.iw_samples).mean())
        vae.train()
        return out

    return evaluate


def run(settings: Fig3Settings, out_dir: Path, *, data_dir: Optional[Path] = None, progress: bool = True) -> xr.Dataset:
    """Train every missing curve, write numbers and figure to ``out_dir``; returns the numbers.

    Numbers: ``log_marginal`` (mean estimated log p(x) per datapoint, nats) with dims
    ``train_size``, ``method``, ``estimator`` ("appendix_d", "iw"), ``split`` and
    ``num_train_samples``.
    """
    from tqdm.auto import tqdm

    settings.validate()
    full = common.load_experiment_data([settings.dataset], data_dir)[settings.dataset]
    too_big = [n for n in settings.train_sizes if n > full.train.shape[0]]
    if too_big:
        raise ValueError(
            f"train_sizes {too_big} exceed the {full.train.shape[0]} training points of {settings.dataset}"
        )
    common.check_settings(out_dir, settings)
    table = common.ResultTable(
        out_dir, "fig3", ["train_size", "method"], ["train_size", "method", "estimator", "split", "num_train_samples"]
    )
    units = [(n, m) for n in settings.train_sizes for m in settings.methods]
    for train_size, method in tqdm(units, disable=not progress, desc="fig3 curves", unit="curve"):
        if table.done(train_size=train_size, method=method):
            continue
        common.seed_unit(settings.seed, "fig3", train_size, method)
        data = Dataset(full.name, full.train[:train_size], full.test)
        vae = common.build_model(settings.dataset, data, settings.latent_dim, settings.hidden_dim)
        budget = settings.mcem_max_samples if method == "MCEM" and settings.mcem_max_samples else settings.max_samples
        records = common.train_curve(
            vae,
            data,
            common.METHOD_NAMES[method],
            max_samples=budget,
            batch_size=settings.batch_size,
            lr=settings.lr,
            optimizer="adagrad",
            num_evals=settings.num_evals,
            evaluate=marginal_evaluator(data, settings),
            progress=progress,
            desc=f"N={train_size} {method}",
            evaluate_at_start=False,  # HMC on an untrained model says nothing and costs much
        )
        table.add(
            {
                "train_size": train_size,
                "method": method,
                "estimator": est,
                "split": split,
                "num_train_samples": r["num_train_samples"],
                "log_marginal": r[f"{est}/{split}"],
            }
            for r in records
            for est in ESTIMATORS
            for split in ("train", "test")
        )
    result = table.to_xarray()
    result["log_marginal"].attrs["description"] = "mean estimated log p(x) per datapoint, nats"
    result["log_marginal"].attrs["bound"] = "; ".join(f"{k}: {v}" for k, v in ESTIMATOR_LABELS.items())
    common.save_figure(plot(table.frame), out_dir, "fig3")
    return result


def plot(frame, estimators=ESTIMATORS):
    """Marginal likelihood vs training samples; rows: split, columns: train size; returns the Figure.

    Colour: method; line style and marker: estimator, named in the legend as a stochastic
    upper bound (appendix D) or lower bound (IW), so the two are never read as one series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = frame[(frame["num_train_samples"] > 0) & frame["estimator"].isin(list(estimators))].copy()
    frame["estimate"] = frame["estimator"].map(ESTIMATOR_LABELS)
    style_order = [ESTIMATOR_LABELS[e] for e in estimators if e in set(frame["estimator"])]
    sizes = sorted(frame["train_size"].unique())
    splits = [s for s in ("train", "test") if s in set(frame["split"])]
    ncols, nrows = max(len(sizes), 1), max(len(splits), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows), squeeze=False, layout="constrained")
    legend = common.CurveLegend()
    for r, split in enumerate(splits):
        for c, n in enumerate(sizes):
            ax = axes[r, c]
            sub = frame[(frame["train_size"] == n) & (frame["split"] == split)]
            sns.lineplot(
                data=sub,
                x="num_train_samples",
                y="log_marginal",
                hue="method",
                style="estimate",
                style_order=style_order,
                markers=True,
                ax=ax,
            )
            legend.style(ax, f"$N_{{train}}$ = {n}, {split} set", "estimated log p(x) (nats)")
    return legend.finish(fig)


def summary_sections(result: xr.Dataset) -> List[Tuple[str, Dict[str, float]]]:
    """[(what the numbers are, :func:`summary`)] per estimator, as ``ppl-vae experiment fig3`` prints them."""
    return [
        (
            f"final estimate of log p(x), nats per datapoint, by {ESTIMATOR_LABELS[estimator]}; by training-set "
            "size N, method and split:",
            summary(result, estimator),
        )
        for estimator in ESTIMATORS
        if estimator in result["log_marginal"].estimator.values
    ]


def summary(result: xr.Dataset, estimator: str = "appendix_d") -> Dict[str, float]:
    """Last estimate per (train_size, method, split)."""
    curves = result["log_marginal"].sel(estimator=estimator).transpose("train_size", "method", "split", ...)
    return {
        f"N={int(k['train_size'])} {k['method']} {k['split']}, after {int(at)} training samples": value
        for k, value, at in common.final_values(curves)
    }
