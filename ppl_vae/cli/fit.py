"""``ppl-vae fit``: train a model and write a run directory (or continue one with --resume)."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import click
from click.core import ParameterSource

from ppl_vae.cli import options as opt

# Options that define a run; with --resume the run's own config decides them. --lr and
# --optimizer are training settings a resume may change (a run that diverged continues with a
# smaller step), like --epochs.
RESUME_SETTINGS = ("lr", "optimizer")
RUN_OPTIONS = (
    "model",
    "dataset",
    "data_dir",
    "num_images",
    "prior",
    "likelihood",
    "latent_dim",
    "hidden_dim",
    "guide",
    "num_components",
    "method",
    "batch_size",
    "elbo",
    "num_particles",
    "kl_warmup",
    "seed",
    "device",
    "out",
    "binarize",
    "train_size",
    "train_eval_size",
    "compile",
    "labels",
    "label_seed",
    "lr_schedule",
    "lr_schedule_options",
    "clip_grad_norm",
    "val_fraction",
    "early_stopping_patience",
    "kl_schedule",
    "kl_weight",
    "kl_cycle_epochs",
    "kl_cycle_ratio",
    "precision",
    "model_option",
    # disentangling objectives (ppl_vae.inference.disentangle)
    "objective",
    "beta",
    "capacity_max",
    "capacity_start_epoch",
    "capacity_end_epoch",
    "gamma",
    "tc_alpha",
    "tc_beta",
    "tc_gamma",
    "tc_estimator",
    "free_bits",
    "free_bits_groups",
)


@click.command()
@click.option("--model", default="gaussian_mlp", show_default=True, help="Registered model (see `ppl-vae models`).")
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="digits (embedded), mnist, fashion-mnist, frey-face, dsprites (generated), or a .npy/.npz/.csv path.",
)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Folder holding the dataset's files.")
@click.option(
    "--num-images",
    type=int,
    default=None,
    help="dsprites: render (or read) a seeded random subset of this many images (default 10,000).",
)
@click.option("--prior", default="standard_normal", show_default=True, help="Prior over z.")
@click.option("--likelihood", default=None, help="Likelihood of x (default: the model's own).")
@click.option("--latent-dim", type=int, default=None, help="Size of z (default: the model's).")
@click.option("--hidden-dim", type=int, default=None, help="Hidden units per layer (default: the model's).")
@click.option(
    "--model-option",
    "model_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the model's builder, VALUE in JSON (e.g. z1_dim=64, hidden_dims='[[64],[32]]', "
    "kl_warmup_fractions='[0.5,1]'); repeatable. See `ppl-vae models`.",
)
@click.option("--num-components", type=int, default=None, help="Components of the mixture_of_gaussians prior.")
@click.option(
    "--guide",
    default="diagonal_normal",
    show_default=True,
    help="Family of the amortized q(z|x): diagonal_normal (AEVB) or a flow (see `ppl-vae models`).",
)
@click.option(
    "--method",
    default="svi",
    show_default=True,
    help="Training method: svi (AEVB); see `ppl-vae models` for the others.",
)
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--optimizer", default="adam", show_default=True, help="adam, adagrad or sgd.")
@click.option(
    "--elbo",
    default="trace",
    show_default=True,
    help="trace (SGVB estimator A, Monte Carlo KL) or mean_field (estimator B, analytic KL).",
)
@click.option(
    "--compile",
    "compile",
    default=None,
    metavar="BACKEND",
    help="Compile the SVI loss with torch.compile (e.g. inductor); parts-based VAEs only.",
)
@click.option("--num-particles", type=int, default=1, show_default=True, help="Samples of z per datapoint per step.")
@click.option("--kl-warmup", type=int, default=0, show_default=True, help="Epochs over which the KL weight rises to 1.")
@click.option(
    "--kl-schedule",
    default="linear",
    show_default=True,
    help="KL weight over the steps: linear (rises over --kl-warmup epochs), cyclical (Fu et al. 2019) or constant.",
)
@click.option(
    "--kl-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="The KL weight a schedule rises to (or holds, constant).",
)
@click.option("--kl-cycle-epochs", type=int, default=10, show_default=True, help="Epochs per cycle (cyclical).")
@click.option(
    "--kl-cycle-ratio",
    type=float,
    default=0.5,
    show_default=True,
    help="Fraction of each cycle over which the weight rises (cyclical).",
)
@click.option(
    "--lr-schedule",
    default=None,
    metavar="NAME",
    help="A torch.optim.lr_scheduler class, stepped per epoch (StepLR, CosineAnnealingLR, ...; "
    "ReduceLROnPlateau watches the validation ELBO).",
)
@click.option(
    "--lr-schedule-options",
    default=None,
    metavar="JSON",
    help="Keyword arguments of the scheduler as a JSON object, e.g. '{\"step_size\": 10}'.",
)
@click.option(
    "--clip-grad-norm", type=float, default=None, help="Clip the total gradient norm to this before each update."
)
@click.option(
    "--val-fraction",
    type=float,
    default=0.0,
    show_default=True,
    help="Hold out this fraction of the training data (seeded) for the validation ELBO.",
)
@click.option(
    "--early-stopping-patience",
    type=int,
    default=None,
    help="Stop after this many epochs without a better validation ELBO (needs --val-fraction).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16: bfloat16 autocast of the training loss (CUDA only).",
)
@click.option("--binarize", type=click.Choice(["none", "dynamic", "threshold"]), default="none", show_default=True)
@click.option("--train-size", type=int, default=None, help="Use only the first N training points.")
@click.option(
    "--labels",
    type=int,
    default=None,
    help="Semi-supervised (m2): keep N training labels, balanced per class, the rest unlabelled.",
)
@click.option("--label-seed", type=int, default=0, show_default=True, help="Which N points keep labels (--labels).")
@click.option(
    "--train-eval-size",
    type=int,
    default=1000,
    show_default=True,
    help="Training points (a fixed seeded subset) the per-epoch train ELBO uses; 0: all of them.",
)
@click.option(
    "--objective",
    default="elbo",
    show_default=True,
    help="What svi maximizes: elbo, beta_vae, capacity, beta_tc or free_bits (see docs/disentanglement.md).",
)
@click.option("--beta", type=float, default=1.0, show_default=True, help="beta_vae: the KL weight beta.")
@click.option(
    "--capacity-max", type=float, default=25.0, show_default=True, help="capacity: the final capacity C, nats."
)
@click.option(
    "--capacity-start-epoch",
    type=float,
    default=0.0,
    show_default=True,
    help="capacity: C starts rising from 0 at this epoch.",
)
@click.option(
    "--capacity-end-epoch",
    type=float,
    default=10.0,
    show_default=True,
    help="capacity: C reaches --capacity-max at this epoch.",
)
@click.option("--gamma", type=float, default=1000.0, show_default=True, help="capacity: the weight gamma of |KL - C|.")
@click.option(
    "--tc-alpha", type=float, default=1.0, show_default=True, help="beta_tc: weight of the mutual information."
)
@click.option("--tc-beta", type=float, default=1.0, show_default=True, help="beta_tc: weight of the total correlation.")
@click.option(
    "--tc-gamma", type=float, default=1.0, show_default=True, help="beta_tc: weight of the dimension-wise KL."
)
@click.option(
    "--tc-estimator",
    default="mws",
    show_default=True,
    help="beta_tc: mws (minibatch-weighted sampling) or mss (minibatch-stratified sampling).",
)
@click.option(
    "--free-bits",
    type=float,
    default=0.0,
    show_default=True,
    help="free_bits: the KL floor lambda, nats per latent dimension (or group).",
)
@click.option(
    "--free-bits-groups",
    type=int,
    default=None,
    help="free_bits: split z into this many groups (default: one per dimension).",
)
@opt.seed_option()
@opt.device_option("auto")
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
    "tensorboard extra). Repeatable.",
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

    --resume RUN continues a run with its own config; --epochs, --lr and --optimizer may change.
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
    try:
        with _interrupts_are_never_lost() as interrupted:
            run = _fit_or_resume(ctx, opts, where, common)
        if interrupted:
            raise KeyboardInterrupt  # the KeyboardInterrupt raised for it was swallowed on the way
    except KeyboardInterrupt:
        _interrupted(where["run_dir"])
    if distributed.env_rank() != 0:
        return  # under torchrun, rank 0 reports
    _report(run, opts)


def _fit_or_resume(ctx: click.Context, opts: dict, where: dict, common: dict):
    """Train as the options say; ``where["run_dir"]`` holds the run directory as soon as it is known."""
    from ppl_vae import pipeline

    if opts["resume"] is not None:
        given = [o for o in RUN_OPTIONS if ctx.get_parameter_source(o) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(
                f"--resume continues a run with its own config; drop {', '.join(flag(g) for g in given)}"
            )
        epochs = opts["epochs"] if ctx.get_parameter_source("epochs") == ParameterSource.COMMANDLINE else None
        settings = {o: opts[o] for o in RESUME_SETTINGS if ctx.get_parameter_source(o) == ParameterSource.COMMANDLINE}
        _announce_compile(_compile_backend(where["run_dir"]))
        return pipeline.resume(
            where["run_dir"], epochs=epochs, callbacks=_loggers(opts, Path(where["run_dir"])), **settings, **common
        )
    config = run_config(opts)
    where["run_dir"] = where["run_dir"] or pipeline.default_run_dir(config)
    _announce_compile(config.train.compile)
    return pipeline.fit(config, where["run_dir"], callbacks=_loggers(opts, Path(where["run_dir"])), **common)


def _loggers(opts: dict, run_dir: Path) -> tuple:
    """The training loggers ``--log`` names, writing under ``run_dir``."""
    from ppl_vae.loggers import make_logger

    return tuple(make_logger(name, run_dir, every_steps=opts["log_every_steps"]) for name in opts["log"])


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

    early = stopped_early(history_records(run.history), run.config.train) if run.epochs_done else None
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
    click.echo(
        f"epoch {run.epochs_done}: train ELBO {final['train_elbo']:.3f}, test ELBO {final['test_elbo']:.3f} "
        f"nats per datapoint (Monte Carlo estimates of lower bounds on log p(x); {final['wall_time']:.1f} s training)"
    )
    click.echo(f"run directory: {run.run_dir}")


def run_config(opts: dict):
    """The RunConfig that the command-line options describe (plugins: those loaded for this command)."""
    from ppl_vae.cli.main import active_plugins
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    values = {field: opts[flag[2:].replace("-", "_")] for field, flag in FIELD_FLAGS.items() if "." in field}
    values["model.prior_options"] = {} if opts["num_components"] is None else {"num_components": opts["num_components"]}
    values["model.model_options"] = parse_model_options(opts.get("model_option") or ())
    values["data.dataset"] = str(opts["dataset"])
    values["data.data_dir"] = None if opts["data_dir"] is None else str(opts["data_dir"])
    values["train.train_eval_size"] = opts["train_eval_size"] or None  # 0: the whole training set
    values["train.lr_schedule_options"] = _json_object(opts["lr_schedule_options"], "--lr-schedule-options")

    def section(name: str, cls):
        return cls(**{field.split(".", 1)[1]: v for field, v in values.items() if field.startswith(name + ".")})

    return RunConfig(
        model=section("model", ModelConfig),
        data=section("data", DataConfig),
        train=section("train", TrainConfig),
        plugins=active_plugins(),
    )


# config field -> the flag that sets it (errors from the library name fields)
FIELD_FLAGS = {
    "model.model": "--model",
    "model.prior": "--prior",
    "model.likelihood": "--likelihood",
    "model.latent_dim": "--latent-dim",
    "model.hidden_dim": "--hidden-dim",
    "model.prior_options": "--num-components",
    "model.guide": "--guide",
    "model.model_options": "--model-option",
    "data.dataset": "--dataset",
    "data.data_dir": "--data-dir",
    "data.binarize": "--binarize",
    "data.train_size": "--train-size",
    "data.num_images": "--num-images",
    "data.labels": "--labels",
    "data.label_seed": "--label-seed",
    "train.method": "--method",
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "train.lr": "--lr",
    "train.optimizer": "--optimizer",
    "train.elbo": "--elbo",
    "train.num_particles": "--num-particles",
    "train.kl_warmup_epochs": "--kl-warmup",
    "train.seed": "--seed",
    "train.device": "--device",
    "train.train_eval_size": "--train-eval-size",
    "train.compile": "--compile",
    "train.objective": "--objective",
    "train.beta": "--beta",
    "train.capacity_max": "--capacity-max",
    "train.capacity_start_epoch": "--capacity-start-epoch",
    "train.capacity_end_epoch": "--capacity-end-epoch",
    "train.gamma": "--gamma",
    "train.tc_alpha": "--tc-alpha",
    "train.tc_beta": "--tc-beta",
    "train.tc_gamma": "--tc-gamma",
    "train.tc_estimator": "--tc-estimator",
    "train.free_bits": "--free-bits",
    "train.free_bits_groups": "--free-bits-groups",
    "train.lr_schedule": "--lr-schedule",
    "train.lr_schedule_options": "--lr-schedule-options",
    "train.clip_grad_norm": "--clip-grad-norm",
    "train.val_fraction": "--val-fraction",
    "train.early_stopping_patience": "--early-stopping-patience",
    "train.kl_schedule": "--kl-schedule",
    "train.kl_weight": "--kl-weight",
    "train.kl_cycle_epochs": "--kl-cycle-epochs",
    "train.kl_cycle_ratio": "--kl-cycle-ratio",
    "train.precision": "--precision",
    "timeout_s": "--dist-timeout",
    "nproc": "--nproc",
    "data_dir": "--data-dir",
    "every_steps": "--log-every-steps",
}


fit.field_flags = FIELD_FLAGS  # type: ignore[attr-defined]  # the group shows library errors (which name fields) with these flags


def _json_object(text: Optional[str], name: str) -> dict:
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"must be a JSON object: {exc}", param_hint=name) from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"must be a JSON object, got {text}", param_hint=name)
    return value


def _compile_backend(run_dir: Path) -> Optional[str]:
    from ppl_vae import runs

    try:
        return runs.load_config(run_dir).train.compile
    except Exception:  # resume itself reports a damaged run directory
        return None


def _announce_compile(backend: Optional[str]) -> None:
    if backend:
        click.echo(
            f"compiling the loss with torch.compile (backend {backend}): the first steps take longer "
            "(up to a minute or more on CPU), later ones are faster",
            err=True,
        )


def parse_model_options(items) -> dict:
    """``KEY=VALUE`` strings -> {KEY: VALUE}, VALUE read as JSON (a bare word stays a string)."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-option must be KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


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
