"""``ppl-vae experiment``: regenerate the AEVB paper's figures 2-5 (and fetch their data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import click

from ppl_vae.cli import options as opt


def _common(func: Callable) -> Callable:
    options = [
        opt.out_option("Output folder (default: experiments/<figure>); rerunning resumes it."),
        click.option(
            "--data-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder holding the dataset files, or their parent (with mnist/, frey_face/).",
        ),
        click.option("--paper", is_flag=True, help="Start from the paper's settings instead of the CPU-sized ones."),
        opt.seed_option(None, "Seed (default 0)."),
        opt.progress_option("Show progress bars."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(cls, paper: bool, **given: Any):
    """The CPU-sized or paper settings with every option the user gave replacing its field."""
    base = cls.paper() if paper else cls()
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def _ints(name: str):
    def convert(ctx, param, value):
        if value is None:
            return None
        from ppl_vae.experiments.common import parse_ints

        try:
            return parse_ints(value, name)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def _names(value):
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _report(out: Path, sections) -> None:
    """Each (heading saying what the numbers are, {key: number}) section, then where the files are."""
    for heading, lines in sections:
        click.echo(heading)
        for key, value in lines.items():
            click.echo(f"  {key}: {value}" if isinstance(value, str) else f"  {key}: {value:.2f}")
    click.echo(f"figure and numbers: {out}")


@click.group()
@click.pass_context
def experiment(ctx: click.Context) -> None:
    """Reproduce Kingma & Welling (2013), figures 2-5: CPU-sized by default, --paper for its settings."""
    from ppl_vae.cli.main import SUBCOMMAND_META_KEY

    ctx.meta[SUBCOMMAND_META_KEY] = ctx.invoked_subcommand  # the group's error hints name its options


@experiment.command()
@_common
@click.option("--dataset", "datasets", default=None, help="Comma-separated: mnist, frey-face, digits (default mnist).")
@click.option("--latent-dims", callback=_ints("--latent-dims"), default=None, help="Comma-separated (default 3,10,20).")
@click.option("--hidden-dim", type=int, default=None, help="Hidden units (default: 500 MNIST, 200 Frey Face).")
@click.option("--methods", default=None, help="Comma-separated among AEVB, wake-sleep.")
@click.option("--max-samples", type=int, default=None, help="Training samples per curve (default 200000).")
@click.option("--num-evals", type=int, default=None, help="Evaluations per curve, log-spaced (default 12).")
@click.option("--eval-size", type=int, default=None, help="Train and test points evaluated (default 1000).")
@click.option("--train-size", type=int, default=None, help="Use only the first N training points.")
@click.option("--lr", type=float, default=None, help="Adagrad step size (default 0.02).")
def fig2(out, data_dir, paper, seed, progress, datasets, methods, **opts) -> None:
    """Lower bound vs training samples, AEVB vs wake-sleep, over latent dimensions."""
    from ppl_vae.experiments import fig2 as lib

    settings = _settings(lib.Fig2Settings, paper, seed=seed, datasets=_names(datasets), methods=_names(methods), **opts)
    out = out or Path("experiments/fig2")
    result = lib.run(settings, out, data_dir=data_dir, progress=progress)
    _report(out, lib.summary_sections(result))


@experiment.command()
@_common
@click.option("--dataset", default=None, help="mnist (default) or digits.")
@click.option(
    "--train-sizes", callback=_ints("--train-sizes"), default=None, help="Comma-separated (default 1000,50000)."
)
@click.option("--methods", default=None, help="Comma-separated among AEVB, wake-sleep, MCEM.")
@click.option("--latent-dim", type=int, default=None, help="Latent dimension, < 5 (default 3).")
@click.option("--hidden-dim", type=int, default=None, help="Hidden units (default 100).")
@click.option("--max-samples", type=int, default=None, help="Training samples per curve (default 100000).")
@click.option("--mcem-max-samples", type=int, default=None, help="MCEM's training samples (default 20000).")
@click.option("--num-evals", type=int, default=None, help="Evaluations per curve (default 5).")
@click.option(
    "--eval-size", type=int, default=None, help="Train and test points whose log p(x) is estimated (default 50)."
)
@click.option("--hmc-samples", type=int, default=None, help="HMC samples per datapoint for appendix D (default 30).")
@click.option("--hmc-warmup", type=int, default=None, help="HMC warm-up iterations (default 30).")
@click.option("--lr", type=float, default=None, help="Adagrad step size (default 0.02).")
def fig3(out, data_dir, paper, seed, progress, methods, **opts) -> None:
    """Estimated marginal likelihood vs training samples: AEVB, wake-sleep, MCEM."""
    from ppl_vae.experiments import fig3 as lib

    settings = _settings(lib.Fig3Settings, paper, seed=seed, methods=_names(methods), **opts)
    out = out or Path("experiments/fig3")
    result = lib.run(settings, out, data_dir=data_dir, progress=progress)
    _report(out, lib.summary_sections(result))


@experiment.command()
@_common
@click.option("--dataset", "datasets", default=None, help="Comma-separated (default frey-face,mnist).")
@click.option("--hidden-dim", type=int, default=None, help="Hidden units (default: 500 MNIST, 200 Frey Face).")
@click.option("--max-samples", type=int, default=None, help="Training samples per model (default 100000).")
@click.option("--grid-size", type=int, default=None, help="Cells per side of the manifold (default 20).")
@click.option("--lr", type=float, default=None, help="Adagrad step size (default 0.02).")
def fig4(out, data_dir, paper, seed, progress, datasets, **opts) -> None:
    """Learned 2-D manifolds through the inverse Gaussian CDF."""
    from ppl_vae.experiments import fig4 as lib

    settings = _settings(lib.Fig4Settings, paper, seed=seed, datasets=_names(datasets), **opts)
    out = out or Path("experiments/fig4")
    lib.run(settings, out, data_dir=data_dir, progress=progress)
    _report(out, lib.summary_sections(out))


@experiment.command()
@_common
@click.option("--dataset", default=None, help="mnist (default), frey-face or digits.")
@click.option(
    "--latent-dims", callback=_ints("--latent-dims"), default=None, help="Comma-separated (default 2,5,10,20)."
)
@click.option("--hidden-dim", type=int, default=None, help="Hidden units (default 500).")
@click.option("--max-samples", type=int, default=None, help="Training samples per model (default 100000).")
@click.option("--num-images", type=int, default=None, help="Samples drawn per model (default 100).")
@click.option("--lr", type=float, default=None, help="Adagrad step size (default 0.02).")
def fig5(out, data_dir, paper, seed, progress, **opts) -> None:
    """Random samples from models with latent dimensions 2, 5, 10, 20."""
    from ppl_vae.experiments import fig5 as lib

    settings = _settings(lib.Fig5Settings, paper, seed=seed, **opts)
    out = out or Path("experiments/fig5")
    lib.run(settings, out, data_dir=data_dir, progress=progress)
    _report(out, lib.summary_sections(out))


@experiment.command()
@click.argument("dataset")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True, help="Folder to put the files in.")
@click.option("--url", default=None, help="Base URL of a mirror (file:// works).")
@opt.progress_option("Show a progress bar.")
def download(dataset, data_dir, url, progress) -> None:
    """Fetch DATASET (mnist or frey-face), verifying each file's sha256."""
    from ppl_vae.data.download import download as fetch

    for path in fetch(dataset, data_dir, url=url, progress=progress):
        click.echo(f"{path} (sha256 verified)")


# library errors name the settings' fields; the command line shows the flags (a plain word, too)
experiment.field_flags = {"methods": "--methods"}  # type: ignore[attr-defined]
