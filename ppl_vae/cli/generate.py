"""``ppl-vae generate``, ``ppl-vae inpaint`` and ``ppl-vae animate``: images from a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click
from click.core import ParameterSource

from ppl_vae.cli import options as opt

_RUN = click.Path(path_type=Path)

# Figures beyond these sizes are unreadable and take minutes to draw: refused up front.
MAX_NUM_DRAWS = 100
MAX_NUM_IMAGES = 1000
MAX_INPAINT_SAMPLES = 1_000_000
MAX_GRID_SAMPLES = 10_000

# What each generate option applies to: options read only by a traversal, and options read only
# by a sample grid. An option given where it does not apply is a usage error, never ignored.
TRAVERSAL_ONLY = ("dims", "num_steps", "span")
GRID_ONLY = ("labels", "num_samples", "seed")


def _flag(ctx: click.Context, name: str) -> str:
    """The command-line spelling of parameter ``name`` (``--label/--no-label`` for a flag pair)."""
    param = next(p for p in ctx.command.params if p.name == name)
    return "/".join([*param.opts, *param.secondary_opts])


def given_options(ctx: click.Context, names) -> list:
    """The flags among ``names`` that the user gave (on the command line or in the environment)."""
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return [_flag(ctx, n) for n in names if ctx.get_parameter_source(n) in sources]


def check_generate_options(ctx: click.Context, traverse: bool) -> None:
    """Refuse (one line, as every command refuses an option that does not apply) an option given
    where it does not apply (see :data:`TRAVERSAL_ONLY`)."""
    if traverse:
        given = given_options(ctx, GRID_ONLY)
        if given:
            raise ValueError(
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with --traverse "
                "(a traversal decodes the first test image's latents, one row per dimension); "
                "drop it or drop --traverse"
            )
    else:
        given = given_options(ctx, TRAVERSAL_ONLY)
        if given:
            raise ValueError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --traverse; "
                "add --traverse or drop it"
            )


@click.command()
@click.argument("run_dir", type=_RUN)
@opt.num_samples_option(16, "Draws z ~ p(z) (per label for cvae).")
@click.option(
    "--label",
    "labels",
    type=int,
    multiple=True,
    help="Conditional models: generate this label (repeatable; default: every label).",
)
@opt.seed_option(0, "Seed of the z draws.")
@opt.out_file_option(
    "Image file (default: RUN/samples.png, or RUN/traversal.png with --traverse); missing folders are created.",
    "samples.png",
    "image file",
)
@click.option(
    "--traverse",
    is_flag=True,
    default=False,
    help="Latent traversals instead: each dimension swept with the others fixed, sorted by KL.",
)
@click.option(
    "--dim", "dims", type=int, multiple=True, help="--traverse: this latent dimension (repeatable; default all)."
)
@click.option("--num-steps", type=int, default=9, show_default=True, help="--traverse: values per dimension.")
@click.option("--span", type=float, default=3.0, show_default=True, help="--traverse: values in [-span, span].")
def generate(
    run_dir: Path,
    num_samples: int,
    labels: Tuple[int, ...],
    seed: int,
    out: Optional[Path],
    traverse: bool,
    dims: Tuple[int, ...],
    num_steps: int,
    span: float,
) -> None:
    """Save a grid of samples E[x|z], z ~ p(z); for cvae one row per label, same z per column.

    With --traverse: one row per latent dimension, decoded along [-span, span] from the encoder
    mean of the first test image, rows in decreasing KL (measured on up to 500 test images)."""
    check_generate_options(click.get_current_context(), traverse)
    from ppl_vae.analysis.generation import (
        check_images,
        latent_traversal,
        plot_image_grid,
        plot_traversal,
        sample_grid_title,
        sample_images,
        save_figure,
    )
    from ppl_vae.pipeline import load_run, load_run_data

    opt.check_size("--num-samples", num_samples, MAX_GRID_SAMPLES, "images in one grid")
    run = load_run(run_dir, history=False)
    opt.prepare_out_file(out)
    check_images(run.vae, f"a sample grid of {run_dir}", "; use `ppl-vae text RUN` to decode samples")
    if traverse:
        if run.vae.num_classes is not None:
            raise ValueError("--traverse needs an unconditional model (its decoder takes z alone)")
        x = load_run_data(run, test_only=True).test[:500]
        trav = latent_traversal(run.vae, x, dims=list(dims) or None, num_steps=num_steps, span=span)
        path = save_figure(plot_traversal(trav), out or run_dir / "traversal.png")
        order = ", ".join(f"z{int(j)}" for j in trav.latent.values)
        click.echo(f"traversals of {trav.sizes['latent']} dimensions ({order}, by decreasing KL) written to {path}")
        return
    images = sample_images(run.vae, num_samples, labels=list(labels) or None, seed=seed)
    path = save_figure(plot_image_grid(images, title=sample_grid_title(images)), out or run_dir / "samples.png")
    click.echo(f"{images.sizes.get('label', 1) * images.sizes['sample']} samples written to {path}")


@click.command()
@click.argument("run_dir", type=_RUN)
@click.option(
    "--mask",
    default="top",
    show_default=True,
    help="Observed part: top, bottom, left, right, quadrant (the rest is completed).",
)
@click.option("--num-images", type=int, default=8, show_default=True, help="Test images to complete (the first ones).")
@opt.num_samples_option(2000, "Importance samples z ~ p(z).")
@click.option("--num-draws", type=int, default=4, show_default=True, help="Posterior completions shown per image.")
@click.option(
    "--proposal",
    type=click.Choice(["prior", "encoder"]),
    default="prior",
    show_default=True,
    help="Importance proposal: p(z), or a second pass mixing p(z) with the encoder at the first completion.",
)
@click.option(
    "--label/--no-label",
    "use_label",
    default=True,
    show_default=True,
    help="Conditional models: give the true label, or infer it from the observed part.",
)
@opt.seed_option()
@opt.out_file_option(
    "Image file (default: RUN/inpainting-MASK.png); missing folders are created.", "inpainting.png", "image file"
)
def inpaint(
    run_dir: Path,
    mask: str,
    num_images: int,
    num_samples: int,
    num_draws: int,
    proposal: str,
    use_label: bool,
    seed: int,
    out: Optional[Path],
) -> None:
    """Complete test images from an observed part by importance sampling z given those pixels."""
    from ppl_vae.analysis.generation import MASKS, plot_inpainting, save_figure
    from ppl_vae.analysis.generation import inpaint as inpaint_images
    from ppl_vae.pipeline import load_run, load_run_data

    MASKS.get(mask)
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    opt.check_size("--num-draws", num_draws, MAX_NUM_DRAWS, "completions drawn in one figure per image")
    opt.check_size("--num-samples", num_samples, MAX_INPAINT_SAMPLES, "decoded images held per test image")
    opt.check_size("--num-images", num_images, MAX_NUM_IMAGES, "rows of one figure")
    run = load_run(run_dir, history=False)
    if run.vae.num_classes is None:
        given = given_options(click.get_current_context(), ["use_label"])
        if given:
            raise ValueError(
                f"{given[0]} applies only to conditional models (cvae, m2); {run_dir} holds model "
                f"{run.config.model.model!r}, which takes no labels"
            )
    opt.prepare_out_file(out)
    data = load_run_data(run, test_only=True)
    if num_images > data.test.shape[0]:
        raise ValueError(
            f"--num-images {num_images} is more than the {data.test.shape[0]} test images of "
            f"{data.name}; choose at most {data.test.shape[0]}"
        )
    x = data.test[:num_images]
    labelled = run.vae.num_classes is not None and data.test_labels is not None
    y = data.test_labels[:num_images] if labelled and use_label and data.test_labels is not None else None
    result = inpaint_images(
        run.vae, x, mask, y=y, num_samples=num_samples, num_draws=num_draws, proposal=proposal, seed=seed
    )
    path = save_figure(plot_inpainting(result, max_images=num_images), out or run_dir / f"inpainting-{mask}.png")
    weights = result.attrs["num_weights"]
    per = "" if weights == num_samples else f" ({num_samples} draws of z x {weights // num_samples} labels)"
    click.echo(
        f"{len(x)} images, mask {mask!r}: mean log p(x_obs) {float(result.log_evidence.mean()):.2f}"
        f"{_se_over(result.log_evidence.values, 'images')} nats (importance-weighted: a stochastic lower bound), "
        f"mean ESS {float(result.ess.mean()):.1f} of {weights} weights{per}"
    )
    if "label_posterior" in result and data.test_labels is not None:
        predicted = result.label_posterior.argmax("label").values
        truth = data.test_labels[:num_images].numpy()
        click.echo(f"label inferred from the observed part: {int((predicted == truth).sum())}/{len(truth)} correct")
    click.echo(f"figure written to {path}")


def _se_over(values, what: str) -> str:
    """ " ± se" of the mean of ``values`` over ``what`` (empty for one value: no se)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return f" (one of the {what}: no se)"
    return f" ± {values.std(ddof=1) / np.sqrt(values.size):.2f} (se over {what})"


@click.command()
@click.argument("run_dir", type=_RUN)
@click.option("--epochs", type=int, required=True, help="Train the run up to this many epochs.")
@click.option("--every", type=int, default=1, show_default=True, help="Save a grid every N epochs.")
@opt.num_samples_option(16, "Fixed draws z ~ p(z) in every grid.")
@opt.seed_option(0, "Seed of the fixed z draws.")
@opt.progress_option()
def animate(run_dir: Path, epochs: int, every: int, num_samples: int, seed: int, progress: bool) -> None:
    """Continue a run, saving a sample grid as training goes: RUN/samples/epoch_NNNN.png and RUN/samples.gif.

    Start from `ppl-vae fit ... --epochs 0 --out RUN` to include the untrained model's frame.
    """
    from ppl_vae.inference.training import history_records, stopped_early
    from ppl_vae.reports.sample_grids import train_with_sample_grids

    if every < 1:  # here, by its flag: the library's word "every" is also plain English in its messages
        raise ValueError(f"--every must be >= 1, got {every}")
    run = train_with_sample_grids(run_dir, epochs, every=every, num_samples=num_samples, seed=seed, progress=progress)
    final = run.final
    frames = sorted((run_dir / "samples").glob("epoch_*.png"))
    early = stopped_early(history_records(run.read_history()), run.config.train) if run.epochs_done else None
    if early and run.epochs_done < epochs:  # as fit --resume says: the run trains no further
        click.echo(f"nothing to train: {run_dir} {early}" if not run.new_epochs else early)
    test = final.get("test_elbo", float("nan"))
    click.echo(
        f"epoch {run.epochs_done}: test ELBO {test:.3f} nats per datapoint (a Monte Carlo estimate of a lower "
        f"bound); {len(frames)} frames in {run_dir / 'samples'}, animation {run_dir / 'samples.gif'}"
    )


animate.field_flags = {"epochs": "--epochs"}  # type: ignore[attr-defined]  # errors name the flag


generate.__dict__["field_flags"] = {"dims": "--dim"}  # library errors name the argument; users typed the flag
