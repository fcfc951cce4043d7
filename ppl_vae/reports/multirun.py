"""Several runs scored on the same datapoints with the same estimator: paired differences.

"Did IWAE / a flow guide / a VampPrior help, by how many nats, and is it more than noise?"
is a question about *paired* differences: every run is evaluated on the same test
datapoints, so the per-datapoint difference d_i = log p̂_B(x_i) − log p̂_A(x_i) cancels the
large spread between easy and hard datapoints that dominates each run's own standard error.

:func:`compare_runs` scores every run with any registered estimator of
:data:`ppl_vae.inference.estimators.ESTIMATORS`: by default ``"mis"`` (log p̂ by multiple
importance sampling over ½q + ½q*, L[q*], L[q] and the gaps of
:func:`ppl_vae.analysis.gaps.gap_decomposition`), or e.g. ``"iw"`` (the importance-weighted
estimate of its amortized guide, Burda et al. 2015; no mean-field fit, faster), ``"jackknife"``
or ``"ais"``. The quantities compared are the estimator's log p̂ and every further per-datapoint
estimate it returns with a standard error. For each run and quantity it reports the mean
over datapoints, and against the reference run (the first) the mean paired difference with
two standard errors: ``se`` = sd_i(d_i) / sqrt(N) (what a new sample of datapoints would
vary by; it includes the Monte Carlo noise actually present) and ``mc_se`` = sqrt(Σ_i (se_A,i² +
se_B,i²)) / N, the Monte Carlo error Δ would have for these datapoints if the runs' draws were
independent. They are not: every run is scored from the same seed (common random numbers), which
usually makes the Monte Carlo part of Δ smaller than ``mc_se`` (a run against itself gives Δ = 0
exactly), so ``mc_se`` is said as what it is, not as the Monte Carlo part of ``se``.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ppl_vae.inference import estimators
from ppl_vae.io import write_text
from ppl_vae.pipeline import load_run
from ppl_vae.reports.blocks import BlockTask, is_writer, map_blocks, rank_device
from ppl_vae.reports.common import CSS, Stages, figure_to_data_uri, label_metric_lines, run_out_dir, select_datapoints
from ppl_vae.reports.evaluation import join_blocks, score_block

if TYPE_CHECKING:  # xarray, pandas and the writers are imported after the scoring
    import pandas as pd
    import xarray as xr

MULTIRUN_FILES = {
    "report": "report.html",
    "netcdf": "multirun.nc",
    "table_csv": "multirun_table.csv",
    "per_datapoint_csv": "multirun_per_datapoint.csv",
}


def quantities(ds: xr.Dataset) -> List[str]:
    """What a multi-run comparison compares for an estimator's dataset: ``log_px`` first (the
    headline), then every further per-datapoint estimate that comes with a standard error."""
    return ["log_px"] + [
        str(v)
        for v in ds.data_vars
        if v != "log_px"
        and ds[v].dims == ("datapoint",)
        and not ds[v].attrs.get("diagnostic")
        and not str(v).endswith("_stderr")
        and f"{v}_stderr" in ds
    ]


def label(ds: xr.Dataset, q: str) -> str:
    """A quantity's short label: log p̂(x) with the estimator's name, else the part of its long
    name before a colon, else its name."""
    if q == "log_px":
        return f"log p̂(x) ({ds.attrs['estimator']})"
    long_name = str(ds[q].attrs.get("long_name", q))
    return long_name.split(":")[0] if ":" in long_name else q


@dataclass
class MultiComparison:
    """Per-run, per-datapoint ``values`` (run, datapoint, quantity) with ``stderr``, the summary
    ``table`` (one row per run and quantity) and the files written."""

    values: xr.Dataset
    table: pd.DataFrame
    files: Dict[str, Path] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    #: "run: metric ..." for each label metric a run's model declares (M2's error, a GMVAE's clusters)
    label_metrics: List[str] = field(default_factory=list)

    @property
    def num_datapoints(self) -> int:
        """The number of datapoints of the split that were scored (the same for every run)."""
        return int(self.values.sizes["datapoint"])


def _run_names(run_dirs: Sequence[Path]) -> List[str]:
    """Short unique names: the folder names, with the parent added where two collide."""
    names = [Path(p).name or str(p) for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


class _MultiTask(BlockTask):
    """One block of the multi-run comparison: every run scored on datapoints [start, stop)."""

    def __init__(
        self,
        run_dirs: Sequence[Path],
        device: str,
        split: str,
        num_datapoints: Optional[int],
        seed: int,
        estimator: str,
        options: Dict[str, Any],
        loaded: Any = None,
    ):
        super().__init__()
        self.run_dirs, self.device_name, self.split, self.num_datapoints = list(run_dirs), device, split, num_datapoints
        self.seed, self.estimator, self.options = seed, estimator, options
        self._cache = loaded

    def load(self):
        runs = [load_run(Path(p), self.device_name, history=False) for p in self.run_dirs]
        return runs, [select_datapoints(run, self.split, self.num_datapoints, self.seed) for run in runs]

    def score(self, start: int, stop: int) -> List[xr.Dataset]:
        """One dataset per run, all from the same block seed (every run sees the same random numbers)."""
        runs, selections = self.loaded
        state = torch.random.get_rng_state()
        out = []
        for run, sel in zip(runs, selections):
            torch.random.set_rng_state(state)
            out.append(score_block(run, sel, start, stop, self.estimator, self.options))
        return out


#: how the warnings of a multi-run comparison name what to change
MULTI_NAMES = {
    "estimator": "another --estimator, or AIS (ppl-vae evaluate RUN --estimator ais)",
    "mean_field_steps": "--mf-steps / --mf-polish-steps (mean_field_options max_steps / polish_steps)",
}


def run_warnings(ds: xr.Dataset, estimator: str) -> List[str]:
    """The warnings for one run's scores: the estimator's own (its registration makes them)."""
    return estimators.get(estimator).weak(ds, MULTI_NAMES)


def compare_runs(
    run_dirs: Sequence[Path],
    *,
    estimator: str = "mis",
    split: str = "test",
    num_datapoints: Optional[int] = 500,
    batch_size: int = 100,
    device: str = "cpu",
    seed: int = 0,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    nproc: int = 1,
    threads: Optional[int] = None,
    stages: Optional[Stages] = None,
    **options: Any,
) -> MultiComparison:
    """Score every run on the same datapoints with the same estimator; paired differences and a report.

    ``run_dirs``: two or more run directories on the same dataset (the same ``split``
    datapoints are selected for each with ``seed``; runs whose datapoints differ are refused).
    ``estimator``: a name of :data:`~ppl_vae.inference.estimators.ESTIMATORS` ("mis": the gap
    decomposition, log p̂ by multiple importance sampling with q and a fitted q*, plus L[q],
    L[q*] and the gaps; "iw": IW with the amortized guide; ...), ``options`` its options
    (``num_samples``, ``mean_field_options``, ...; one it does not take is refused). Every run
    gets the same RNG seed. Files go to ``out_dir`` (default: ``multirun`` inside the first run
    directory): ``multirun.nc`` (values over run, datapoint, quantity), ``multirun_table.csv``
    and ``report.html``.

    ``num_datapoints``: how many datapoints of ``split`` are scored, as in ``evaluate`` and
    ``compare`` (None or 0: all; else a seeded subset). Datapoints are scored in blocks
    (``batch_size``, or the estimator's own block: mean-field VI's batch, default 500, for
    "mis"), each seeded from (``seed``, its first datapoint), so ``nproc > 1`` or a ``torchrun``
    launch splits the blocks across processes and gives one process's numbers
    (:mod:`ppl_vae.reports.blocks`). ``stages``, if given, gets the wall time of each stage (load,
    scoring, writing, report: ``--profile``).
    """
    stages = Stages() if stages is None else stages
    est = estimators.get(estimator)
    if len(run_dirs) < 2:
        raise ValueError(f"run_dirs must name at least two runs to compare, got {len(run_dirs)}")
    if est.simulated:
        raise ValueError(
            f"estimator {estimator!r} scores data simulated from each run's own model, so several runs "
            "have no datapoints in common to pair: run ppl-vae evaluate RUN --estimator "
            f"{estimator} on each run"
        )
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    options = estimators.check_options(estimator, {**options, "batch_size": batch_size}, given=list(options))
    options.pop("seed", None)
    options.pop("progress", None)
    device = rank_device(device)  # under torchrun: this rank's GPU
    with stages.stage("load"):
        runs = [load_run(Path(p), device, history=False) for p in run_dirs]
        names = _run_names(run_dirs)
        writer = is_writer()
        out = (
            run_out_dir(runs[0], Path(run_dirs[0]) / "multirun" if out_dir is None else Path(out_dir))
            if writer
            else None
        )
        selections = [select_datapoints(run, split, num_datapoints or None, seed) for run in runs]
    ref = selections[0]
    for name, sel in zip(names[1:], selections[1:]):
        if (
            sel.x.shape != ref.x.shape
            or not np.array_equal(sel.index, ref.index)
            or not torch.equal(sel.x.cpu(), ref.x.cpu())
        ):
            raise ValueError(
                f"run {name!r} does not evaluate the same {split} datapoints as {names[0]!r} "
                "(different dataset, binarization or split): paired differences need the same data"
            )
    n = len(ref.index)
    block = est.blocks(options) or int(batch_size)
    task = _MultiTask(
        list(run_dirs), device, split, num_datapoints or None, seed, estimator, options, loaded=(runs, selections)
    )
    with stages.stage("scoring"):
        parts = map_blocks(task, n, block, seed, nproc=nproc, threads=threads, progress=progress)
        scores = [join_blocks([p[r] for p in parts]) for r in range(len(runs))]
    import xarray as xr

    compared = quantities(scores[0])
    values = np.full((len(runs), n, len(compared)), np.nan)
    stderr = np.full_like(values, np.nan)
    warnings: List[str] = []
    for r, name in enumerate(names):
        for j, q in enumerate(compared):
            values[r, :, j], stderr[r, :, j] = scores[r][q].values, scores[r][f"{q}_stderr"].values
        warnings.extend(f"{name}: {w}" for w in run_warnings(scores[r], estimator))
    label_values: List[Dict[str, float]] = []
    label_lines: List[str] = []
    for name, run, sel in zip(names, runs, selections):
        metric_values, metric_lines = label_metric_lines(run, sel)
        label_values.append(metric_values)
        label_lines.extend(f"{name}: {line}" for line in metric_lines)
    first = scores[0]
    ds = xr.Dataset(
        {"value": (("run", "datapoint", "quantity"), values), "stderr": (("run", "datapoint", "quantity"), stderr)},
        coords={
            "run": names,
            "datapoint": ref.index,
            "quantity": compared,
            "bound": ("quantity", [str(first[q].attrs["bound"]) for q in compared]),
            "description": ("quantity", [label(first, q) for q in compared]),
            "run_dir": ("run", [str(r.run_dir) for r in runs]),
            "made_from": ("run", [r.made_from for r in runs]),
        },
        attrs={
            "estimator": estimator,
            "estimator_title": est.title,
            **{k: v for k, v in first.attrs.items() if k in est.options and k != "mean_field_options"},
            "split": split,
            "seed": int(seed),
            "preprocessing": ref.preprocessing,
            "reference_run": names[0],
            "num_datapoints": int(n),
            "block_size": block,
            "description": "per-datapoint estimates of each run on the same datapoints (nats); "
            "coordinate bound says what each quantity is",
        },
    )
    ds["value"].attrs.update({"units": "nats", "long_name": "per-datapoint estimate"})
    ds["stderr"].attrs.update({"units": "nats", "long_name": "Monte Carlo standard error"})
    for metric in sorted({m for v in label_values for m in v}):  # each run's, NaN where it has none
        ds[f"label_metric_{metric}"] = ("run", [float(v.get(metric, np.nan)) for v in label_values])
        ds[f"label_metric_{metric}"].attrs["long_name"] = (
            f"{metric} of each run on these datapoints (see label_metrics)"
        )
    ds.attrs["warnings"] = " | ".join(warnings) or "none"
    table = paired_table(ds)
    if label_lines:
        ds.attrs["label_metrics"] = " | ".join(label_lines)
    comparison = MultiComparison(ds, table, warnings=warnings, label_metrics=label_lines)
    if not writer or out is None:
        return comparison
    from ppl_vae.analysis import results

    files = comparison.files
    with stages.stage("writing"):
        files["netcdf"] = results.save_netcdf(ds, out / MULTIRUN_FILES["netcdf"])
        files["table_csv"] = results.save_csv(table, out / MULTIRUN_FILES["table_csv"])
        per_dp = (
            ds["value"]
            .to_dataframe()
            .reset_index()
            .pivot_table(index="datapoint", columns=["run", "quantity"], values="value")
        )
        per_dp.columns = [f"{r}:{q}" for r, q in per_dp.columns]
        files["per_datapoint_csv"] = results.save_csv(per_dp, out / MULTIRUN_FILES["per_datapoint_csv"])
    with stages.stage("report"):
        files["report"] = out / MULTIRUN_FILES["report"]
        write_text(files["report"], render_multirun_html(comparison))
    return comparison


def paired_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (run, quantity): mean over datapoints, and the paired difference to the reference run.

    Columns: ``mean``, ``se`` (sd over datapoints / sqrt(N)), ``diff`` (mean of
    value − reference value per datapoint), ``diff_se`` (sd_i of those differences / sqrt(N)),
    ``diff_mc_se`` (their Monte Carlo error alone), ``z`` = diff / diff_se and ``beyond_noise``
    (|z| > 2). The reference run's difference columns are NaN.
    """
    ref = ds.attrs.get("reference_run", str(ds.run.values[0]))
    n = ds.sizes["datapoint"]
    rows = []
    for run in ds.run.values:
        for q in ds.quantity.values:
            v = ds["value"].sel(run=run, quantity=q).values
            row = {
                "run": str(run),
                "quantity": str(q),
                "description": str(ds["description"].sel(quantity=q).values),
                "bound": str(ds["bound"].sel(quantity=q).values),
                "mean": float(v.mean()),
                "se": float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan,
                "diff": np.nan,
                "diff_se": np.nan,
                "diff_mc_se": np.nan,
                "z": np.nan,
                "beyond_noise": None,
            }
            if str(run) != ref:
                d = v - ds["value"].sel(run=ref, quantity=q).values
                mc = (
                    np.sqrt(
                        np.nansum(
                            ds["stderr"].sel(run=run, quantity=q).values ** 2
                            + ds["stderr"].sel(run=ref, quantity=q).values ** 2
                        )
                    )
                    / n
                )
                se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
                z = float(d.mean() / se) if se and np.isfinite(se) and se > 0 else np.nan
                row.update(
                    diff=float(d.mean()),
                    diff_se=se,
                    diff_mc_se=float(mc),
                    z=z,
                    beyond_noise=bool(abs(z) > 2) if np.isfinite(z) else None,
                )
            rows.append(row)
    import pandas as pd

    return pd.DataFrame(rows).set_index(["run", "quantity"])


def format_paired_table(table: pd.DataFrame) -> str:
    """The table as aligned text for the terminal (nats)."""
    lines = [f"{'run':<24} {'quantity':<36} {'mean':>10} {'± se':>7}  {'Δ vs ref':>9} {'± se':>7} {'MC se*':>7}  kind"]
    for (run, _), r in table.iterrows():
        diff = "" if not np.isfinite(r["diff"]) else f"{r['diff']:>9.3f} {r['diff_se']:>7.3f} {r['diff_mc_se']:>7.3f}"
        lines.append(
            f"{run[:24]:<24} {r['description'][:36]:<36} {r['mean']:>10.3f} {r['se']:>7.3f}  {diff:<25}  {r['bound']}"
        )
    lines.append(
        "Δ vs ref: mean over datapoints of (run − reference run) on the same datapoints; "
        "its se is the paired standard error; kind: what the mean is with respect to its target (a difference "
        "of two bounds is neither)"
    )
    lines.append(
        "MC se*: the Monte Carlo se Δ would have if the runs' draws were independent; they share their random "
        "numbers, which usually makes Δ's Monte Carlo part smaller (a run against itself: Δ = 0 exactly)"
    )
    return "\n".join(lines)


def plot_paired_differences(ds: xr.Dataset):
    """Per-datapoint paired differences to the reference run, with mean ± 2 paired se; returns a Figure.

    Left: mean difference ± 2 se for each run and quantity (a forest plot). Right: the
    distribution over datapoints of the headline difference (log p̂), one row per run.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    table = paired_table(ds)
    ref = ds.attrs.get("reference_run", str(ds.run.values[0]))
    others = [str(r) for r in ds.run.values if str(r) != ref]
    quantities = [str(q) for q in ds.quantity.values]
    headline = quantities[0]
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 1.1 + 0.55 * len(others) * len(quantities) ** 0.5 + 1.5), layout="constrained"
    )
    palette = dict(zip(quantities, sns.color_palette("colorblind", len(quantities))))
    ypos, labels = [], []
    for i, run in enumerate(others):
        for j, q in enumerate(quantities):
            r = table.loc[(run, q)]
            y = i * (len(quantities) + 1) + j
            axes[0].errorbar(
                r["diff"],
                y,
                xerr=2 * r["diff_se"],
                fmt="o",
                capsize=3,
                color=palette[q],
                label=str(ds["description"].sel(quantity=q).values) if i == 0 else None,
            )
            ypos.append(y)
            labels.append(f"{run}: {q}" if j == 0 else q)  # every row named (QA: 1 of 8 ticks had a label)
    axes[0].axvline(0.0, color="black", lw=0.8)
    axes[0].set_yticks(ypos, labels)
    axes[0].invert_yaxis()
    axes[0].margins(x=0.15, y=0.1)
    axes[0].set_xlabel(f"mean paired difference vs {ref} (nats, ± 2 se)")
    axes[0].set_title("Run − reference, same datapoints")
    axes[0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.18), frameon=False, fontsize="small", ncols=2)
    frame = pd.DataFrame(
        {
            "run": np.repeat(others, ds.sizes["datapoint"]),
            "difference": np.concatenate(
                [
                    (ds["value"].sel(run=r, quantity=headline) - ds["value"].sel(run=ref, quantity=headline)).values
                    for r in others
                ]
            ),
        }
    )
    sns.stripplot(frame, x="difference", y="run", hue="run", size=2.5, alpha=0.5, jitter=0.25, ax=axes[1], legend=False)
    for i, run in enumerate(others):  # the mean and its paired ± 2 se over the cloud of datapoints
        r = table.loc[(run, headline)]
        axes[1].errorbar(
            r["diff"],
            i,
            xerr=2 * r["diff_se"],
            fmt="D",
            color="black",
            capsize=4,
            zorder=3,
            label="mean ± 2 paired se" if i == 0 else None,
        )
    axes[1].axvline(0.0, color="black", lw=0.8)
    axes[1].margins(x=0.05)
    axes[1].set_xlabel(f"per-datapoint {ds['description'].sel(quantity=headline).values}: run − {ref} (nats)")
    axes[1].set_title(f"{ds.sizes['datapoint']} datapoints")
    axes[1].legend(loc="upper left", bbox_to_anchor=(0.0, -0.18), frameon=False, fontsize="small")
    return fig


def render_multirun_html(comparison: MultiComparison) -> str:
    """One self-contained HTML page: what is compared, the paired table, the figure, warnings."""

    ds, table = comparison.values, comparison.table
    esc = html.escape
    ref = ds.attrs["reference_run"]
    est = estimators.get(str(ds.attrs["estimator"]))
    settings = ", ".join(f"{k} = {ds.attrs[k]}" for k in est.options if k in ds.attrs)
    how = (
        f"<code>{esc(est.name)}</code>, {esc(est.title)} ({esc(est.reference)}); its log p̂(x) is "
        f"{'an estimate, neither bound' if est.bound == 'neither' else 'a stochastic ' + est.bound + ' on log p(x)'}"
        f"{'; ' + esc(settings) if settings else ''}"
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>ppl-vae compare: {len(ds.run)} runs</title><style>{CSS}</style></head><body>",
        f"<h1>Comparison of {ds.sizes['run']} runs on the same datapoints</h1>",
        "<div class='lead'><p><b>How to read this.</b> Every run is scored on the same "
        f"{ds.sizes['datapoint']} {esc(ds.attrs['split'])} datapoints (preprocessing: "
        f"{esc(ds.attrs['preprocessing'])}) with the same estimator: {how}. "
        f"Differences are taken per datapoint against the reference run <code>{esc(ref)}</code> and then "
        "averaged, so the spread between easy and hard datapoints, which dominates each run's own standard "
        "error, cancels. A difference larger than about twice its paired standard error (|z| &gt; 2) is more "
        "than noise. The Monte Carlo se is what the sampling error of Δ would be if the runs' draws were independent; "
        "they share their random numbers (the same seed), which usually makes it smaller, and the paired se holds "
        "the sampling noise actually present. Higher log p̂ and "
        "ELBO are better; smaller gaps mean better inference.</p></div>",
    ]
    for w in comparison.warnings:
        parts.append(f"<p class='warning'><b>Warning.</b> {esc(w)}</p>")
    header = (
        "<tr><th>run</th><th>quantity</th><th>kind of the mean</th><th>mean (nats)</th><th>se</th>"
        "<th>Δ vs reference</th><th>paired se</th><th>MC se if independent</th><th>z</th><th>beyond noise?</th></tr>"
    )
    rows = [header]
    fmt = lambda v: "" if v is None or not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    for (run, _), r in table.iterrows():
        beyond = "" if r["beyond_noise"] is None else ("yes" if r["beyond_noise"] else "no")
        rows.append(
            f"<tr><td class='text'>{esc(run)}</td><td class='text'>{esc(r['description'])}</td>"
            f"<td class='text'>{esc(r['bound'])}</td><td>{fmt(r['mean'])}</td><td>{fmt(r['se'])}</td>"
            f"<td>{fmt(r['diff'])}</td><td>{fmt(r['diff_se'])}</td><td>{fmt(r['diff_mc_se'])}</td>"
            f"<td>{fmt(r['z'])}</td><td class='text'>{beyond}</td></tr>"
        )
    parts.append("<h2>Table</h2><table>" + "".join(rows) + "</table>")
    parts.append(
        "<p class='note'>Kind of the mean: what each run's own mean is with respect to its target (lower bound, "
        "upper bound or neither). Δ vs reference is a difference of two such numbers on the same datapoints, "
        "and a difference of two bounds is neither a lower nor an upper bound on the difference of the targets; "
        "read it with its paired se.</p>"
    )
    if comparison.label_metrics:  # what the models declare beside log p̂: M2's error, a GMVAE's clusters
        items = "".join(f"<li>{esc(line)}</li>" for line in comparison.label_metrics)
        parts.append(f"<h2>Label metrics</h2><ul>{items}</ul>")
    parts.append(
        "<h2>Paired differences</h2>"
        f"<img alt='paired differences' src='{figure_to_data_uri(plot_paired_differences(ds))}'>"
    )
    runs = "".join(
        f"<li><code>{esc(str(n))}</code>: {esc(str(m))} (the weights scored)</li>"
        for n, m in zip(ds.run.values, ds.made_from.values)
    )
    parts.append(f"<h2>Runs</h2><ul>{runs}</ul>")
    files = ", ".join(f"<code>{esc(p.name)}</code>" for k, p in comparison.files.items() if k != "report")
    parts.append(f"<p class='note'>Tables: {files}. Generated {_dt.datetime.now():%Y-%m-%d %H:%M}.</p></body></html>")
    return "\n".join(parts)


__all__ = [
    "MultiComparison",
    "compare_runs",
    "format_paired_table",
    "paired_table",
    "plot_paired_differences",
    "render_multirun_html",
]
