"""``ppl-vae evaluate``: importance-weighted log p(x) per datapoint for a run directory."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--num-samples", "-k", type=int, default=1000, show_default=True,
              help="Importance samples K per datapoint (Burda et al. use 5000).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--num-datapoints", type=int, default=None, help="A seeded random subset of this size (default: all).")
@click.option("--batch-size", type=int, default=100, show_default=True, help="Datapoints per batch.")
@click.option("--particle-batch-size", type=int, default=None,
              help="Samples per chunk (default: about 65,536 samples of z per chunk).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for evaluation.nc and evaluation.csv (default: the run directory).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def evaluate(run_dir: Path, num_samples: int, split: str, num_datapoints, batch_size: int,
             particle_batch_size, device: str, seed: int, out, progress: bool) -> None:
    """Estimate log p(x) by importance sampling with K samples of the run's guide."""
    from ppl_vae.analysis.report import evaluate_run

    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    result = evaluate_run(run_dir, num_samples=num_samples, split=split, num_datapoints=num_datapoints,
                          batch_size=batch_size, particle_batch_size=particle_batch_size, device=device,
                          seed=seed, out_dir=out, progress=progress)
    click.echo(result.summary())
    click.echo("wrote " + ", ".join(str(p) for p in result.files.values()))
