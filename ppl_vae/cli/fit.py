"""``ppl-vae fit``: train a model and write a run directory (or continue one with --resume)."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

# Options that define a run; with --resume the run's own config decides them.
RUN_OPTIONS = (
    "model", "dataset", "data_dir", "prior", "likelihood", "latent_dim", "hidden_dim",
    "num_components", "method", "batch_size", "lr", "optimizer", "elbo", "num_particles", "kl_warmup",
    "seed", "device", "out", "binarize", "train_size",
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
@click.option("--method", default="svi", show_default=True,
              help="Training method: svi (AEVB); see `ppl-vae models` for the others.")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--optimizer", default="adam", show_default=True, help="adam, adagrad or sgd.")
@click.option("--elbo", default="trace", show_default=True,
              help="trace (SGVB estimator A), mean_field (estimator B), jit_trace, jit_mean_field.")
@click.option("--num-particles", type=int, default=1, show_default=True, help="Samples of z per datapoint per step.")
@click.option("--kl-warmup", type=int, default=0, show_default=True, help="Epochs over which the KL weight rises to 1.")
@click.option("--binarize", type=click.Choice(["none", "dynamic", "threshold"]), default="none", show_default=True)
@click.option("--train-size", type=int, default=None, help="Use only the first N training points.")
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
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    if opts["resume"] is not None:
        given = [o for o in RUN_OPTIONS if ctx.get_parameter_source(o) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(
                f"--resume continues a run with its own config; drop {', '.join('--' + g.replace('_', '-') for g in given)}"
            )
        epochs = opts["epochs"] if ctx.get_parameter_source("epochs") == ParameterSource.COMMANDLINE else None
        try:
            if opts["nproc"] != 1 or distributed.launched_by_torchrun():
                run = distributed.resume(opts["resume"], epochs=epochs, nproc=opts["nproc"],
                                         progress=opts["progress"], timeout_s=opts["dist_timeout"])
            else:
                run = pipeline.resume(opts["resume"], epochs=epochs, progress=opts["progress"],
                                      callbacks=_callbacks(opts, Path(opts["resume"])))
        except KeyboardInterrupt:
            _interrupted(opts["resume"])
    else:
        config = RunConfig(
            model=ModelConfig(
                model=opts["model"],
                prior=opts["prior"],
                likelihood=opts["likelihood"],
                latent_dim=opts["latent_dim"],
                hidden_dim=opts["hidden_dim"],
                prior_options={} if opts["num_components"] is None else {"num_components": opts["num_components"]},
            ),
            data=DataConfig(
                dataset=str(opts["dataset"]),
                data_dir=None if opts["data_dir"] is None else str(opts["data_dir"]),
                binarize=opts["binarize"],
                train_size=opts["train_size"],
            ),
            train=TrainConfig(
                method=opts["method"],
                epochs=opts["epochs"],
                batch_size=opts["batch_size"],
                lr=opts["lr"],
                optimizer=opts["optimizer"],
                elbo=opts["elbo"],
                num_particles=opts["num_particles"],
                kl_warmup_epochs=opts["kl_warmup"],
                seed=opts["seed"],
                device=opts["device"],
            ),
        )
        out = opts["out"] or pipeline.default_run_dir(config)
        try:
            if opts["nproc"] != 1 or distributed.launched_by_torchrun():
                run = distributed.fit(config, out, nproc=opts["nproc"], progress=opts["progress"],
                                      timeout_s=opts["dist_timeout"])
            else:
                run = pipeline.fit(config, out, progress=opts["progress"], callbacks=_callbacks(opts, Path(out)))
        except KeyboardInterrupt:
            _interrupted(out)
    if distributed.env_rank() != 0:
        return  # under torchrun, rank 0 reports
    final = run.final
    click.echo(
        f"epoch {int(run.history.epoch[-1]) if run.history.sizes.get('epoch') else 0}: "
        f"train ELBO {final.get('train_elbo', float('nan')):.3f}, "
        f"test ELBO {final.get('test_elbo', float('nan')):.3f} nats per datapoint "
        f"({final.get('wall_time', 0.0):.1f} s training)"
    )
    click.echo(f"run directory: {run.run_dir}")


def _callbacks(opts: dict, run_dir: Path) -> list:
    if not opts["sample_grids"]:
        return []
    from ppl_vae.analysis.generation import SampleGridRecorder

    return [SampleGridRecorder(run_dir / "samples")]


def _interrupted(run_dir: Path) -> None:
    click.echo(f"Error: interrupted; the last checkpoint is kept: ppl-vae fit --resume {run_dir}", err=True)
    raise SystemExit(130)
