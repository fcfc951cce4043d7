"""``ppl-vae disentanglement``: MIG, DCI and latent traversals of a run on factor-labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ppl_vae import io
from ppl_vae.cli import options as opt


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for disentanglement.nc, the figures and disentanglement.html (default: RUN/disentanglement).",
)
@click.option(
    "--num-points",
    type=int,
    default=10_000,
    show_default=True,
    help="Training points (a seeded subset) for MIG and DCI's forests; 0: all.",
)
@click.option(
    "--num-test-points",
    type=int,
    default=5_000,
    show_default=True,
    help="Test points (a seeded subset) for DCI's accuracy; 0: all.",
)
@click.option("--num-steps", type=int, default=9, show_default=True, help="Traversal: values per latent dimension.")
@click.option("--span", type=float, default=3.0, show_default=True, help="Traversal: values in [-span, span].")
@click.option("--seed", type=int, default=0, show_default=True)
def disentanglement(
    run_dir: Path, out: Optional[Path], num_points: int, num_test_points: int, num_steps: int, span: float, seed: int
) -> None:
    """Score a run's encoder against the data's generative factors (dsprites, or an .npz with 'factors')."""
    from ppl_vae.pipeline import load_run
    from ppl_vae.reports.disentanglement import disentanglement_report

    report = disentanglement_report(
        load_run(run_dir, history=False),
        out,
        num_points=num_points or None,
        num_test_points=num_test_points or None,
        num_steps=num_steps,
        span=span,
        seed=seed,
    )
    click.echo(report.summary())
    io.after_commit(lambda: opt.echo_written(report.files.values(), "report"))  # once in place
