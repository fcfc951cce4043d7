"""``ppl-vae fit``: train a model and write a run directory (or continue one with --resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from click.core import ParameterSource


# Options that define a run; with --resume the run's own config decides them.
RUN_OPTIONS = (
    "model", "dataset", "data_dir", "prior", "likelihood", "latent_dim", "hidden_dim", "guide",
    "num_components", "method", "batch_size", "lr", "optimizer", "elbo", "num_particles", "kl_warmup",
    "seed", "device", "out", "binarize", "train_size", "train_eval_size", "compile", "labels", "label_seed",
)


@click.command()
@click.option("--model", default="gaussian_mlp", show_default=True, help="Registered model (see `ppl-vae models`).")
@click.option("--dataset", default="digits", show_default=True,
              help="digits (embedded), mnist, fashion-mnist, frey-face, or a .npy/.npz/.csv path.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Folder holding the dataset's files.")
@click.option("--prior", default="standard_normal", show_default=True, help="Prior over z.")
@click.option("--likelihood", default=None, help="Likelihood of x (default: the model's own).")
@click.option("--latent-dim", type=int, default=None, help="Size of z (default: the model's).")
@click.option("--hidden-dim", type=int, default=None, help="Hidden units per layer (default: the model's).")
@click.option("--num-components", type=int, default=None, help="Components of the mixture_of_gaussians prior.")
@click.option("--guide", default="diagonal_normal", show_default=True,
              help="Family of the amortized q(z|x): diagonal_normal (AEVB) or a flow (see `ppl-vae models`).")
@click.option("--method", default="svi", show_default=True,
              help="Training method: svi (AEVB); see `ppl-vae models` for the others.")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--optimizer", default="adam", show_default=True, help="adam, adagrad or sgd.")
@click.option("--elbo", default="trace", show_default=True,
              help="trace (SGVB estimator A, Monte Carlo KL) or mean_field (estimator B, analytic KL).")
@click.option("--compile", "compile", default=None, metavar="BACKEND",
              help="Compile the SVI loss with torch.compile (e.g. inductor); parts-based VAEs only.")
@click.option("--num-particles", type=int, default=1, show_default=True, help="Samples of z per datapoint per step.")
@click.option("--kl-warmup", type=int, default=0, show_default=True, help="Epochs over which the KL weight rises to 1.")
@click.option("--binarize", type=click.Choice(["none", "dynamic", "threshold"]), default="none", show_default=True)
@click.option("--train-size", type=int, default=None, help="Use only the first N training points.")
@click.option("--labels", type=int, default=None,
              help="Semi-supervised (m2): keep N training labels, balanced per class, the rest unlabelled.")
@click.option("--label-seed", type=int, default=0, show_default=True, help="Which N points keep labels (--labels).")
@click.option("--train-eval-size", type=int, default=1000, show_default=True,
              help="Training points (a fixed seeded subset) the per-epoch train ELBO uses; 0: all of them.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default: a new runs/...).")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue this run directory.")
@click.option("--sample-grids", is_flag=True, default=False,
              help="Save a grid of samples from fixed z after every epoch (RUN/samples/*.png, RUN/samples.gif).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes on this machine (DDP; one GPU each on CUDA). Under torchrun leave at 1.")
@click.option("--dist-timeout", type=float, default=300.0, show_default=True,
              help="Seconds a distributed collective may wait before the run stops with an error.")
@click.pass_context
def fit(ctx: click.Context, **opts) -> None:
    """Train a VAE with SVI and write config, checkpoint and history to a run directory."""
    from ppl_vae import pipeline
    from ppl_vae.inference import distributed

    run_dir = Path(opts["resume"]) if opts["resume"] is not None else (opts["out"] or None)
    common = dict(nproc=opts["nproc"], progress=opts["progress"], sample_grids=opts["sample_grids"],
                  timeout_s=opts["dist_timeout"])
    try:
        if opts["resume"] is not None:
            given = [o for o in RUN_OPTIONS if ctx.get_parameter_source(o) == ParameterSource.COMMANDLINE]
            if given:
                raise click.UsageError(
                    f"--resume continues a run with its own config; drop {', '.join(flag(g) for g in given)}")
            epochs = opts["epochs"] if ctx.get_parameter_source("epochs") == ParameterSource.COMMANDLINE else None
            run = pipeline.resume(run_dir, epochs=epochs, **common)
        else:
            config = run_config(opts)
            run_dir = run_dir or pipeline.default_run_dir(config)
            run = pipeline.fit(config, run_dir, **common)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    if distributed.env_rank() != 0:
        return  # under torchrun, rank 0 reports
    final = run.final
    if opts["resume"] is None and not final:  # --epochs 0: the initial checkpoint only (e.g. for animate)
        click.echo(f"epoch 0: no training step taken, so no ELBO to report; {run.run_dir} holds the initialised "
                   "model (ppl-vae fit --resume RUN --epochs N trains it)")
        return
    if run.new_epochs == 0:
        click.echo(f"nothing to do: {run.run_dir} has done {run.epochs_done} of {run.config.train.epochs} epochs; "
                   f"--epochs N (more than {run.epochs_done}) trains it longer")
        return
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
    values["data.dataset"] = str(opts["dataset"])
    values["data.data_dir"] = None if opts["data_dir"] is None else str(opts["data_dir"])
    values["train.train_eval_size"] = opts["train_eval_size"] or None  # 0: the whole training set

    def section(name: str, cls):
        return cls(**{field.split(".", 1)[1]: v for field, v in values.items() if field.startswith(name + ".")})

    return RunConfig(model=section("model", ModelConfig), data=section("data", DataConfig),
                     train=section("train", TrainConfig), plugins=active_plugins())


# config field -> the flag that sets it (errors from the library name fields)
FIELD_FLAGS = {
    "model.model": "--model", "model.prior": "--prior", "model.likelihood": "--likelihood",
    "model.latent_dim": "--latent-dim", "model.hidden_dim": "--hidden-dim", "model.prior_options": "--num-components",
    "model.guide": "--guide",
    "data.dataset": "--dataset", "data.data_dir": "--data-dir", "data.binarize": "--binarize",
    "data.train_size": "--train-size", "data.labels": "--labels", "data.label_seed": "--label-seed",
    "train.method": "--method", "train.epochs": "--epochs", "train.batch_size": "--batch-size", "train.lr": "--lr",
    "train.optimizer": "--optimizer", "train.elbo": "--elbo", "train.num_particles": "--num-particles",
    "train.kl_warmup_epochs": "--kl-warmup", "train.seed": "--seed", "train.device": "--device",
    "train.train_eval_size": "--train-eval-size", "train.compile": "--compile",
    "timeout_s": "--dist-timeout", "nproc": "--nproc", "data_dir": "--data-dir",
}


fit.field_flags = FIELD_FLAGS  # the group shows library errors (which name fields) with these flags


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _interrupted(run_dir: Optional[Path]) -> None:
    from ppl_vae import runs

    if run_dir is not None and runs.started(run_dir):
        click.echo(f"Error: interrupted; the last checkpoint is kept: ppl-vae fit --resume {run_dir}", err=True)
    else:
        click.echo("Error: interrupted before the first checkpoint; nothing was kept", err=True)
    raise SystemExit(130)
