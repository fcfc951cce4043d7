"""``ppl-vae fit``: train a model and write a run directory (or continue one with --resume)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import click
from click.core import ParameterSource

from ppl_vae.cli import options as opt
from ppl_vae.config import Declared, declarations

# The flags of the config fields are generated from the fields' declarations (ppl_vae.config);
# their click parameter names, the fields they set and whether a resume may change them follow.
_FLAGGED = [d for d in declarations() if d.flag is not None]
# Options that define a run; with --resume the run's own config decides them. --epochs, --lr and
# --optimizer are declared resumable: training settings a resume may change (a run that diverged
# continues with a smaller step). --epochs goes to resume() as the new total.


def _param(d: Declared) -> str:
    """The click parameter name of a flagged declaration (every one in ``_FLAGGED`` has a flag)."""
    assert d.param is not None, d.path
    return d.param


RESUME_SETTINGS: Tuple[str, ...] = tuple(_param(d) for d in _FLAGGED if d.option.resumable and d.name != "epochs")
RUN_OPTIONS: Tuple[str, ...] = (*(_param(d) for d in _FLAGGED if not d.option.resumable), "out")


@click.command()
@opt.config_options()
@opt.out_option("Run directory (default: a new runs/...).")
@opt.out_option("Continue this run directory.", "--resume")
@click.option(
    "--sample-grids",
    is_flag=True,
    default=False,
    help="Save a grid of samples from fixed z after every epoch (RUN/samples/*.png, RUN/samples.gif).",
)
@click.option(
    "--log",
    "log",
    multiple=True,
    metavar="NAME",
    help="Log training to NAME under the run directory: tensorboard (RUN/tensorboard; needs the "
    "tensorboard extra). Repeatable, one service each.",
)
@click.option(
    "--log-every-steps",
    type=int,
    default=50,
    show_default=True,
    help="Log the minibatch loss, KL weight and learning rate every N optimizer steps.",
)
@opt.progress_option()
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="Data-parallel processes on this machine (DDP; one GPU each on CUDA). Under torchrun leave at 1.",
)
@click.option(
    "--dist-timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds a distributed collective may wait before the run stops with an error.",
)
@click.pass_context
def fit(ctx: click.Context, **opts) -> None:
    """Train a VAE with the --method chosen (svi: AEVB; see `ppl-vae models`) and write config,
    checkpoint and history to a run directory.

    --resume RUN continues a run with its own config; --epochs, --lr, --optimizer and --device may change.
    """
    from ppl_vae.inference import distributed

    run_dir = Path(opts["resume"]) if opts["resume"] is not None else (opts["out"] or None)
    common = dict(
        nproc=opts["nproc"],
        progress=opts["progress"],
        sample_grids=opts["sample_grids"],
        timeout_s=opts["dist_timeout"],
    )
    where = {"run_dir": run_dir}
    started = time.time()
    try:
        with _interrupts_are_never_lost() as interrupted:
            run = _fit_or_resume(ctx, opts, where, common, interrupted)
        if interrupted:
            raise KeyboardInterrupt  # the KeyboardInterrupt raised for it was swallowed on the way
    except KeyboardInterrupt:
        _interrupted(where["run_dir"])
    if distributed.env_rank() != 0:
        return  # under torchrun, rank 0 reports
    _report(run, opts)
    if opts["resume"] is not None and run.new_epochs:
        _note_earlier_outputs(run, started)


#: what a resume rewrites or keeps as the training's own record (not results made from weights)
_TRAINING_FILES = ("config.json", "history.nc", "checkpoint*.safetensors", "*.tmp")
#: the suffixes of results other commands write from a run's weights (evaluate, compare, ...)
_RESULT_SUFFIXES = (".nc", ".csv", ".html", ".png", ".svg", ".pdf")


def _note_earlier_outputs(run, started: float) -> None:
    """Say which results in the run directory were made before this resume: they describe the
    weights of an earlier epoch (their ``made_from`` says which), not the run's new checkpoint,
    and are kept, not removed (they are the user's); training's own frames (samples/) and loggers'
    folders are records of the training and are left out."""
    from ppl_vae.loggers import LOGGERS

    skip_dirs = {"samples", *LOGGERS.names()}
    earlier = []
    for path in sorted(Path(run.run_dir).rglob("*")):
        relative = path.relative_to(run.run_dir)
        if (
            not path.is_file()
            or path.is_symlink()
            or relative.parts[0] in skip_dirs
            or any(relative.match(pattern) for pattern in _TRAINING_FILES)
            or path.suffix not in _RESULT_SUFFIXES
            or path.stat().st_mtime >= started
        ):
            continue
        earlier.append(str(relative))
    if earlier:
        shown = ", ".join(earlier[:12]) + (f" and {len(earlier) - 12} more" if len(earlier) > 12 else "")
        click.echo(
            f"note: {len(earlier)} earlier result{'s' if len(earlier) > 1 else ''} in {run.run_dir} describe the "
            f"weights before this resume, not epoch {run.epochs_done}'s: {shown} (kept; run the commands that made "
            "them again for the new weights)"
        )


def _fit_or_resume(ctx: click.Context, opts: dict, where: dict, common: dict, interrupted: List[int]):
    """Train as the options say; ``where["run_dir"]`` holds the run directory as soon as it is known;
    a recorded interrupt (``interrupted``) stops training at the next step."""
    from ppl_vae import pipeline
    from ppl_vae.loggers import StopWhenInterrupted

    stop = StopWhenInterrupted(interrupted)

    if opts["resume"] is not None:
        given = [o for o in RUN_OPTIONS if ctx.get_parameter_source(o) == ParameterSource.COMMANDLINE]
        if given:
            # the command parsed: a semantic refusal, one line and exit 1 (not click's usage text)
            raise ValueError(f"--resume continues a run with its own config; drop {', '.join(flag(g) for g in given)}")
        epochs = opts["epochs"] if ctx.get_parameter_source("epochs") == ParameterSource.COMMANDLINE else None
        settings = {o: opts[o] for o in RESUME_SETTINGS if ctx.get_parameter_source(o) == ParameterSource.COMMANDLINE}
        callbacks = (stop, *_loggers(opts, Path(where["run_dir"])))
        return pipeline.resume(where["run_dir"], epochs=epochs, callbacks=callbacks, **settings, **common)
    config = run_config(opts)
    from ppl_vae.inference.training import check_given_applies

    check_given_applies(  # a flag typed at its default value does not apply either (QA: --beta 1 with elbo)
        config, [d.path for d in _FLAGGED if ctx.get_parameter_source(str(d.param)) == ParameterSource.COMMANDLINE]
    )
    where["run_dir"] = where["run_dir"] or pipeline.default_run_dir(config)
    return pipeline.fit(config, where["run_dir"], callbacks=(stop, *_loggers(opts, Path(where["run_dir"]))), **common)


def _loggers(opts: dict, run_dir: Path) -> tuple:
    """The training loggers ``--log`` names, writing under ``run_dir``."""
    from ppl_vae.loggers import CompileNotice, make_logger

    if not opts["log"] and opt.given("log_every_steps"):
        raise ValueError("--log-every-steps applies to a training log only: give --log NAME (tensorboard) too")
    twice = sorted({name for name in opts["log"] if opts["log"].count(name) > 1})
    if twice:  # two loggers of one service write every value twice into the same folder
        raise ValueError(f"--log {twice[0]} is given more than once: name each service once")
    loggers = tuple(make_logger(name, run_dir, every_steps=opts["log_every_steps"]) for name in opts["log"])
    return (CompileNotice(), *loggers)


@contextlib.contextmanager
def _interrupts_are_never_lost() -> Iterator[List[int]]:
    """Record every SIGINT while training, besides raising KeyboardInterrupt for it as Python
    does: an interrupt whose exception was swallowed on the way (raised inside a ``__del__`` or
    a C callback, where Python prints "Exception ignored" and goes on) still stops the command
    with exit 130 once training returns, instead of exit 0 as if nobody had pressed Ctrl-C."""
    hits: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield hits
        return

    def handler(signum, frame):
        hits.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, previous)


def _report(run, opts: dict) -> None:
    final = run.final
    if opts["resume"] is None and not final:  # --epochs 0: the initial checkpoint only (e.g. for animate)
        click.echo(
            f"epoch 0: no training step taken, so no ELBO to report; {run.run_dir} holds the initialised "
            "model (ppl-vae fit --resume RUN --epochs N trains it)"
        )
        return
    from ppl_vae.inference.training import history_records, stopped_early

    early = stopped_early(history_records(run.read_history()), run.config.train) if run.epochs_done else None
    if run.new_epochs == 0:
        if early:
            click.echo(f"nothing to do: {run.run_dir} {early}")
        else:
            click.echo(
                f"nothing to do: {run.run_dir} has done {run.epochs_done} of {run.config.train.epochs} "
                f"epochs; --epochs N (more than {run.epochs_done}) trains it longer"
            )
        return
    if early:
        click.echo(early)
    from ppl_vae.models.vae import bounds_of_training_elbos

    bounds = bounds_of_training_elbos(run.vae)
    what = (
        f" on {bounds['test_elbo']}"
        if bounds["train_elbo"] == bounds["test_elbo"]
        else f": the test ELBO on {bounds['test_elbo']}, the train ELBO on {bounds['train_elbo']}"
    )
    click.echo(
        f"epoch {run.epochs_done}: train ELBO {final['train_elbo']:.3f}, test ELBO {final['test_elbo']:.3f} "
        f"nats per datapoint (Monte Carlo estimates of lower bounds{what}; "
        f"{final['wall_time']:.1f} s training)"
    )
    if run.vae.label_metrics:
        from ppl_vae.analysis.semisupervised import describe_label_metrics

        num_test = int(run.read_history().attrs.get("num_test", 0))
        for line in describe_label_metrics(run.vae, final, num_test):
            click.echo(f"epoch {run.epochs_done}: {line}")
    click.echo(f"run directory: {run.run_dir}")


def run_config(opts: dict):
    """The RunConfig that the command-line options describe (plugins: those loaded for this
    command), checked as :func:`ppl_vae.config.check_config` checks it, before any file is written."""
    from ppl_vae.cli.main import active_plugins
    from ppl_vae.config import RunConfig

    return RunConfig.from_flags({d.path: opts[d.param] for d in _FLAGGED}, plugins=active_plugins())


# config field -> the flag that sets it (errors from the library name fields), and the arguments
# of pipeline.fit that fit's own options set
FIELD_FLAGS = {
    **{d.path: d.flag for d in _FLAGGED},
    **{d.label: d.flag for d in _FLAGGED if d.label != d.path},  # model.prior_options.num_components
    "timeout_s": "--dist-timeout",
    "nproc": "--nproc",
    "data_dir": "--data-dir",
    "every_steps": "--log-every-steps",
}


fit.field_flags = FIELD_FLAGS  # type: ignore[attr-defined]  # the group shows library errors (which name fields) with these flags


def parse_model_options(items) -> dict:
    """``KEY=VALUE`` strings -> {KEY: VALUE}, VALUE read as JSON (a bare word stays a string)."""
    from ppl_vae.config import key_values

    try:
        return key_values(items)
    except ValueError as exc:
        raise ValueError(f"--model-option {exc}") from None


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _interrupted(run_dir: Optional[Path]) -> None:
    from ppl_vae import runs

    if run_dir is not None and runs.started(run_dir):
        click.echo(f"Error: interrupted; the last checkpoint is kept: ppl-vae fit --resume {run_dir}", err=True)
    else:
        click.echo(
            "Error: interrupted before the first epoch ended; nothing was kept, so the same command can run again",
            err=True,
        )
    raise SystemExit(130)
