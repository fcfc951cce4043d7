"""``ppl-vae evaluate``: log p(x) per datapoint for a run directory by any registered estimator.

The estimator's flags are generated from their one declaration,
:data:`ppl_vae.estimator_options.OPTIONS`; a flag the chosen estimator does not take is refused
in one line, never ignored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click

from ppl_vae import io
from ppl_vae.cli import options as opt
from ppl_vae.config import loads
from ppl_vae.estimator_options import OPTIONS, Option


class EstimatorChoice(click.Choice):
    """The registered estimators' names, read from the registry only when needed (``--help`` or
    parsing), so importing the CLI imports none of the estimators."""

    def __init__(self) -> None:
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> List[str]:
        from ppl_vae.inference import estimators

        return estimators.names()

    @choices.setter
    def choices(self, value: Any) -> None:
        pass


def estimator_option(default: str, help: str, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--estimator NAME``: one of the registered estimators (``evaluate`` and ``compare``)."""
    return click.option(
        *(names or ("--estimator",)), type=EstimatorChoice(), default=default, show_default=True, help=help
    )


def profile_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--profile``: print each stage's wall time (import, load, scoring, writing, report), with the
    kernel time and page faults of the stage, to stderr."""
    return click.option(
        "--profile",
        is_flag=True,
        default=False,
        help="Print the wall time of each stage (import, load, scoring, writing, report), its system time and "
        "page faults, and when the scoring began, to stderr.",
    )


def print_profile(stages: Any) -> None:
    """The ``--profile`` lines of a :class:`~ppl_vae.reports.common.Stages`, on stderr."""
    for line in stages.lines():
        click.echo(f"profile: {line}", err=True)


def _flag_option(name: str, o: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    flags = [o.flag] + ([o.short] if o.short else [])
    if not o.checked:  # KEY=VALUE pairs of another function's options
        return click.option(*flags, name, type=str, multiple=True, metavar="KEY=VALUE", help=o.help)
    kind: Any = click.Choice(list(o.choices)) if o.choices else (int if o.integer else float)
    return click.option(*flags, name, type=kind, default=None, multiple=o.multiple, help=o.help)


def estimator_options(skip: tuple = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One flag per declared estimator option (default: the chosen estimator's own)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for name, o in reversed(list(OPTIONS.items())):
            if name not in skip:
                f = _flag_option(name, o)(f)
        return f

    return decorate


def given_options(values: Dict[str, Any]) -> Dict[str, Any]:
    """The estimator options the user set (None and empty repeats are unset), KEY=VALUE pairs
    parsed into a dict."""
    out: Dict[str, Any] = {}
    for name, value in values.items():
        if value is None or value == ():
            continue
        o = OPTIONS[name]
        if not o.checked:
            out[name] = _pairs(o.flag, value)
        elif o.multiple:
            out[name] = list(value)
        else:
            out[name] = value
    return out


def _pairs(flag: str, items: Any) -> Dict[str, Any]:
    parsed: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@estimator_option(
    "iw",
    "How log p(x) is estimated (every estimator gives log p(x) per datapoint with its standard error and "
    "says which bound it is): see docs/estimators.md.",
)
@estimator_options()
@opt.split_option()
@opt.num_datapoints_option(0, "the same rule as compare")
@click.option("--batch-size", type=int, default=100, show_default=True, help="Datapoints per batch.")
@opt.device_option()
@opt.seed_option()
@opt.out_option("Folder for the netCDF and CSV files (default: the run directory).")
@opt.nproc_option("--batch-size")
@opt.threads_option()
@opt.progress_option()
@profile_option()
def evaluate(
    run_dir: Path,
    estimator: str,
    split: str,
    num_datapoints: int,
    batch_size: int,
    device: str,
    seed: int,
    out: Optional[Path],
    nproc: int,
    threads: Optional[int],
    progress: bool,
    profile: bool,
    **values: Any,
) -> None:
    """Estimate log p(x) of a run's datapoints; every number printed and saved says which bound it is."""
    start = time.perf_counter()
    from ppl_vae.inference import estimators
    from ppl_vae.reports.evaluation import Stages, check_out_dir, evaluate_run

    stages = Stages({"import": time.perf_counter() - start})

    options = estimators.check_options(estimator, given_options(values), given=list(given_options(values)))
    if estimators.get(estimator).simulated and opt.given("split"):
        raise ValueError(
            f"--split does not apply to estimator {estimator!r}: it scores data simulated from the model "
            "(--num-datapoints sets how many)"
        )
    checks = [("--batch-size", batch_size, 1), ("--nproc", nproc, 1), ("--num-datapoints", num_datapoints, 0)]
    if threads is not None:
        checks.append(("--threads", threads, 1))
    for flag, value, low in checks:
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if out is not None:
        check_out_dir(out, "--out")
    result = evaluate_run(
        run_dir,
        estimator=estimator,
        split=split,
        num_datapoints=num_datapoints or None,
        batch_size=batch_size,
        device=device,
        seed=seed,
        out_dir=out,
        progress=progress,
        nproc=nproc,
        threads=threads,
        stages=stages,
        **options,
    )
    if not result.files:  # a torchrun rank other than 0: rank 0 prints and writes
        return
    click.echo(result.summary())
    for line in result.warnings:
        opt.warn(line)
    io.after_commit(lambda: click.echo("wrote " + ", ".join(str(p) for p in result.files.values())))  # once in place
    if profile:
        print_profile(stages)
