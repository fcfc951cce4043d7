"""Shared parts of the figure experiments: data, models, training curves, resumable results, figures.

Every experiment writes into one output folder:

- ``settings.json``: the settings the numbers were made with (a rerun with other settings into
  the same folder is refused, so finished units are never mixed with stale ones);
- ``<name>.csv`` and ``<name>.nc``: the numbers, rewritten atomically after each finished unit
  of work (one training curve, one trained model); a rerun skips the units already there;
- ``<name>.png`` and ``<name>.svg``: the figure, drawn from the numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, cast

import numpy as np
import pandas as pd
import xarray as xr

from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import DATASETS, Dataset, check_data_dir, load_dataset
from ppl_vae.errors import TrainingDiverged
from ppl_vae.inference.importance import elbo_per_datapoint
from ppl_vae.inference.training import METHODS, Callback, TrainContext, resolve_device, train
from ppl_vae.io import remove_stale_temp_files, write_figure, write_netcdf, write_text, write_with
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import build_vae
from ppl_vae.pipeline import seed_everything
from ppl_vae.registry import Registry

# Which model the paper used for each dataset, and the sub-folder a --data-dir root may hold.
DATA_MODELS: Registry[str] = Registry("experiment dataset")
DATA_MODELS.register("mnist", doc="MNIST, Bernoulli decoder on grey levels (appendix C.1)")("bernoulli_mlp")
DATA_MODELS.register("frey-face", doc="Frey Face, Gaussian decoder (appendix C.2)")("gaussian_mlp")
DATA_MODELS.register("digits", doc="scikit-learn's 8x8 digits (embedded; for quick runs)")("bernoulli_mlp")
SUBFOLDERS = {"mnist": "mnist", "frey-face": "frey_face"}

# The paper's method names in figures -> the registered training method.
METHOD_NAMES = {"AEVB": "svi", "wake-sleep": "wake-sleep", "MCEM": "mcem"}


def parse_ints(text: str, name: str) -> tuple:
    """``"3,5,10"`` -> ``(3, 5, 10)``; ValueError naming ``name`` otherwise."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must list positive integers, got {text!r}")
    return values


def dataset_dir(name: str, data_dir: Optional[Path]) -> Optional[Path]:
    """``data_dir`` itself, or its sub-folder for ``name`` (``mnist/``, ``frey_face/``) when present."""
    if data_dir is None:
        return None
    sub = Path(data_dir) / SUBFOLDERS.get(name, name)
    return sub if sub.is_dir() else Path(data_dir)


def load_experiment_data(
    names: Sequence[str], data_dir: Optional[Path], *, train_size: Optional[int] = None
) -> Dict[str, Dataset]:
    """The experiments' datasets, by name (see :data:`DATA_MODELS`). A ``data_dir`` that none of
    them reads (the embedded digits alone) is refused in one line, not recorded and ignored."""
    for name in names:
        DATA_MODELS.get(name)
    if data_dir is not None and names:
        readers = [n for n in names if getattr(DATASETS.get(n), "reads_data_dir", True)]
        if not readers:
            check_data_dir(names[0], data_dir)  # raises, naming the dataset
    return {name: load_dataset(name, dataset_dir(name, data_dir), train_size=train_size) for name in names}


def build_model(dataset: str, data: Dataset, latent_dim: int, hidden_dim: int) -> VAE:
    """The paper's MLP VAE for ``dataset`` (one hidden layer of ``hidden_dim`` tanh units)."""
    vae = build_vae(DATA_MODELS.get(dataset), data.event_shape, latent_dim=latent_dim, hidden_dim=hidden_dim)
    vae.likelihood.check_support(data.train, what=f"the training data of {dataset}")
    return vae


def seed_unit(seed: int, *key: Any) -> None:
    """Seed all RNGs from ``seed`` and a unit's key, so a resumed run redoes a unit identically."""
    text = json.dumps([seed, *[str(k) for k in key]])
    seed_everything(int.from_bytes(text.encode(), "little") % (2**31 - 1))


def eval_steps(max_samples: int, batch_size: int, num_evals: int) -> List[int]:
    """Optimizer steps (>= 1) after which to evaluate, log-spaced up to ``max_samples`` datapoints."""
    last = max(1, max_samples // batch_size)
    if num_evals == 1:
        return [last]
    steps = np.unique(np.round(np.logspace(0, math.log10(last), num_evals)).astype(int))
    return [int(s) for s in steps]


class CurveRecorder(Callback):
    """Evaluates the model after chosen optimizer steps and stops training after the last one
    (the x-axis of the paper's figures 2 and 3 is the number of training samples seen)."""

    def __init__(self, steps: Sequence[int], batch_size: int, evaluate: Callable[[VAE], Dict[str, float]]):
        self.steps = set(steps)
        self.last = max(steps)
        self.batch_size = batch_size
        self.evaluate = evaluate
        self.records: List[Dict[str, float]] = []

    def on_step_end(self, ctx: TrainContext) -> bool:
        step = ctx.state.step
        if step in self.steps:
            self.records.append({"num_train_samples": float(step * self.batch_size), **self.evaluate(ctx.vae)})
        return step >= self.last


def train_curve(
    vae: VAE,
    data: Dataset,
    method: str,
    *,
    max_samples: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    num_evals: int,
    evaluate: Callable[[VAE], Dict[str, float]],
    progress: bool = True,
    desc: str = "",
    method_options: Optional[dict] = None,
    evaluate_at_start: bool = True,
    device: str = "auto",
) -> List[Dict[str, float]]:
    """Train ``vae`` with registered ``method`` through the library's one training loop
    (:func:`ppl_vae.inference.training.train`: epochs of minibatches without replacement).

    ``evaluate(vae)`` runs at log-spaced numbers of training samples (the x-axis of the
    paper's figures 2 and 3) and, with ``evaluate_at_start``, at 0; returns its records,
    each with ``num_train_samples``. ``device``: where to train ("auto": CUDA when available).
    A run whose loss becomes NaN stops its curve there with a warning naming the step; the
    records so far are kept.
    """
    target = resolve_device(device)
    vae, data = vae.to(target), data.to(target)
    n = data.train.shape[0]
    batch = min(batch_size, n)
    checkpoints = eval_steps(max_samples, batch, num_evals)
    epochs = math.ceil(checkpoints[-1] / math.ceil(n / batch))
    config = TrainConfig(method=method, epochs=epochs, batch_size=batch, lr=lr, optimizer=optimizer, device=str(target))
    stepper = METHODS.get(method)(vae, config, **(method_options or {}))
    records = [{"num_train_samples": 0.0, **evaluate(vae)}] if evaluate_at_start else []
    recorder = CurveRecorder(checkpoints, batch, evaluate)
    try:
        train(vae, data, config, stepper=stepper, callbacks=[recorder], progress=progress, evaluate=False)
    except TrainingDiverged as exc:
        warnings.warn(
            f"{desc or method}: training diverged ({exc}); the curve stops at "
            f"{len(recorder.records)} of {len(checkpoints)} evaluations",
            stacklevel=2,
        )
    return records + recorder.records


def train_aevb(
    dataset: str,
    data: Dataset,
    latent_dim: int,
    hidden_dim: int,
    *,
    max_samples: int,
    batch_size: int,
    lr: float,
    eval_size: int,
    progress: bool,
    desc: str,
) -> Tuple[VAE, Dict[str, float]]:
    """Train the paper's VAE for ``dataset`` with AEVB (Adagrad); returns it and its final ELBOs."""
    vae = build_model(dataset, data, latent_dim, hidden_dim)
    records = train_curve(
        vae,
        data,
        "svi",
        max_samples=max_samples,
        batch_size=batch_size,
        lr=lr,
        optimizer="adagrad",
        num_evals=1,
        evaluate=elbo_evaluator(data, eval_size),
        progress=progress,
        desc=desc,
        evaluate_at_start=False,
    )
    vae.eval()
    nan = float("nan")
    last = records[-1] if records else {"num_train_samples": 0.0}
    return vae, {
        "num_train_samples": last["num_train_samples"],
        "train_elbo": last.get("train", nan),
        "train_elbo_se": last.get("train_se", nan),
        "test_elbo": last.get("test", nan),
        "test_elbo_se": last.get("test_se", nan),
    }


def elbo_attrs(result: xr.Dataset) -> xr.Dataset:
    """``result`` with what the final ELBOs of :func:`train_aevb` are (figures 4 and 5)."""
    for split in ("train", "test"):
        if f"{split}_elbo" in result:
            result[f"{split}_elbo"].attrs.update(
                {
                    "long_name": f"mean ELBO per datapoint over the first eval_size {split} points after training "
                    "(one particle each)",
                    "units": "nats",
                    "kind": "Monte Carlo estimate",
                    "bound": "lower bound",
                }
            )
        if f"{split}_elbo_se" in result:  # tables written before it have none
            result[f"{split}_elbo_se"].attrs.update(
                {"long_name": f"standard error of {split}_elbo over the evaluated points", "units": "nats"}
            )
    return result


def elbo_summary(result: xr.Dataset, by: str) -> List[Tuple[str, Dict[str, str]]]:
    """[(what the numbers are, {unit: train and test ELBO ± se})] for ``ppl-vae experiment`` fig4/fig5."""
    lines: Dict[str, str] = {}
    for key in result[by].values:
        row = result.sel({by: key})
        parts = []
        for split in ("train", "test"):
            value = float(row[f"{split}_elbo"])
            se = float(row[f"{split}_elbo_se"]) if f"{split}_elbo_se" in row else float("nan")
            parts.append(f"{split} {value:.2f}" + (f" ± {se:.2f}" if math.isfinite(se) else " (se not recorded)"))
        lines[f"{by} {key}"] = ", ".join(parts)
    heading = (
        "final ELBO per datapoint, nats (lower bound: Monte Carlo estimate of the ELBO, itself a lower bound on "
        f"log p(x); ± its standard error over the evaluated datapoints), by {by.replace('_', ' ')}:"
    )
    return [(heading, lines)]


def elbo_evaluator(data: Dataset, eval_size: int, num_particles: int = 1) -> Callable[[VAE], Dict[str, float]]:
    """Mean ELBO per datapoint (nats) on the first ``eval_size`` train and test points, as
    ``{"train": mean, "train_se": its standard error, "test": ..., "test_se": ...}``: the sd of
    the per-datapoint values (one draw each) over sqrt(points), the error of the mean as an
    estimate of the split's mean ELBO (it holds the Monte Carlo error; NaN for one point)."""
    x_train, x_test = data.train[:eval_size], data.test[:eval_size]

    def evaluate(vae: VAE) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for split, x in (("train", x_train), ("test", x_test)):
            # elbo_per_datapoint scores in eval mode and restores the caller's mode
            values = elbo_per_datapoint(vae.model, vae.guide, x, num_particles=num_particles).double()
            out[split] = float(values.mean())
            out[f"{split}_se"] = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan
        return out

    return evaluate


class ResultTable:
    """Rows of numbers in ``<out>/<name>.csv`` (and ``.nc``), grown one finished unit at a time.

    ``unit_keys`` name the columns that identify a unit of work; ``index`` the columns that
    become the netCDF's dims (the rest become its variables). ``attrs``: adds what each
    variable is (``long_name``, ``bound``, ...) to the Dataset, in the netCDF and in
    :meth:`to_xarray` alike.
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        unit_keys: Sequence[str],
        index: Sequence[str],
        *,
        attrs: Optional[Callable[[xr.Dataset], xr.Dataset]] = None,
    ):
        self.attrs = attrs
        self.out_dir = Path(out_dir)
        self.name = name
        self.unit_keys = list(unit_keys)
        self.index = list(index)
        self.csv_path = self.out_dir / f"{name}.csv"
        self.nc_path = self.out_dir / f"{name}.nc"
        self.frame = pd.read_csv(self.csv_path) if self.csv_path.is_file() else pd.DataFrame()

    def done(self, **unit: Any) -> bool:
        """Whether the unit with these key values has its rows already."""
        if self.frame.empty:
            return False
        mask = np.ones(len(self.frame), dtype=bool)
        for key in self.unit_keys:
            mask &= self.frame[key].astype(str).to_numpy() == str(unit[key])
        return bool(mask.any())

    def add(self, rows: Iterable[Dict[str, Any]]) -> None:
        """Append a finished unit's rows and rewrite the netCDF and CSV atomically.

        The CSV is written last: it is what :meth:`done` reads, so a unit counts as finished only
        once both files hold it. A kill between the writes makes a rerun redo the unit."""
        new = pd.DataFrame(list(rows))
        frame = new if self.frame.empty else pd.concat([self.frame, new], ignore_index=True)
        write_netcdf(self._as_xarray(frame), self.nc_path)
        write_with(self.csv_path, lambda tmp: frame.to_csv(tmp, index=False))
        self.frame = frame

    def to_xarray(self) -> xr.Dataset:
        """The rows as a Dataset with one dim per ``index`` column (missing cells are NaN)."""
        return self._as_xarray(self.frame)

    def _as_xarray(self, frame: pd.DataFrame) -> xr.Dataset:
        result = frame.set_index(self.index).sort_index().to_xarray()
        return result if self.attrs is None else self.attrs(result)


def final_values(curves: xr.DataArray, along: str = "num_train_samples") -> List[Tuple[Dict[str, Any], float, Any]]:
    """For every combination of the other dims: (their labels, the last non-NaN value along
    ``along``, that value's ``along`` coordinate); combinations with no value are left out."""
    others = [cast(str, d) for d in curves.dims if d != along]  # dims are named by strings
    out = []
    for combo in itertools.product(*[curves[d].values for d in others]):
        labels = dict(zip(others, combo))
        series = curves.sel(labels).dropna(along)
        if series.size:
            out.append((labels, float(series[-1]), series[along].values[-1]))
    return out


def _read_settings(path: Path) -> Any:
    """An experiment folder's recorded settings.json, or a one-line ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        why = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ValueError(
            f"{path} is damaged ({why}); remove the folder or write the experiment to another --out"
        ) from None


def check_settings(out_dir: Path, settings: Any) -> None:
    """Create ``out_dir`` and record ``settings``; refuse a folder made with other settings."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "settings.json"
    text = json.dumps(dataclasses.asdict(settings), indent=2, sort_keys=True, default=str) + "\n"
    if path.is_file():
        others = [
            p
            for p in out_dir.iterdir()
            if p.name != "settings.json" and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        recorded = _read_settings(path)
        if recorded != json.loads(text) and not others:
            # an earlier attempt stopped before writing any result (out of memory, Ctrl-C): nothing
            # would be mixed, so the corrected command takes the folder
            remove_stale_temp_files(out_dir)
            write_text(path, text)
            return
        wanted = json.loads(text)
        if recorded != wanted:
            differ = (
                [k for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k)]
                if isinstance(recorded, dict)
                else []
            )
            what = "see its settings.json"
            if differ:  # the settings' own name, quoted, and the values as settings.json writes them
                key = differ[0]
                what = (
                    f"'{key}' {json.dumps(recorded.get(key))} in its settings.json, {json.dumps(wanted.get(key))} now"
                )
                what += f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
            raise ValueError(
                f"out {out_dir} holds results made with other settings ({what}); "
                "choose another --out or delete the folder"
            )
        remove_stale_temp_files(out_dir)  # what a killed earlier run left half-written
        return
    write_text(path, text)


def _sparse_minor_labels_class():
    from matplotlib.ticker import LogFormatterSciNotation

    class SparseMinorLabels(LogFormatterSciNotation):
        """Labels of a log axis's minor ticks that do not run into one another on a narrow panel
        (matplotlib's default labels all eight within a decade: "3x10^3" ran into "4x10^3"): none
        over more than 1.5 decades, at 2 and 5 times a power of ten over 0.4 to 1.5, and at each
        whole multiple below that."""

        def __init__(self) -> None:
            super().__init__(labelOnlyBase=False, minor_thresholds=(math.inf, math.inf))

        def __call__(self, x, pos=None):
            if x <= 0 or self.axis is None:
                return ""
            low, high = sorted(self.axis.get_view_interval())
            span = math.log10(high / low) if low > 0 else math.inf
            power = 10 ** math.floor(math.log10(x) + 1e-9)
            lead = x / power
            whole = abs(lead - round(lead)) < 1e-6
            shown = whole and (span <= 0.4 or (span <= 1.5 and round(lead) in (2, 5)))
            return super().__call__(x, pos) if shown else ""

    return SparseMinorLabels


def _SparseMinorLabels():
    return _sparse_minor_labels_class()()


class CurveLegend:
    """Curve panels of figures 2 and 3: a log x-axis of training samples, autoscaled to every
    plotted point with a margin, and one legend for the whole figure below the panels (no
    per-axes legend covering data)."""

    def __init__(self) -> None:
        self.handles = self.labels = None

    def style(self, ax, title: str, ylabel: str) -> None:
        """Take the first legend's entries, remove the axes' legend, and label the axes."""
        legend = ax.get_legend()
        if legend is not None:
            if self.handles is None:
                self.handles, self.labels = ax.get_legend_handles_labels()
            legend.remove()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(_SparseMinorLabels())  # 3x10^3 ran into 4x10^3 (QA)
        ax.margins(x=0.05, y=0.08)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("# training samples evaluated")
        ax.set_ylabel(ylabel)

    def finish(self, fig):
        if self.handles:
            fig.legend(self.handles, self.labels, loc="outside lower center", ncols=2, frameon=False, fontsize="small")
        return fig


def save_figure(fig, out_dir: Path, name: str) -> List[Path]:
    """Write ``fig`` as ``<name>.png`` and ``<name>.svg`` (atomically); returns the paths."""
    paths = []
    for ext in ("png", "svg"):
        path = Path(out_dir) / f"{name}.{ext}"
        paths.append(write_figure(fig, path, dpi=150, bbox_inches="tight"))
    return paths


def image_grid(images: np.ndarray, ncols: int) -> np.ndarray:
    """Tile ``images`` ``(N, H, W)`` into one ``(rows*H, ncols*W)`` array (row-major)."""
    n, h, w = images.shape
    nrows = math.ceil(n / ncols)
    canvas = np.ones((nrows * h, ncols * w), dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    return canvas


# Sizes far beyond any machine these figures run on (a grid of grid_size**2 decoded images, a
# weight matrix of hidden_dim x latent_dim): refused before any work rather than an
# out-of-memory error minutes later.
SIZE_LIMITS = {
    "grid_size": 500,
    "latent_dims": 10_000,
    "latent_dim": 10_000,
    "hidden_dim": 100_000,
    "num_images": 10_000,
    "eval_size": 10_000_000,
    "batch_size": 10_000_000,
}


def validate_common(**values: Any) -> None:
    """Raise ValueError naming the first non-positive count among ``values``, or the first
    above its :data:`SIZE_LIMITS` entry."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            if not value or min(value) < 1:
                raise ValueError(f"{name} must list positive integers, got {value}")
        elif not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
        limit = SIZE_LIMITS.get(name)
        largest = max(value) if isinstance(value, (tuple, list)) else value
        if limit is not None and largest > limit:
            raise ValueError(
                f"{name} {largest} is far beyond what this figure needs or a machine holds; choose at most {limit}"
            )
