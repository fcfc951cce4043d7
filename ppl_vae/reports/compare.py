"""Compare amortized and per-datapoint inference for a run and write a self-contained report.

:func:`compare_run`: the gap decomposition of Cremer et al. (2018), collapse diagnostics,
ArviZ draws from both guides and ``report.html``, one HTML file with every figure embedded as
a base64 PNG. :func:`select_datapoints` is the one rule, shared with ``evaluate``
(:mod:`ppl_vae.reports.evaluation`) and the multi-run comparison, for which datapoints of a
split are scored and how.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ppl_vae.analysis.gaps import (
    fit_and_decompose,
    for_evidence,
    format_gap_table,
    gap_table,
    mean_field_batch,
    mis_warnings,
    relabel,
)
from ppl_vae.errors import one_line
from ppl_vae.inference.latents import model_layout
from ppl_vae.inference.meanfield import MeanFieldGuide, guide_moments
from ppl_vae.inference.modes import block_seed, eval_mode, seeded
from ppl_vae.io import write_text
from ppl_vae.models.vae import evidence_of
from ppl_vae.pipeline import Run, load_run
from ppl_vae.reports.blocks import BlockTask, is_writer, map_blocks, rank_device
from ppl_vae.reports.common import (
    CSS,
    Selection,
    Stages,
    figure_to_data_uri,
    run_out_dir,
    select_datapoints,
    weights_scored,
)

if TYPE_CHECKING:  # xarray, pandas, plotting and ArviZ are imported after the scoring, where they are used
    import pandas as pd
    import xarray as xr
    from matplotlib.figure import Figure

COMPARE_FILES = {
    "report": "report.html",
    "gaps_netcdf": "gaps.nc",
    "gaps_csv": "gaps.csv",
    "table_csv": "gap_table.csv",
    "diagnostics_netcdf": "diagnostics.nc",
    "inference_data": "inference_data.nc",
}


@dataclass
class Comparison:
    """Everything :func:`compare_run` computed, and the files it wrote."""

    gaps: xr.Dataset
    table: pd.DataFrame
    diagnostics: xr.Dataset
    files: Dict[str, Path] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    _draws: Any = field(default=None, repr=False)
    _inference_data: Any = field(default=None, repr=False)

    @property
    def inference_data(self) -> Any:
        """The guides' draws on the first 100 datapoints as ArviZ InferenceData (what
        ``inference_data.nc`` holds), built on first use: ArviZ is imported only then."""
        if self._inference_data is None and self._draws is not None:
            from ppl_vae.analysis import results

            draws, datapoint, attrs = self._draws
            self._inference_data = results.to_inference_data(draws, datapoint=datapoint, attrs=attrs)
        return self._inference_data

    @property
    def num_datapoints(self) -> int:
        """The number of datapoints of the split that were scored."""
        return int(self.gaps.sizes["datapoint"])


class _GapTask(BlockTask):
    """One block of ``compare``: q* fitted to datapoints [start, stop), then the gap decomposition."""

    def __init__(
        self,
        run_dir: Path,
        device: str,
        split: str,
        num_datapoints: Optional[int],
        seed: int,
        num_samples: int,
        batch_size: int,
        mean_field_options: Dict[str, Any],
        loaded: Any = None,
    ):
        super().__init__()
        self.run_dir, self.device_name, self.split, self.num_datapoints = run_dir, device, split, num_datapoints
        self.seed, self.num_samples, self.batch_size = seed, num_samples, batch_size
        self.mean_field_options = mean_field_options
        self._cache = loaded

    def load(self) -> Tuple[Run, Selection]:
        run = load_run(self.run_dir, self.device_name, history=False)
        return run, select_datapoints(run, self.split, self.num_datapoints, self.seed)

    def score(self, start: int, stop: int) -> xr.Dataset:
        run, sel = self.loaded
        return score_gaps(run, sel, start, stop, self.num_samples, self.batch_size, self.mean_field_options)


def score_gaps(
    run: Run,
    sel: Selection,
    start: int,
    stop: int,
    num_samples: int,
    batch_size: int,
    mean_field_options: Dict[str, Any],
) -> xr.Dataset:
    """q* fitted to the selection's datapoints [start, stop) and their gap decomposition (one
    block), from the caller's random stream (:func:`~ppl_vae.analysis.gaps.fit_and_decompose`,
    which the ``"mis"`` estimator also calls: the same numbers as ``compare --estimator mis``
    with several runs)."""
    vae = run.vae
    x = sel.x[start:stop]
    kwargs = {k: v[start:stop] for k, v in sel.model_kwargs(run).items()}
    try:
        return fit_and_decompose(
            vae.model,
            vae.guide,
            x,
            num_samples=num_samples,
            batch_size=batch_size,
            mean_field_options=mean_field_options,
            datapoint=sel.index[start:stop],
            **kwargs,
        )
    except ValueError as exc:  # a refusal names a site or a size: say which run and model too
        raise ValueError(
            f"the gap decomposition (mean-field q* and MIS) on model {run.config.model.model!r} "
            f"(run {run.run_dir}): {exc}"
        ) from None


def join_gap_blocks(parts: List[xr.Dataset]) -> xr.Dataset:
    """Per-block gap decompositions joined along ``datapoint``; the attributes that count over
    datapoints are recomputed for the whole."""
    from ppl_vae.reports.evaluation import join_blocks

    gaps = join_blocks(parts)
    gaps.attrs.update(
        {
            "meanfield_num_converged": int(gaps["meanfield_converged"].values.sum()),
            "meanfield_num_datapoints": int(gaps.sizes["datapoint"]),
            "meanfield_max_steps_taken": max(int(p.attrs["meanfield_max_steps_taken"]) for p in parts),
        }
    )
    return gaps


def mean_field_block_size(mean_field_options: Optional[Dict[str, Any]]) -> int:
    """Datapoints per block for estimators that fit q*: mean-field VI's own batch (its stopping
    rule looks at the batch's mean ELBO, so a block must be a whole batch)."""
    return mean_field_batch({"mean_field_options": mean_field_options})


def compare_run(
    run_dir: Path,
    *,
    num_samples: int = 1000,
    split: str = "test",
    num_datapoints: Optional[int] = 500,
    num_draws: int = 100,
    batch_size: int = 100,
    mean_field_options: Optional[Dict[str, Any]] = None,
    device: str = "cpu",
    seed: int = 0,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    nproc: int = 1,
    threads: Optional[int] = None,
    stages: Optional[Stages] = None,
) -> Comparison:
    """Gap decomposition, diagnostics, ArviZ draws and an HTML report for a run directory.

    ``num_samples``: K draws of q and K of q* for every estimate (log p̂ by multiple
    importance sampling, the IW estimates, L[q], L[q*]); ``num_draws``: draws of z per guide
    and datapoint kept in the InferenceData; ``mean_field_options`` go to
    :func:`~ppl_vae.inference.meanfield.fit_mean_field` (init, lr, max_steps, gtol, ...).
    The model is evaluated in eval mode; files go to ``out_dir`` (default: the run directory).

    ``num_datapoints``: how many datapoints of ``split`` are scored, as in ``evaluate`` (None
    or 0: all; else a seeded subset); the default here is 500 because q* is fitted per
    datapoint. Datapoints are scored in blocks of mean-field VI's batch (``batch_size`` of
    ``mean_field_options``, default 500), each seeded from (``seed``, its first datapoint)
    (:mod:`ppl_vae.reports.blocks`), so ``nproc > 1`` or a ``torchrun`` launch splits the
    blocks across processes and gives one process's numbers. ``threads``: torch threads per
    process (default: the available cores, shared). ``stages``, if given, gets the wall time of
    each stage (load, scoring, writing, report: ``--profile``).

    The scoring runs before anything else is imported or drawn; the tables (netCDF, CSV) are
    written before the diagnostics, the ArviZ draws and the report, which come last.
    """
    stages = Stages() if stages is None else stages
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    device = rank_device(device)  # under torchrun: this rank's GPU
    with stages.stage("load"):
        run = load_run(run_dir, device, history=False)
        writer = is_writer()
        out = run_out_dir(run, out_dir) if writer else None
        sel = select_datapoints(run, split, num_datapoints or None, seed)
    kwargs = sel.model_kwargs(run)
    mf_options = dict(mean_field_options or {})
    block = mean_field_block_size(mf_options)
    task = _GapTask(
        Path(run_dir),
        device,
        split,
        num_datapoints or None,
        seed,
        num_samples,
        batch_size,
        mf_options,
        loaded=(run, sel),
    )
    with stages.stage("scoring"):
        gaps = join_gap_blocks(
            map_blocks(task, len(sel.index), block, seed, nproc=nproc, threads=threads, progress=progress)
        )
    import xarray as xr

    gaps.attrs.update(
        {
            "split": split,
            "run_dir": str(run.run_dir),
            "made_from": run.made_from,  # which weights: a resume moves the run on, not this file
            "model": run.config.model.model,
            "dataset": run.config.data.dataset,
            "seed": seed,
            "preprocessing": sel.preprocessing,
            "block_size": block,
            "num_datapoints": int(len(sel.index)),
        }
    )
    table = gap_table(gaps)
    evidence = evidence_of(run.vae)  # log p(x | y) for a model given labels (a cvae)
    if evidence != "log p(x)":  # every label, meaning and figure names it, not log p(x)
        for column in ("description", "meaning"):
            table[column] = [for_evidence(d, evidence) for d in table[column]]
        gaps = relabel(gaps, evidence)
        gaps.attrs["evidence"] = evidence
    comparison = Comparison(gaps, table, xr.Dataset())
    comparison.warnings.extend(comparison_warnings(gaps))
    gaps.attrs["warnings"] = " | ".join(comparison.warnings) or "none"
    if not writer or out is None:
        return comparison
    # the rest runs once, on the writing process, under its own seed (the caller's RNG is left alone)
    with seeded(block_seed(seed, 0, 1), sel.x.device):
        _diagnostics_and_files(run, sel, kwargs, comparison, num_draws, out, stages)
    return comparison


def _diagnostics_and_files(
    run: Run,
    sel: Selection,
    kwargs: Dict[str, Any],
    comparison: Comparison,
    num_draws: int,
    out: Path,
    stages: Stages,
) -> None:
    from ppl_vae.analysis import results
    from ppl_vae.analysis.diagnostics import collapse_diagnostics

    vae, gaps = run.vae, comparison.gaps
    files = comparison.files
    with stages.stage("writing"):  # the scores first: they are what the command is for
        files["gaps_netcdf"] = results.save_netcdf(gaps, out / COMPARE_FILES["gaps_netcdf"])
        files["gaps_csv"] = results.save_csv(per_datapoint_table(gaps), out / COMPARE_FILES["gaps_csv"])
        files["table_csv"] = results.save_csv(comparison.table, out / COMPARE_FILES["table_csv"])
    with stages.stage("report"), eval_mode(vae):
        evidence = str(gaps.attrs.get("evidence", "log p(x)"))
        comparison.diagnostics = relabel(collapse_diagnostics(vae.model, vae.guide, sel.x, **kwargs), evidence)
        comparison.diagnostics.attrs["made_from"] = run.made_from
        if evidence != "log p(x)":
            comparison.diagnostics.attrs["evidence"] = evidence
        draw_n = min(sel.x.shape[0], 100)  # keep the InferenceData small: the first 100 datapoints
        draw_kwargs = {k: v[:draw_n] for k, v in kwargs.items()}
        layout = model_layout(vae.model, sel.x[:draw_n], **draw_kwargs)
        single = len(layout.sites) == 1
        shape = guide_moments(vae.guide, sel.x[:draw_n], None if single else layout, **draw_kwargs)[0].shape
        as_t = lambda a: torch.as_tensor(a[:draw_n], dtype=sel.x.dtype, device=sel.x.device).reshape(shape)  # noqa: E731
        mf_guide = MeanFieldGuide(
            as_t(gaps["meanfield_loc"].values), as_t(np.log(gaps["meanfield_scale"].values)), layout=layout
        )
        draws = results.guide_draws(
            vae.model,
            {"amortized": vae.guide, "meanfield": mf_guide},
            sel.x[:draw_n],
            num_draws=num_draws,
            **draw_kwargs,
        )
        comparison._draws = (
            draws,
            sel.index[:draw_n],
            {"run_dir": str(run.run_dir), "made_from": run.made_from, "split": sel.split},
        )
        files["diagnostics_netcdf"] = results.save_netcdf(
            comparison.diagnostics, out / COMPARE_FILES["diagnostics_netcdf"]
        )
        files["inference_data"] = results.save_draws(  # without importing ArviZ (about 1 s)
            draws, out / COMPARE_FILES["inference_data"], datapoint=sel.index[:draw_n], attrs=comparison._draws[2]
        )
        figures = _report_figures(run, sel, gaps, comparison.diagnostics, comparison.notes)
        files["report"] = write_report(out / COMPARE_FILES["report"], run, sel, comparison, figures)


def comparison_warnings(gaps: xr.Dataset) -> List[str]:
    """Every warning of a one-run comparison: the weak estimates and, where the amortized guide
    is richer than q*'s diagonal Gaussian (read from the guide itself: a hierarchy's conditional
    layers, a mixture, a flow), what its gaps then mean (:func:`estimate_warnings`)."""
    return estimate_warnings(gaps)


def per_datapoint_table(gaps: xr.Dataset) -> pd.DataFrame:
    """One row per datapoint: every estimate with its stderr, the gaps, ESS, k̂ and convergence."""
    frame = gaps[["estimate", "stderr"]].reset_coords(drop=True).to_dataframe().unstack("estimator")
    frame.columns = [f"{b}_stderr" if a == "stderr" else str(b) for a, b in frame.columns]
    extra = [v for v in gaps.data_vars if gaps[v].dims == ("datapoint",)]
    for name in extra:
        frame[name] = gaps[name].to_series()
    return frame


def estimate_warnings(gaps: xr.Dataset) -> List[str]:
    """Plain-language warnings for weak estimates in a gap decomposition, each with what to do
    (:func:`~ppl_vae.analysis.gaps.mis_warnings`, the ``"mis"`` estimator's, named as compare's flags)."""
    return mis_warnings(gaps, COMPARE_NAMES)


#: how compare's warnings name what to change
COMPARE_NAMES = {
    "mean_field_steps": "mean_field_options max_steps / polish_steps (CLI --mf-steps, --mf-polish-steps)",
    "num_samples": "more samples (--num-samples)",
    "estimator": "AIS (ppl-vae evaluate --estimator ais)",
}


def _report_figures(
    run: Run, sel: Selection, gaps: xr.Dataset, diagnostics: xr.Dataset, notes: List[str]
) -> List[Tuple[str, Figure]]:
    """(title, figure) pairs; a figure that does not apply to this model becomes a note."""
    from ppl_vae.analysis import plots

    vae: Any = run.vae  # a ConditionalVAE's decode takes the labels too
    device = sel.x.device
    makers: List[Tuple[str, Callable[[], Figure]]] = [
        ("Training curves", lambda: plots.plot_training_curves(run.read_history())),
        ("Per-datapoint gaps", lambda: plots.plot_gap_distributions(gaps)),
        ("Estimators", lambda: plots.plot_estimators(gaps)),
        ("KL per dimension and active units", lambda: plots.plot_kl_per_dimension(diagnostics)),
        ("Reconstructions", lambda: plots.plot_reconstructions(sel.x[:10], _reconstruct(run, sel, 10))),
        ("Decoded prior draws E[x|z], z ~ p(z)", lambda: plots.plot_samples(vae.sample(30))),
    ]
    labels = _conditioning_labels(run, sel)
    if vae.latent_dim == 2 and labels is not None:  # p(x | z, y): one label
        label = int(labels[0])
        decode = lambda z: vae.decode(z, torch.full(z.shape[:1], label, device=z.device))  # noqa: E731
        makers.append((f"Learned manifold of label {label}", lambda: plots.plot_manifold(decode, device=device)))
    elif vae.latent_dim == 2:  # decode maps the prior's (top) latent to x
        makers.append(("Learned manifold", lambda: plots.plot_manifold(vae.decode, device=device)))
    if gaps["amortized_loc"].shape[-1] == 2:  # one 2-D latent site in all
        makers.append(
            (
                "Latent space",
                lambda: plots.plot_latent_scatter(torch.as_tensor(gaps["amortized_loc"].values), sel.labels),
            )
        )
    figures = []
    for title, make in makers:
        try:
            with torch.no_grad():
                figures.append((title, make()))
        except (TypeError, ValueError, RuntimeError) as exc:
            notes.append(f"{title}: not drawn ({one_line(exc)})")
    return figures


def _conditioning_labels(run: Run, sel: Selection) -> Optional[torch.Tensor]:
    """The selected datapoints' labels where the model is conditioned on them (a cvae, whose ELBO
    bounds log p(x | y): it decodes given a label); None otherwise."""
    labels = sel.model_kwargs(run).get("y")
    return labels if labels is not None and evidence_of(run.vae) != "log p(x)" else None


def _reconstruct(run: Run, sel: Selection, n: int) -> torch.Tensor:
    """E[x | E_q[z | x]] of the first ``n`` selected datapoints, given their labels where the
    model is conditioned on them, as it was scored."""
    labels = _conditioning_labels(run, sel)
    vae: Any = run.vae  # a ConditionalVAE's reconstruct takes the labels
    return vae.reconstruct(sel.x[:n]) if labels is None else vae.reconstruct(sel.x[:n], labels[:n])


GAP_EXPLANATION = (
    "<p><b>What the gaps mean.</b> For each datapoint, the <i>inference gap</i> log p(x) − L[q] is how far "
    "the ELBO of the trained encoder's q(z|x) falls short of the model's evidence. Cremer, Li &amp; Duvenaud "
    "(2018) split it in two. The <i>approximation gap</i> log p(x) − L[q*] is the price of the variational "
    "family: q* is the best diagonal Gaussian for that datapoint alone (fitted here by per-datapoint "
    "mean-field VI), and even it misses the true posterior by this much. The <i>amortization gap</i> "
    "L[q*] − L[q] is the price of sharing one encoder across all datapoints: the encoder's q(z|x) is worse "
    "than its own family allows.</p>"
    "<p><b>What to do about a large one.</b> A large approximation gap asks for a more flexible posterior: "
    "a full-covariance or normalizing-flow guide (the model config's <code>guide</code>), or an "
    "importance-weighted objective (IWAE) that makes the bound tighter for the same guide. A large "
    "amortization gap asks for a better encoder: more capacity (hidden units, layers), longer training, or "
    "iterative refinement of q(z|x) per datapoint at test time (semi-amortized VI, as q* here). Both gaps "
    "also depend on the decoder, which adapts to the guide it was trained with (Cremer et al. 2018, §5.3), "
    "so compare runs on the same datapoints with <code>ppl-vae compare RUN1 RUN2</code>.</p>"
)


def _estimator_paragraph(gaps: xr.Dataset) -> str:
    k = gaps.attrs["num_samples"]
    return (
        f"<p><b>How the numbers are made.</b> log p̂(x) is a multiple-importance-sampling estimate "
        f"(Veach &amp; Guibas 1995) from K = {k} draws of the amortized q(z|x) <i>and</i> K = {k} draws of q*, "
        "every draw weighted against the mixture ½q + ½q* (balance heuristic). Its p̂(x) is an unbiased "
        "estimate of p(x), so log p̂(x) is a stochastic lower bound on log p(x). The importance-weighted "
        "estimates with q alone and with q* alone (Burda et al. 2015) are shown too; each is also a stochastic "
        "lower bound. L[q] and L[q*] are unbiased Monte Carlo estimates of the two ELBOs, from the same draws. "
        "The <i>kind</i> column says what each number is with respect to its target (lower bound, upper "
        "bound or neither). <i>se over datapoints</i>: how well the mean over the data population is known; "
        "<i>Monte Carlo se</i>: the sampling error of the mean for these datapoints, by the delta method over "
        "the K independent (q, q*) draw pairs, so the gaps' errors include the samples they share.</p>"
    )


def render_html(run: Run, sel: Selection, comparison: Comparison, figures: List[Tuple[str, Figure]]) -> str:
    """The report as one HTML string; figures become embedded PNGs (no external files)."""
    gaps, table = comparison.gaps, comparison.table
    cfg = run.config
    esc = html.escape
    evidence = str(gaps.attrs.get("evidence", "log p(x)"))  # log p(x | y) for a model given labels
    rows = [
        "<tr><th>quantity</th><th>kind</th><th>mean (nats)</th><th>se over datapoints</th>"
        "<th>Monte Carlo se</th><th>median</th><th>what it is</th></tr>"
    ]
    for _, r in table.iterrows():
        rows.append(
            f"<tr><td class='text'>{esc(r['description'])}</td><td class='text'>{esc(r['bound'])}</td>"
            f"<td>{r['mean']:.3f}</td><td>{r['se']:.3f}</td><td>{r['mc_se']:.3f}</td><td>{r['median']:.3f}</td>"
            f"<td class='text note'>{esc(r['meaning'])}</td></tr>"
        )
    n = gaps.sizes["datapoint"]
    converged = gaps.attrs["meanfield_num_converged"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>ppl-vae compare: {esc(str(run.run_dir))}</title><style>{CSS}</style></head><body>",
        f"<h1>Inference comparison: {esc(cfg.model.model)} on {esc(cfg.data.dataset)}</h1>",
        f"<div class='lead'>{for_evidence(GAP_EXPLANATION, evidence)}</div>",
    ]
    for warning in comparison.warnings:
        parts.append(f"<p class='warning'><b>Warning.</b> {esc(warning)}</p>")
    parts += [
        f"<p>Run <code>{esc(str(run.run_dir))}</code>{esc(weights_scored(run))}; {n} {esc(sel.split)} datapoints "
        f"(preprocessing: {esc(sel.preprocessing)}); {esc(latent_description(comparison.diagnostics))}; "
        f"K = {gaps.attrs['num_samples']} draws from each of q and q*; mean-field VI converged for {converged} of "
        f"{n} datapoints. Generated {_dt.datetime.now():%Y-%m-%d %H:%M}.</p>",
        "<h2>Estimators and gaps</h2>",
        for_evidence(_estimator_paragraph(gaps), evidence),
        "<table>" + "".join(rows) + "</table>",
        f"<p>Active units (Cov<sub>x</sub>(E<sub>q</sub>[z<sub>u</sub>]) &gt; "
        f"{comparison.diagnostics.attrs['threshold']}): {esc(active_units_line(comparison.diagnostics))}.</p>",
    ]
    for title, fig in figures:
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='{figure_to_data_uri(fig)}'>")
    for note in comparison.notes:
        parts.append(f"<p class='note'>{esc(note)}</p>")
    files = ", ".join(f"<code>{esc(p.name)}</code>" for k, p in comparison.files.items() if k != "report")
    parts.append(f"<p class='note'>Tables: {files}.</p></body></html>")
    return "\n".join(parts)


def _site_sizes(diagnostics: xr.Dataset) -> Dict[str, int]:
    """{latent site: its number of units}, in the layout's order."""
    if "latent_site" not in diagnostics.coords:
        return {}
    sites = [str(s) for s in diagnostics["latent_site"].values]
    return {s: sites.count(s) for s in dict.fromkeys(sites)}


def latent_description(diagnostics: xr.Dataset) -> str:
    """ "latent dimension 20", or with several latent sites "latent sites z2 (50), z1 (100)"."""
    sizes = _site_sizes(diagnostics)
    if len(sizes) > 1:
        return "latent sites " + ", ".join(f"{s} ({n})" for s, n in sizes.items())
    return f"latent dimension {diagnostics.sizes['latent']}"


def active_units_line(diagnostics: xr.Dataset) -> str:
    """ "3 of 20", with several latent sites followed by each site's count and its mean KL per unit."""
    line = f"{diagnostics.attrs['num_active']} of {diagnostics.sizes['latent']}"
    sizes = _site_sizes(diagnostics)
    if len(sizes) > 1:
        parts = []
        for site, n in sizes.items():
            kl = diagnostics["kl"].values[diagnostics["latent_site"].values == site] if "kl" in diagnostics else []
            total = f", KL {float(np.sum(kl)):.2f} nats" if len(kl) and np.isfinite(kl).all() else ""
            parts.append(f"{site}: {diagnostics.attrs.get(f'num_active_{site}', '?')} of {n}{total}")
        line += " (" + "; ".join(parts) + ")"
    return line


def write_report(
    path: Path, run: Run, sel: Selection, comparison: Comparison, figures: List[Tuple[str, Figure]]
) -> Path:
    """Render and write the HTML report atomically; returns ``path``."""
    path = Path(path)
    write_text(path, render_html(run, sel, comparison, figures))
    return path


__all__ = [
    "Comparison",
    "compare_run",
    "comparison_warnings",
    "figure_to_data_uri",
    "active_units_line",
    "format_gap_table",
    "latent_description",
    "estimate_warnings",
    "per_datapoint_table",
    "render_html",
    "select_datapoints",
    "write_report",
]
