"""``ppl-vae compare``: amortized vs mean-field inference for one run, or several runs on the same
datapoints with paired differences; an HTML report and tables either way."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import click

from ppl_vae import io
from ppl_vae.cli import options as opt
from ppl_vae.cli.evaluate import estimator_option, estimator_options, given_options, print_profile, profile_option
from ppl_vae.estimator_options import (
    ADAM_STEPS_BEFORE_POLISH,
    MEAN_FIELD_GTOL,
    MEAN_FIELD_INIT,
    MEAN_FIELD_INIT_CHOICES,
    MEAN_FIELD_LR,
    MEAN_FIELD_POLISH_STEPS,
    MEAN_FIELD_TOL,
)


@click.command()
@click.argument("run_dirs", metavar="RUN...", nargs=-1, required=True, type=click.Path(path_type=Path))
@opt.num_samples_option(
    1000, "Draws K of q and K of q* per datapoint for log p̂(x), L[q], L[q*].", "--num-samples", "-k"
)
@estimator_option(
    "mis",
    "With several runs: any estimator of log p(x) on the data (docs/estimators.md; not one that simulates its own), e.g. 'mis' (gap decomposition, q* fitted "
    "per run) or 'iw' (amortized IW only). One run's compare is always the gap decomposition.",
)
@estimator_options(skip=("num_samples", "mean_field_options"))  # (compare's own -k and --mf-* flags)
@opt.split_option()
@opt.num_datapoints_option(
    500, "the same rule as evaluate, whose default is all: q* is fitted per datapoint, hence 500 here"
)
@click.option("--num-draws", type=int, default=100, show_default=True, help="Draws of z per guide kept for ArviZ.")
@click.option(
    "--init",
    type=click.Choice(MEAN_FIELD_INIT_CHOICES),
    default=MEAN_FIELD_INIT,
    show_default=True,
    help="Where mean-field VI starts.",
)
@click.option(
    "--mf-steps",
    type=int,
    default=None,
    help="Most Adam steps of mean-field VI before the L-BFGS polish (default: "
    f"{ADAM_STEPS_BEFORE_POLISH}; the polish finishes the fit).",
)
@click.option(
    "--mf-polish-steps",
    type=int,
    default=MEAN_FIELD_POLISH_STEPS,
    show_default=True,
    help="Most L-BFGS iterations of the deterministic polish of q*.",
)
@click.option(
    "--mf-gtol",
    type=float,
    default=MEAN_FIELD_GTOL,
    show_default=True,
    help="q* counts as converged when its largest ELBO gradient component is below this.",
)
@click.option(
    "--mf-lr", type=float, default=MEAN_FIELD_LR, show_default=True, help="Adam learning rate of mean-field VI."
)
@click.option(
    "--mf-tol",
    type=float,
    default=MEAN_FIELD_TOL,
    show_default=True,
    help="Relative ELBO change that counts as a plateau (Adam's stopping rule).",
)
@opt.device_option()
@opt.seed_option()
@opt.out_option("Folder for report.html and the tables (default: the run directory; RUN1/multirun for several).")
@opt.nproc_option("mean-field VI's 500 datapoints, or of 100 for --estimator iw")
@opt.threads_option()
@opt.progress_option("Show progress bars.")
@profile_option()
def compare(
    run_dirs,
    num_samples: int,
    estimator: str,
    split: str,
    num_datapoints: int,
    num_draws: int,
    init: str,
    mf_steps: Optional[int],
    mf_polish_steps: int,
    mf_gtol: float,
    mf_lr: float,
    mf_tol: float,
    device: str,
    seed: int,
    out,
    nproc: int,
    threads,
    progress: bool,
    profile: bool,
    **values: Any,
) -> None:
    """Gap decomposition (Cremer et al. 2018), diagnostics and a self-contained HTML report.

    With several RUN directories: every run scored on the same datapoints with the same
    estimator, and paired per-datapoint differences to the first run (default --out:
    RUN1/multirun).
    """
    ctx = click.get_current_context()
    given = {p for p in ctx.params if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT}
    if len(run_dirs) == 1 and "estimator" in given and estimator != "mis":
        raise ValueError(
            f"--estimator {estimator} applies to a comparison of several runs; one run's compare is the gap "
            "decomposition (mis): use ppl-vae evaluate RUN --estimator " + estimator
        )
    if len(run_dirs) > 1 and "num_draws" in given:
        raise ValueError("--num-draws applies to one run's compare (its ArviZ draws); a comparison of runs keeps none")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if num_datapoints < 0:
        raise ValueError(f"--num-datapoints must be >= 0, got {num_datapoints}")
    opt.check_processes(nproc, threads)
    options: Dict[str, Any] = given_options(values)  # the estimator's own flags (--ais-steps, ...)
    takes: Dict[str, Any] = {}
    if len(run_dirs) == 1 and options:
        from ppl_vae.estimator_options import OPTIONS

        flags = ", ".join(OPTIONS[name].flag for name in options)
        raise ValueError(
            f"{flags} apply to a comparison of several runs with --estimator; one run's compare is the gap "
            "decomposition (mis), set by -k and the --mf-* flags"
        )
    if len(run_dirs) > 1:  # what the estimator takes, checked before anything is written
        from ppl_vae.inference import estimators

        takes = estimators.get(estimator).options
        if "num_samples" in takes or "num_samples" in given:  # given but not taken: refused, naming both
            options["num_samples"] = num_samples
        mf_given = sorted(f"--{p.replace('_', '-')}" for p in given if p.startswith("mf_") or p == "init")
        if mf_given and "mean_field_options" not in takes:
            raise ValueError(f"{', '.join(mf_given)} do not apply to estimator {estimator!r} (it fits no q*)")
        estimators.check_options(estimator, options, given=list(options))
    if out is not None:
        from ppl_vae.reports.evaluation import check_out_dir

        check_out_dir(out, "--out")  # before any work, naming the flag
    mean_field_options = {
        "init": init,
        **({} if mf_steps is None else {"max_steps": mf_steps}),
        "lr": mf_lr,
        "tol": mf_tol,
        "polish_steps": mf_polish_steps,
        "gtol": mf_gtol,
    }
    if len(run_dirs) > 1:
        start = time.perf_counter()
        from ppl_vae.reports.common import Stages
        from ppl_vae.reports.multirun import compare_runs, format_paired_table

        stages = Stages({"import": time.perf_counter() - start})
        if "mean_field_options" in takes:
            options["mean_field_options"] = mean_field_options
        multi = compare_runs(
            run_dirs,
            estimator=estimator,
            split=split,
            num_datapoints=num_datapoints or None,
            **options,
            device=device,
            seed=seed,
            out_dir=out,
            progress=progress,
            nproc=nproc,
            threads=threads,
            stages=stages,
        )
        if not multi.files:  # a torchrun rank other than 0
            return
        click.echo(format_paired_table(multi.table))
        for line in multi.label_metrics:
            click.echo(line)
        for warning in multi.warnings:
            opt.warn(warning)
        io.after_commit(lambda: click.echo("wrote " + ", ".join(str(p) for p in multi.files.values())))  # once in place
        if profile:
            print_profile(stages)
        return
    start = time.perf_counter()
    from ppl_vae.analysis.gaps import format_gap_table
    from ppl_vae.reports.common import Stages
    from ppl_vae.reports.compare import compare_run

    stages = Stages({"import": time.perf_counter() - start})

    result = compare_run(
        run_dirs[0],
        num_samples=num_samples,
        split=split,
        num_datapoints=num_datapoints or None,
        num_draws=num_draws,
        device=device,
        seed=seed,
        out_dir=out,
        progress=progress,
        mean_field_options=mean_field_options,
        nproc=nproc,
        threads=threads,
        stages=stages,
    )
    if not result.files:  # a torchrun rank other than 0
        return
    click.echo(format_gap_table(result.table, str(result.gaps.attrs.get("evidence", "log p(x)"))))
    from ppl_vae.reports.compare import active_units_line

    click.echo(f"active units: {active_units_line(result.diagnostics)}")
    for warning in result.warnings:
        opt.warn(warning)
    for note in result.notes:
        click.echo(f"note: {note}")
    io.after_commit(lambda: click.echo("wrote " + ", ".join(str(p) for p in result.files.values())))  # once in place
    if profile:
        print_profile(stages)
