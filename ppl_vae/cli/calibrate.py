"""``ppl-vae calibrate``: simulation-based calibration of a run's guide and posterior predictive checks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ppl_vae.cli import options as opt

# Far beyond a useful check (SBC papers use hundreds to a few thousand): refused up front.
MAX_NUM_SIMULATIONS = 1_000_000
MAX_NUM_POSTERIOR_SAMPLES = 100_000
MAX_NUM_REPLICATES = 100_000


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--num-simulations",
    type=int,
    default=200,
    show_default=True,
    help="SBC: pairs (z*, x) drawn from the run's model, z* ~ p(z) and x ~ p(x|z*) (Talts et al. 2018).",
)
@opt.num_samples_option(
    99, "SBC: guide draws L per simulation; the rank of z* among them is in 0..L.", "--num-posterior-samples"
)
@click.option(
    "--num-replicates",
    type=int,
    default=100,
    show_default=True,
    help="Predictive checks: replicates x_rep ~ p(x|z), z ~ q(z|x), per datapoint.",
)
@opt.num_datapoints_option(500, "the same rule as evaluate")
@opt.split_option("Which split of the run's dataset the predictive checks use.")
@opt.seed_option()
@opt.out_option("Folder for calibration_*.nc and calibration_*.png (default: the run directory).")
@opt.device_option()
@opt.progress_option()
def calibrate(
    run_dir: Path,
    num_simulations: int,
    num_posterior_samples: int,
    num_replicates: int,
    num_datapoints: int,
    split: str,
    seed: int,
    out: Optional[Path],
    device: str,
    progress: bool,
) -> None:
    """Is the encoder calibrated? SBC of q(z|x) against the run's model and posterior predictive checks."""
    from ppl_vae.reports.calibration import calibrate_run
    from ppl_vae.runs import load_config

    for flag, value, low in (
        ("--num-simulations", num_simulations, 2),
        ("--num-posterior-samples", num_posterior_samples, 1),
        ("--num-replicates", num_replicates, 1),
        ("--num-datapoints", num_datapoints, 0),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    opt.check_size("--num-simulations", num_simulations, MAX_NUM_SIMULATIONS, "SBC simulations")
    opt.check_size("--num-posterior-samples", num_posterior_samples, MAX_NUM_POSTERIOR_SAMPLES, "guide draws each")
    opt.check_size("--num-replicates", num_replicates, MAX_NUM_REPLICATES, "replicates per datapoint")
    load_config(run_dir)  # a missing or broken run directory is refused before anything else
    result = calibrate_run(
        run_dir,
        num_simulations=num_simulations,
        num_posterior_samples=num_posterior_samples,
        num_replicates=num_replicates,
        num_datapoints=num_datapoints or None,
        split=split,
        seed=seed,
        out_dir=out,
        progress=progress,
        device=device,
    )
    click.echo(result.summary())
    click.echo("wrote " + ", ".join(str(p) for p in result.files.values()))


calibrate.field_flags = {"out_dir": "--out"}  # type: ignore[attr-defined]  # library errors name the flag
