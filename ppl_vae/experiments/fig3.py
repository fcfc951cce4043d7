"""Figure 3 of Kingma & Welling (2013): estimated marginal likelihood against the number of
training samples evaluated, for AEVB, wake-sleep and Monte Carlo EM (HMC E-step), on MNIST with
100 hidden units and a 3-dimensional latent space, with 1000 and 50000 training points.

log p(x) is estimated with the paper's appendix-D estimator (HMC posterior samples, a fitted
Gaussian, harmonic-mean-style estimate), which needs no encoder, so it rates MCEM's models
too; the importance-weighted estimate (K samples from each model's encoder) is written beside
it. What each number is comes from the estimator registry (:mod:`ppl_vae.inference.estimators`,
declared once): the IW estimate is a stochastic *lower* bound (Burda et al. 2015); appendix D
averages q(z)/p(x, z) over posterior draws, which would make it a stochastic upper bound only
with exact posterior draws, so with HMC's it is an estimate, neither bound. Every number is
kept with its Monte Carlo standard error and the estimator's diagnostics (HMC acceptance, ESS
of the ratios, values impossible for discrete data). A unit of work is one (train size,
method) curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import xarray as xr

from ppl_vae.data.datasets import Dataset
from ppl_vae.experiments import common
from ppl_vae.inference import estimators
from ppl_vae.inference.marginal import MIN_ACCEPT_RATE
from ppl_vae.inference.stats import THRESHOLDS
from ppl_vae.models.vae import VAE

ESTIMATORS = ("appendix_d", "iw")
ESTIMATOR_NAMES = {"appendix_d": "appendix D (HMC)", "iw": "IW with the encoder"}
BOUND_WORDS = {
    "lower bound": "stochastic lower bound",
    "upper bound": "stochastic upper bound",
    "neither": "estimate, neither bound",
}

#: what each variable of fig3.nc is (``bound`` of log_marginal: per estimator, see its coordinate)
VARIABLE_ATTRS = {
    "log_marginal": {
        "long_name": "mean estimated log p(x) per datapoint over the first eval_size points of the split",
        "units": "nats",
        "kind": "Monte Carlo estimate",
    },
    "log_marginal_se": {
        "long_name": "Monte Carlo standard error of log_marginal",
        "units": "nats",
        "kind": "Monte Carlo standard error",
        "bound": "neither",
    },
    "accept_rate": {
        "long_name": "mean HMC acceptance rate after warm-up (appendix D only; NaN for iw)",
        "kind": "diagnostic",
        "bound": "neither",
    },
    "num_low_ess": {
        "long_name": "datapoints whose ratios or importance weights have a low ESS (THRESHOLDS.low_ess)",
        "kind": "diagnostic",
        "bound": "neither",
    },
    "num_impossible": {
        "long_name": "datapoints whose log p̂(x) exceeds what log p(x) can be (> 0 for discrete data); "
        "NaN where the estimator cannot tell",
        "kind": "diagnostic",
        "bound": "neither",
    },
}


def estimator_label(name: str) -> str:
    """``name`` in words with what its estimate is, read from the estimator registry."""
    return f"{ESTIMATOR_NAMES[name]}: {BOUND_WORDS[estimators.get(name).bound]}"


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
    """Per estimator and split, on the first ``eval_size`` train and test points: the mean
    estimated log p(x) (nats, ``<est>/<split>``), its Monte Carlo standard error (``.../se``)
    and the estimator's diagnostics (``.../accept_rate``, ``.../num_low_ess``,
    ``.../num_impossible``), each estimate from the registered estimator."""
    x_train, x_test = data.train[: settings.eval_size], data.test[: settings.eval_size]
    options = {
        "appendix_d": {"num_samples": settings.hmc_samples, "warmup_steps": settings.hmc_warmup},
        "iw": {"num_samples": settings.iw_samples},
    }

    def evaluate(vae: VAE) -> Dict[str, float]:
        out = {}
        for split, x in (("train", x_train), ("test", x_test)):
            for name in ESTIMATORS:
                # estimators score in eval mode and restore the module's mode
                ds = estimators.estimate(name, vae.model, vae.guide, x, **options[name]).to_dataset()
                out.update({f"{name}/{split}/{k}": v for k, v in _record(ds).items()})
        return out

    return evaluate


def _record(ds: xr.Dataset) -> Dict[str, float]:
    """The mean estimate, its Monte Carlo se and the diagnostics of one estimate's dataset."""
    nan = float("nan")
    limit = ds.attrs.get("log_px_max", "none")
    return {
        "log_marginal": float(ds["log_px"].mean()),
        "log_marginal_se": estimators.mc_se_of_mean(ds["log_px_stderr"]),
        "accept_rate": float(ds["accept_rate"].mean()) if "accept_rate" in ds else nan,
        "num_low_ess": float(THRESHOLDS.low_ess(ds["ess"].values, int(ds.attrs["num_samples"])).sum())
        if "ess" in ds
        else nan,
        "num_impossible": nan if limit == "none" else float((ds["log_px"].values > float(limit)).sum()),
    }


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
        out_dir,
        "fig3",
        ["train_size", "method"],
        ["train_size", "method", "estimator", "split", "num_train_samples"],
        attrs=netcdf_attrs,
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
                **{k: r[f"{est}/{split}/{k}"] for k in VARIABLE_ATTRS},
            }
            for r in records
            for est in ESTIMATORS
            for split in ("train", "test")
        )
    result = table.to_xarray()
    common.save_figure(plot(table.frame), out_dir, "fig3")
    return result


def plot(frame, shown=ESTIMATORS):
    """Marginal likelihood vs training samples; rows: split, columns: train size; returns the Figure.

    Colour: method; line style and marker: estimator, named in the legend as a stochastic
    upper bound (appendix D) or lower bound (IW), so the two are never read as one series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = frame[(frame["num_train_samples"] > 0) & frame["estimator"].isin(list(shown))].copy()
    frame["estimate"] = frame["estimator"].map(estimator_label)
    style_order = [estimator_label(e) for e in shown if e in set(frame["estimator"])]
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


def netcdf_attrs(result: xr.Dataset) -> xr.Dataset:
    """``result`` with what each variable is in its attributes, and each estimator's bound (read
    from the registry) as the coordinate ``estimator_bound`` along ``estimator``."""
    for name, attrs in VARIABLE_ATTRS.items():
        if name in result:
            result[name].attrs.update(attrs)
    names = [str(e) for e in result["estimator"].values]
    bounds = [estimators.get(e).bound for e in names]
    result = result.assign_coords(estimator_bound=("estimator", bounds))
    result["estimator_bound"].attrs["long_name"] = "what each estimator's log_marginal is with respect to log p(x)"
    result["log_marginal"].attrs["bound"] = "; ".join(f"{e}: {b}" for e, b in zip(names, bounds))
    return result


def summary_sections(result: xr.Dataset) -> List[Tuple[str, Dict[str, str]]]:
    """[(what the numbers are, {curve: final value ± its Monte Carlo se and flags})] per
    estimator, as ``ppl-vae experiment fig3`` prints them."""
    return [
        (
            f"final estimate of log p(x), nats per datapoint, by {estimator_label(estimator)} (mean over the "
            "evaluated points ± its Monte Carlo standard error); by training-set size N, method and split:",
            {key: _line(result, estimator, labels) for key, labels in _final(result, estimator).items()},
        )
        for estimator in ESTIMATORS
        if estimator in result["log_marginal"].estimator.values
    ]


def _final(result: xr.Dataset, estimator: str) -> Dict[str, Dict]:
    curves = result["log_marginal"].sel(estimator=estimator).transpose("train_size", "method", "split", ...)
    return {
        f"N={int(k['train_size'])} {k['method']} {k['split']}, after {int(at)} training samples": {
            **k,
            "estimator": estimator,
            "num_train_samples": at,
        }
        for k, _, at in common.final_values(curves)
    }


def _line(result: xr.Dataset, estimator: str, labels: Dict) -> str:
    """``value ± se (Monte Carlo se)``, then the diagnostics, and a flag where the estimator
    can tell the value is impossible or unreliable."""
    row = result.sel(labels)

    def get(name: str) -> float:
        return float(row[name]) if name in row else float("nan")

    value, se = get("log_marginal"), get("log_marginal_se")
    text = f"{value:.2f} ± {se:.2f} (Monte Carlo se)" if se == se else f"{value:.2f} (Monte Carlo se n/a)"
    accept, low_ess, impossible = get("accept_rate"), get("num_low_ess"), get("num_impossible")
    if accept == accept:
        text += f", HMC acceptance {accept:.2f}"
    flags = []
    if impossible == impossible and impossible > 0:
        flags.append(f"IMPOSSIBLE: log p̂(x) > 0 for {_points(impossible)}, where p(x) is a probability")
    if accept == accept and accept < MIN_ACCEPT_RATE:
        flags.append(f"UNRELIABLE: HMC acceptance below {MIN_ACCEPT_RATE:g}")
    if low_ess == low_ess and low_ess > 0:
        flags.append(f"UNRELIABLE: low ESS for {_points(low_ess)}, the estimate and its se rest on a few draws")
    if flags:
        hint = "raise --hmc-samples and --hmc-warmup" if estimator == "appendix_d" else "more IW samples (--paper)"
        text += " [" + "; ".join(flags) + f"; {hint}]"
    return text


def _points(count: float) -> str:
    return f"{int(count)} datapoint" + ("" if int(count) == 1 else "s")


def summary(result: xr.Dataset, estimator: str = "appendix_d") -> Dict[str, float]:
    """Last estimate per (train_size, method, split)."""
    curves = result["log_marginal"].sel(estimator=estimator).transpose("train_size", "method", "split", ...)
    return {
        f"N={int(k['train_size'])} {k['method']} {k['split']}, after {int(at)} training samples": value
        for k, value, at in common.final_values(curves)
    }
