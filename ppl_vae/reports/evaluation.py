"""log p(x) of a run's datapoints by any registered estimator, with what each number is.

:func:`evaluate_run` loads a run directory, picks the datapoints of a split (the same selection
as ``compare``: :func:`ppl_vae.reports.common.select_datapoints`) and scores them with an
estimator of :data:`ppl_vae.inference.estimators.ESTIMATORS` (``iw``, ``jackknife``, ``ais``,
``bdmc``, ``mis``, ``appendix_d``, or one a plugin registers): log p̂(x) per datapoint, its
Monte Carlo standard error and the estimator's further quantities and diagnostics. Nothing here
depends on which estimator it is: the files, the summary and the warnings come from the
estimator's registration.

Every variable of the saved netCDF has an attribute ``bound`` ("lower bound", "upper bound" or
"neither"), and :attr:`Evaluation.warnings` names the weak estimates and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ppl_vae.inference import estimators
from ppl_vae.reports.blocks import BlockTask, is_writer, map_blocks, rank_device
from ppl_vae.reports.common import Stages, check_out_dir  # noqa: F401  (check_out_dir re-exported for the CLI)

if TYPE_CHECKING:  # xarray and the writers (ArviZ, pandas) are imported after the scoring
    import xarray as xr

NAMES = {k: f"{o.flag} ({k})" for k, o in estimators.OPTIONS.items()}
NAMES["estimator"] = "another --estimator, e.g. ais (estimator='ais')"
"""How warnings name what to change: the CLI flag, then the library argument."""


def evaluation_warnings(ds: xr.Dataset, names: Optional[Dict[str, str]] = None) -> List[str]:
    """One line per weak estimate in an evaluation dataset, saying what to raise (named as the
    CLI flag and the library argument: ``names``, by default :data:`NAMES`, evaluate's; another
    command passes its own). The estimator's registration makes them."""
    return estimators.get(str(ds.attrs["estimator"])).weak(ds, {**NAMES, **(names or {})})


@dataclass
class Evaluation:
    """Per-datapoint estimates (``dataset``), the files written, and printable lines.

    ``warnings``: one line per weak estimate (a list of str, as on
    :class:`~ppl_vae.reports.compare.Comparison` and
    :class:`~ppl_vae.reports.multirun.MultiComparison`), computed from ``dataset`` by
    :func:`evaluation_warnings` when not given.
    """

    dataset: xr.Dataset
    files: Dict[str, Path] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    """Filled from ``dataset`` by :func:`evaluation_warnings` when left empty."""

    def __post_init__(self) -> None:
        if not self.warnings:
            self.warnings = evaluation_warnings(self.dataset)

    @property
    def num_datapoints(self) -> int:
        """The number of datapoints of the split that were scored."""
        return int(self.dataset.sizes["datapoint"])

    @property
    def estimator(self) -> str:
        return str(self.dataset.attrs["estimator"])

    def summary(self) -> str:
        """What was estimated, each number with the kind of bound it is (nats per datapoint)."""
        lines = estimators.get(self.estimator).lines(self.dataset)
        metrics = str(self.dataset.attrs.get("label_metrics", ""))
        return "\n".join(lines + (metrics.split(" | ") if metrics else []))


class _EvaluateTask(BlockTask):
    """One block of ``evaluate``: the estimator on datapoints [start, stop) of the selection."""

    def __init__(
        self,
        run_dir: Path,
        device: str,
        split: str,
        num_datapoints: Optional[int],
        seed: int,
        estimator: str,
        options: dict,
        loaded: Any = None,
    ):
        super().__init__()
        self.run_dir, self.device_name, self.split, self.num_datapoints = run_dir, device, split, num_datapoints
        self.seed, self.estimator, self.options = seed, estimator, options
        self._cache = loaded

    def load(self):
        from ppl_vae.pipeline import load_run
        from ppl_vae.reports.common import select_datapoints

        run = load_run(self.run_dir, self.device_name, history=False)
        return run, select_datapoints(run, self.split, self.num_datapoints, self.seed)

    def score(self, start: int, stop: int) -> xr.Dataset:
        run, sel = self.loaded
        return score_block(run, sel, start, stop, self.estimator, self.options)


def _hints(run: Any, sel: Any) -> Dict[str, str]:
    """How the warnings name another estimator: not AIS where it cannot run on the model (a
    latent site off the real line, e.g. the relaxed GMVAE's simplex: AIS refuses it)."""
    import torch

    from ppl_vae.inference.latents import model_layout

    kwargs: Dict[str, Any] = {k: v[:2] if torch.is_tensor(v) else v for k, v in sel.model_kwargs(run).items()}
    try:
        model_layout(run.vae.model, sel.x[:2], **kwargs)
    except ValueError:
        return {
            "estimator": "another --estimator that applies to this model (not ais, mis or appendix_d, which move "
            "latents freely: its latent sites are not all on the real line)"
        }
    return {}


def score_block(run: Any, sel: Any, start: int, stop: int, estimator: str, options: Dict[str, Any]) -> xr.Dataset:
    """The estimator's dataset for the selection's datapoints [start, stop) of a run, drawn from
    the caller's random stream (:func:`~ppl_vae.reports.blocks.map_blocks` seeds it per block).
    ``evaluate`` and multi-run ``compare`` both score through it."""
    vae = run.vae
    kwargs = {k: v[start:stop] for k, v in sel.model_kwargs(run).items()}
    try:
        est = estimators.get(estimator)(vae.model, vae.guide, sel.x[start:stop], seed=None, **options, **kwargs)
    except ValueError as exc:  # the estimator's refusal names a site or a size: say which run and model too
        raise ValueError(
            f"estimator {estimator!r} on model {run.config.model.model!r} (run {run.run_dir}): {exc}"
        ) from None
    return est.to_dataset(sel.index[start:stop])


def join_blocks(parts: Sequence[xr.Dataset]) -> xr.Dataset:
    """Per-block datasets joined along ``datapoint`` in order (variables without that dim and the
    attributes come from the first block)."""
    if len(parts) == 1:
        return parts[0]
    import xarray as xr

    ds = xr.concat(
        parts, dim="datapoint", data_vars="minimal", coords="minimal", compat="override", combine_attrs="override"
    )
    return ds


def evaluate_run(
    run_dir: Path,
    *,
    estimator: str = "iw",
    split: str = "test",
    num_datapoints: Optional[int] = None,
    batch_size: int = 100,
    device: str = "cpu",
    seed: int = 0,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    nproc: int = 1,
    threads: Optional[int] = None,
    stages: Optional[Stages] = None,
    **options: Any,
) -> Evaluation:
    """Estimate log p(x) for a run's datapoints by ``estimator``; write netCDF + CSV.

    ``estimator``: a name of :data:`~ppl_vae.inference.estimators.ESTIMATORS`; ``options``: its
    own options (``num_samples``, ``num_steps``, ``num_chains``, ...: see
    :data:`~ppl_vae.inference.estimators.OPTIONS` and ``docs/estimators.md``), unset ones at the
    estimator's defaults. An option the estimator does not take is refused in one line before
    anything is loaded. Files go to ``out_dir`` (default: the run directory), checked before
    any work is done; their names come from the estimator's registration.

    ``num_datapoints``: how many datapoints of ``split`` are scored (None or 0: all; else a
    seeded subset, the same rule as ``compare``: :func:`~ppl_vae.reports.common.select_datapoints`).
    Datapoints are scored in blocks of ``batch_size`` (or the estimator's own block, e.g.
    mean-field VI's batch for ``mis``), each with its own seed derived from ``seed`` and the
    block's first datapoint (:mod:`ppl_vae.reports.blocks`), so the numbers do not depend on
    ``nproc``: with ``nproc > 1`` (or under ``torchrun``) the blocks are split across processes
    and joined exactly. ``threads``: torch threads per process (default: the available cores,
    shared among the processes). The caller's RNG state is left as it was. ``stages``, if given,
    gets the wall time of each stage (load, scoring, writing: ``--profile``).
    """
    from ppl_vae.pipeline import load_run
    from ppl_vae.reports.common import select_datapoints

    stages = Stages() if stages is None else stages

    est = estimators.get(estimator)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    options = estimators.check_options(estimator, {**options, "batch_size": batch_size}, given=list(options))
    options.pop("seed", None)
    options.pop("progress", None)
    device = rank_device(device)  # under torchrun: this rank's GPU
    with stages.stage("load"):
        run = load_run(run_dir, device, history=False)
        writer = is_writer()
        out = check_out_dir(Path(run.run_dir) if out_dir is None else Path(out_dir)) if writer else None
        sel = select_datapoints(run, split, num_datapoints or None, seed)
    block = est.blocks(options) or int(batch_size)
    task = _EvaluateTask(
        Path(run_dir), device, split, num_datapoints or None, seed, estimator, options, loaded=(run, sel)
    )
    with stages.stage("scoring"):
        parts = map_blocks(task, len(sel.index), block, seed, nproc=nproc, threads=threads, progress=progress)
        ds = join_blocks(parts)
    from ppl_vae.models.vae import evidence_of

    ds.attrs.update(
        {
            "split": split,
            "run_dir": str(run.run_dir),
            "made_from": run.made_from,  # which weights: a resume moves the run on, not this file
            "model": run.config.model.model,
            "dataset": run.config.data.dataset,
            "seed": seed,
            "block_size": int(block),
            "num_datapoints": int(len(sel.index)),
            "evidence": evidence_of(run.vae),  # what log_px estimates
            "seeding": "each block of block_size datapoints draws from a seed derived from "
            "(seed, its first datapoint): results do not depend on the number of processes",
        }
    )
    from ppl_vae.analysis.gaps import relabel

    ds = relabel(ds, str(ds.attrs["evidence"]))  # its descriptions say log p(x | y) for a model given labels
    if getattr(sel, "preprocessing", None):  # how the split was binarized for scoring
        ds.attrs["preprocessing"] = str(sel.preprocessing)
    from ppl_vae.reports.common import label_metric_lines

    if est.simulated:  # its rows are draws from the model, one per selected datapoint, not those datapoints
        import numpy as np

        ds = ds.assign_coords(datapoint=np.arange(ds.sizes["datapoint"]))
        ds.attrs["split"] = f"none: {ds.sizes['datapoint']} datapoints simulated from the model"
        metrics: Dict[str, Any] = {}  # a test-set metric does not describe simulated data
        metric_lines: List[str] = []
    else:
        metrics, metric_lines = label_metric_lines(run, sel)
    ds.attrs.update({f"label_metric_{name}": value for name, value in metrics.items()})
    if metric_lines:
        ds.attrs["label_metrics"] = " | ".join(metric_lines)
    evaluation = Evaluation(ds, warnings=evaluation_warnings(ds, _hints(run, sel)))
    ds.attrs["warnings"] = " | ".join(evaluation.warnings) or "none"
    if not writer or out is None:
        return evaluation
    with stages.stage("writing"):
        from ppl_vae.analysis import results

        nc_name, csv_name = est.files
        per_chain = [v for v in ds.data_vars if "chain" in ds[v].dims]  # the CSV keeps one row per datapoint (and T)
        table = ds.drop_vars(per_chain + (["chain"] if "chain" in ds.coords else []))
        evaluation.files = {
            "netcdf": results.save_netcdf(ds, out / nc_name),
            "csv": results.save_csv(table, out / csv_name),
        }
    return evaluation
