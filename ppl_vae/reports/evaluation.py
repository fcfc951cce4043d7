"""log p(x) of a run's datapoints by importance sampling, AIS or BDMC, with what each number is.

:func:`evaluate_run` loads a run directory, picks the datapoints of a split (the same selection
as ``compare``: :func:`ppl_vae.reports.common.select_datapoints`) and computes, per datapoint,

- ``method="iw"``: the importance-weighted bound with K samples of the run's guide (Burda et
  al. 2015), its standard error, the ELBO, the ESS and PSIS k̂ of the weights, and (K >= 2) the
  jackknife-debiased estimate from the same weights (Nowozin 2018; neither bound);
- ``method="ais"``: annealed importance sampling from the prior (or the guide) with HMC
  (Neal 2001), its standard error over chains, ESS and acceptance rate;
- ``method="bdmc"``: on data simulated from the run's model (as many points as selected),
  forward AIS lower and reverse AIS upper bounds for each number of steps (Grosse et al. 2015).

Every variable of the saved netCDF has an attribute ``bound`` ("lower bound", "upper bound" or
"neither"), and :attr:`Evaluation.warnings` names the weak estimates and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import xarray as xr

from ppl_vae.analysis import results
from ppl_vae.inference.stats import THRESHOLDS
from ppl_vae.reports.blocks import BlockTask, is_writer, map_blocks, rank_device
from ppl_vae.reports.common import check_out_dir  # noqa: F401  (re-exported for the CLI)

METHODS = ("iw", "ais", "bdmc")
FILES = {
    "iw": ("evaluation.nc", "evaluation.csv"),
    "ais": ("evaluation_ais.nc", "evaluation_ais.csv"),
    "bdmc": ("evaluation_bdmc.nc", "evaluation_bdmc.csv"),
}
KHAT_THRESHOLD = THRESHOLDS.khat  # Vehtari et al. (2024): above it the IW estimate is unreliable
NAMES = {
    "num_samples": "--num-samples (num_samples)",
    "num_steps": "--ais-steps (num_steps)",
    "num_chains": "--num-chains (num_chains)",
    "method": "--method ais (method='ais')",
}
"""How warnings name what to change: the CLI flag, then the library argument."""


def _mean_se(v: xr.DataArray) -> str:
    n = v.sizes["datapoint"]
    se = float(v.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return f"{float(v.mean()):12.3f} ± {se:.3f}"


def _mc_se_of_mean(se: xr.DataArray) -> float:
    return float(np.sqrt((se**2).sum())) / se.sizes["datapoint"]


def evaluation_warnings(ds: xr.Dataset, names: Optional[Dict[str, str]] = None) -> List[str]:
    """One line per weak estimate in an evaluation dataset, saying what to raise (named as the
    CLI flag and the library argument: ``names``, by default :data:`NAMES`, evaluate's; another
    command passes its own). The one place these warnings are made."""
    names = {**NAMES, **(names or {})}
    n = ds.sizes["datapoint"]
    out = []
    method = ds.attrs["method"]
    if method == "iw":
        k = ds.attrs["num_samples"]
        if "khat" in ds:
            bad = ds["khat"].values > KHAT_THRESHOLD
            if bad.any():
                out.append(
                    f"PSIS k̂ > {KHAT_THRESHOLD} for {int(bad.sum())} of {n} datapoints (max "
                    f"{np.nanmax(ds['khat'].values):.2f}): their IW estimates and standard errors are "
                    f"unreliable; raise {names['num_samples']} or use {names['method']}"
                )
            elif k < 21:
                out.append(f"K={k} is too few for a PSIS k̂ tail check; raise {names['num_samples']} to 21 or more")
        low = THRESHOLDS.low_ess(ds["ess"].values, k)
        if low.any():
            out.append(
                f"importance-weight ESS < {min(THRESHOLDS.min_ess, k / 2):g} for {int(low.sum())} of {n} datapoints: a few "
                f"samples carry the estimate; raise {names['num_samples']} or use {names['method']}"
            )
    elif method == "ais":
        c = ds.attrs["num_chains"]
        low = THRESHOLDS.low_ess(ds["ess"].values, c)
        if c > 1 and low.sum() > 0.1 * n:
            out.append(
                f"AIS chain ESS < {min(THRESHOLDS.min_ess, c / 2):g} of {c} for {int(low.sum())} of {n} datapoints: the chains "
                f"disagree and the standard error is optimistic; raise {names['num_steps']}"
            )
        acc = ds["accept_rate"].values
        if np.nanmean(acc) < 0.3:
            out.append(
                f"HMC acceptance is {np.nanmean(acc):.2f} on average: the chains barely move; raise "
                f"{names['num_steps']} (the step size adapts over more temperatures)"
            )
        if c == 1:
            out.append(f"one chain per datapoint gives no standard error; raise {names['num_chains']}")
    else:
        gap = float(ds["gap"].isel(num_steps=-1).mean())
        if gap > 1.0:
            out.append(
                f"the BDMC sandwich is still {gap:.2f} nats wide at the largest step count: raise "
                f"{names['num_steps']} before trusting either bound to within a nat"
            )
    return out


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
    def method(self) -> str:
        return str(self.dataset.attrs["method"])

    def summary(self) -> str:
        """What was estimated, each number with the kind of bound it is (nats per datapoint)."""
        ds = self.dataset
        n = ds.sizes["datapoint"]
        split = ds.attrs.get("split", "")
        if self.method == "iw":
            k = ds.attrs["num_samples"]
            lines = [
                f"log p(x) estimate {float(ds['log_likelihood'].mean()):.3f} (IW, K={k}: a stochastic lower bound, "
                f"below log p(x) in expectation; mean over {n} {split} datapoints)",
                f"{n} {split} datapoints, K = {k} importance samples (nats per datapoint, mean ± se over datapoints)",
                f"{'log p̂(x) (IW)':<30} {_mean_se(ds['log_likelihood'])}  stochastic lower bound on log p(x)",
                f"{'ELBO L[q]':<30} {_mean_se(ds['elbo'])}  lower bound",
                *(
                    [
                        f"{'log p̂(x) (IW, jackknife)':<30} {_mean_se(ds['log_likelihood_jackknife'])}  estimate, neither bound"
                    ]
                    if "log_likelihood_jackknife" in ds
                    else []
                ),
                f"{'log p̂(x) − L[q]':<30} {_mean_se(ds['log_likelihood'] - ds['elbo'])}  estimate (>= 0)",
                f"{'Monte Carlo se of mean log p̂':<30} {_mc_se_of_mean(ds['log_likelihood_stderr']):12.3f}",
                f"{'ESS of the weights (mean)':<30} {float(ds['ess'].mean()):12.1f} of {k}",
            ]
            if "khat" in ds:
                khat = ds["khat"].values
                finite = khat[np.isfinite(khat)]
                worst = f"{finite.max():.2f}" if finite.size else "n/a"
                lines.append(
                    f"{'PSIS k̂ (max; share > 0.7)':<30} {worst:>12} ({int((khat > KHAT_THRESHOLD).sum())} of {n})"
                )
            return "\n".join(lines)
        if self.method == "ais":
            t, c, start = ds.attrs["num_steps"], ds.attrs["num_chains"], ds.attrs["start"]
            return "\n".join(
                [
                    f"log p(x) estimate {float(ds['log_px'].mean()):.3f} (AIS, T={t} steps, C={c} chains from the {start}: "
                    f"a stochastic lower bound, below log p(x) in expectation; mean over {n} {split} datapoints)",
                    f"{'log p̂(x) (AIS)':<30} {_mean_se(ds['log_px'])}  stochastic lower bound on log p(x) "
                    "(mean ± se over datapoints)",
                    f"{'Monte Carlo se of mean log p̂':<30} {_mc_se_of_mean(ds['log_px_stderr']):12.3f}",
                    f"{'ESS of the chains (mean)':<30} {float(ds['ess'].mean()):12.1f} of {c}",
                    f"{'HMC acceptance (mean)':<30} {float(ds['accept_rate'].mean()):12.2f}",
                ]
            )
        lines = [
            f"BDMC on {n} datapoints simulated from the model (C={ds.attrs['num_chains']} chains; "
            "nats per datapoint, mean over datapoints):",
            f"{'steps':>8} {'lower (fwd AIS)':>16} {'upper (rev AIS)':>16} {'gap':>8}",
        ]
        for t in ds["num_steps"].values:
            s = ds.sel(num_steps=t)
            lines.append(
                f"{int(t):>8} {float(s['lower'].mean()):16.3f} {float(s['upper'].mean()):16.3f} "
                f"{float(s['gap'].mean()):8.3f}"
            )
        last = ds.isel(num_steps=-1)
        lines.append(
            f"{float(last['lower'].mean()):.3f} <= log p(x) <= {float(last['upper'].mean()):.3f} "
            f"(BDMC, T={int(last['num_steps'])}: stochastic lower and upper bounds on simulated data)"
        )
        return "\n".join(lines)


class _EvaluateTask(BlockTask):
    """One block of ``evaluate``: the estimator on datapoints [start, stop) of the selection."""

    def __init__(
        self,
        run_dir: Path,
        device: str,
        split: str,
        num_datapoints: Optional[int],
        seed: int,
        method: str,
        options: dict,
        loaded: Any = None,
    ):
        super().__init__()
        self.run_dir, self.device_name, self.split, self.num_datapoints = run_dir, device, split, num_datapoints
        self.seed, self.method, self.options = seed, method, options
        self._cache = loaded

    def load(self) -> Tuple[Any, Any]:
        from ppl_vae.pipeline import load_run
        from ppl_vae.reports.common import select_datapoints

        run = load_run(self.run_dir, self.device_name)
        return run, select_datapoints(run, self.split, self.num_datapoints, self.seed)

    def score(self, start: int, stop: int) -> xr.Dataset:
        from ppl_vae.inference.ais import AISSettings, ais_log_likelihood, bdmc, simulate_data
        from ppl_vae.inference.importance import importance_estimate

        run, sel = self.loaded
        vae, o = run.vae, self.options
        x = sel.x[start:stop]
        kwargs = {k: v[start:stop] for k, v in sel.model_kwargs(run).items()}
        index = sel.index[start:stop]
        if self.method == "iw":
            est = importance_estimate(
                vae.model,
                vae.guide,
                x,
                num_samples=o["num_samples"],
                batch_size=o["batch_size"],
                particle_batch_size=o["particle_batch_size"],
                jackknife=o["num_samples"] >= 2,  # from the same weights: nearly free
                **kwargs,
            )
            return est.to_dataset(index)
        guide = None if o["ais_start"] == "prior" else vae.guide
        settings = AISSettings(
            num_leapfrog_steps=o["num_leapfrog_steps"],
            step_size=o["step_size"],
            adaptation=o["adaptation"],
            schedule=o["schedule"],
            batch_size=o["batch_size"],
        )
        ais_opts = dict(num_chains=o["num_chains"], settings=settings, progress=False, datapoint=index, **kwargs)
        if self.method == "ais":
            return ais_log_likelihood(vae.model, guide, x, num_steps=o["num_steps"][0], **ais_opts)
        x_sim, z_sim = simulate_data(vae.model, x, **kwargs)
        return bdmc(vae.model, guide, x_sim, z_sim, step_counts=o["num_steps"], **ais_opts)


def join_blocks(parts: Sequence[xr.Dataset]) -> xr.Dataset:
    """Per-block datasets joined along ``datapoint`` in order (variables without that dim and the
    attributes come from the first block)."""
    if len(parts) == 1:
        return parts[0]
    ds = xr.concat(
        parts, dim="datapoint", data_vars="minimal", coords="minimal", compat="override", combine_attrs="override"
    )
    return ds


def evaluate_run(
    run_dir: Path,
    *,
    method: str = "iw",
    num_samples: int = 1000,
    num_steps: Sequence[int] = (500,),
    num_chains: int = 16,
    num_leapfrog_steps: int = 10,
    step_size: float = 0.1,
    adaptation: str = "pilot",
    schedule: str = "sigmoid",
    ais_start: str = "prior",
    split: str = "test",
    num_datapoints: Optional[int] = None,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    device: str = "cpu",
    seed: int = 0,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    nproc: int = 1,
    threads: Optional[int] = None,
) -> Evaluation:
    """Estimate log p(x) for a run's datapoints by ``method`` ("iw", "ais" or "bdmc"); write netCDF + CSV.

    ``num_samples``: K for IW. ``num_steps``: the AIS temperatures (exactly one for "ais"; one or
    more for "bdmc"), ``num_chains`` per datapoint, ``num_leapfrog_steps`` per HMC move,
    ``step_size`` the initial leapfrog step (adapted per datapoint as ``adaptation`` says:
    "pilot", "online" or "none"; see :mod:`ppl_vae.inference.ais`), ``schedule`` "sigmoid" or
    "linear", ``ais_start`` "prior" or "guide" (anneal from q(z|x)). Files go to ``out_dir``
    (default: the run directory), checked before any work is done.

    ``num_datapoints``: how many datapoints of ``split`` are scored (None or 0: all; else a
    seeded subset, the same rule as ``compare``: :func:`~ppl_vae.reports.common.select_datapoints`).
    Datapoints are scored in blocks of ``batch_size``, each with its own seed derived from
    ``seed`` and the block's first datapoint (:mod:`ppl_vae.reports.blocks`), so the numbers
    do not depend on ``nproc``: with ``nproc > 1`` (or under ``torchrun``) the blocks are
    split across processes and joined exactly. ``threads``: torch threads per process
    (default: the available cores, shared among the processes). The caller's RNG state is
    left as it was.
    """
    from ppl_vae.pipeline import load_run
    from ppl_vae.reports.common import select_datapoints

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if ais_start not in ("prior", "guide"):
        raise ValueError(f"ais_start must be 'prior' or 'guide', got {ais_start!r}")
    num_steps = list(num_steps)
    if method == "ais" and len(num_steps) != 1:
        raise ValueError(f"method 'ais' takes exactly one num_steps (several are for 'bdmc'), got {num_steps}")
    if method != "iw":
        if not num_steps or any(int(t) != t or t < 1 for t in num_steps):
            raise ValueError(f"num_steps must be positive integers, got {num_steps}")
        if int(num_chains) != num_chains or num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
    elif num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = rank_device(device)  # under torchrun: this rank's GPU
    run = load_run(run_dir, device)
    writer = is_writer()
    out = check_out_dir(Path(run.run_dir) if out_dir is None else Path(out_dir)) if writer else None
    sel = select_datapoints(run, split, num_datapoints or None, seed)
    options = dict(
        num_samples=num_samples,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        num_steps=num_steps,
        num_chains=num_chains,
        num_leapfrog_steps=num_leapfrog_steps,
        step_size=step_size,
        adaptation=adaptation,
        schedule=schedule,
        ais_start=ais_start,
    )
    task = _EvaluateTask(Path(run_dir), device, split, num_datapoints or None, seed, method, options, loaded=(run, sel))
    ds = join_blocks(
        map_blocks(task, len(sel.index), batch_size, seed, nproc=nproc, threads=threads, progress=progress)
    )
    if method == "bdmc":
        ds.attrs["data"] = "simulated from the run's model: z* ~ p(z), x ~ p(x|z*), one per selected datapoint"
    ds.attrs.update(
        {
            "split": split,
            "run_dir": str(run.run_dir),
            "model": run.config.model.model,
            "dataset": run.config.data.dataset,
            "seed": seed,
            "block_size": int(batch_size),
            "num_datapoints": int(len(sel.index)),
            "seeding": "each block of block_size datapoints draws from a seed derived from "
            "(seed, its first datapoint): results do not depend on the number of processes",
        }
    )
    if getattr(sel, "preprocessing", None):  # how the split was binarized for scoring
        ds.attrs["preprocessing"] = str(sel.preprocessing)
    evaluation = Evaluation(ds)
    ds.attrs["warnings"] = " | ".join(evaluation.warnings) or "none"
    if not writer or out is None:
        return evaluation
    nc_name, csv_name = FILES[method]
    per_chain = [v for v in ds.data_vars if "chain" in ds[v].dims]
    table = ds.drop_vars(per_chain + (["chain"] if "chain" in ds.coords else []))
    evaluation.files = {
        "netcdf": results.save_netcdf(ds, out / nc_name),
        "csv": results.save_csv(table, out / csv_name),
    }
    return evaluation
