"""``ppl-vae calibrate``: simulation-based calibration of a run's guide, posterior predictive checks,
SIR beside the guide, and the calibration of a discrete site's q(c|x)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import click

from ppl_vae import io
from ppl_vae.cli import options as opt
from ppl_vae.estimator_options import ADAM_STEPS_BEFORE_POLISH

# Far beyond a useful check (SBC papers use hundreds to a few thousand): refused up front.
MAX_NUM_SIMULATIONS = 1_000_000
MAX_NUM_POSTERIOR_SAMPLES = 100_000
MAX_NUM_REPLICATES = 100_000
MAX_SIR = 1_000_000
MAX_DISCRETE_NUM_SAMPLES = 1_000_000
MAX_REFINE = 100_000
MAX_REFINE_NUM_SAMPLES = 10_000
MAX_MF_STEPS = 100_000


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
@click.option(
    "--sir",
    type=int,
    default=0,
    show_default=True,
    help="Also SBC of sampling-importance-resampling with K proposals from the guide (K >= L), "
    "on the same simulations; 0: off.",
)
@click.option(
    "--refine",
    type=int,
    default=0,
    show_default=True,
    help="Also SBC of the refined q: each simulated x's q(z|x) refined by K Adam steps on its own ELBO "
    "(semi-amortized inference), on the same simulations, and the amortization gap K steps close on the "
    "--split datapoints; 0: off.",
)
@click.option(
    "--refine-lr", type=float, default=0.02, show_default=True, help="Refinement: Adam's learning rate (--refine K)."
)
@click.option(
    "--refine-num-samples",
    type=int,
    default=4,
    show_default=True,
    help="Refinement: draws of z per datapoint per step (--refine K).",
)
@click.option(
    "--mean-field",
    is_flag=True,
    default=False,
    help="Also SBC of the mean-field q*: a diagonal Gaussian fitted to each simulated x alone (Adam from the "
    "encoder's q, then an L-BFGS polish; the best the encoder's family can do per datapoint), on the same "
    "simulations, and the ELBO it gains over the encoder.",
)
@click.option(
    "--mf-steps",
    type=int,
    default=None,
    help=f"Mean-field q*: most Adam steps before the L-BFGS polish (default: {ADAM_STEPS_BEFORE_POLISH}); "
    "with --mean-field.",
)
@click.option(
    "--discrete-num-samples",
    type=int,
    default=100,
    show_default=True,
    help="Discrete site (M2's y, gmvae's c): IW draws of z ~ q(z|x,c) per value for the posterior p(c|x).",
)
@click.option("--ece-bins", type=int, default=10, show_default=True, help="Discrete site: confidence bins of the ECE.")
@click.option(
    "--ece-binning",
    type=click.Choice(["equal-width", "equal-mass"]),
    default="equal-width",
    show_default=True,
    help="Discrete site: bins of equal width over [1/C, 1], or holding equal numbers of datapoints.",
)
@opt.num_datapoints_option(500, "the same rule as evaluate")
@opt.split_option("Which split of the run's dataset the predictive checks use.")
@opt.seed_option()
@opt.out_option("Folder for calibration.html, calibration_*.nc and calibration_*.png (default: the run directory).")
@opt.device_option()
@opt.progress_option()
def calibrate(
    run_dir: Path,
    num_simulations: int,
    num_posterior_samples: int,
    num_replicates: int,
    sir: int,
    refine: int,
    refine_lr: float,
    refine_num_samples: int,
    mean_field: bool,
    mf_steps: Optional[int],
    discrete_num_samples: int,
    ece_bins: int,
    ece_binning: str,
    num_datapoints: int,
    split: str,
    seed: int,
    out: Optional[Path],
    device: str,
    progress: bool,
) -> None:
    """Is the encoder calibrated? SBC of q(z|x) against the run's model (and of SIR with --sir K, of
    the refined q with --refine K, of the mean-field q* with --mean-field), posterior predictive checks, and for a discrete site q(c|x)
    against the model's p(c|x). Writes calibration.html beside the netCDF and PNG files."""
    from ppl_vae.reports.calibration import calibrate_run
    from ppl_vae.runs import load_config

    for flag, value, low in (
        ("--num-simulations", num_simulations, 2),
        ("--num-posterior-samples", num_posterior_samples, 1),
        ("--num-replicates", num_replicates, 1),
        ("--num-datapoints", num_datapoints, 0),
        ("--sir", sir, 0),
        ("--refine", refine, 0),
        ("--refine-num-samples", refine_num_samples, 1),
        ("--mf-steps", 1 if mf_steps is None else mf_steps, 1),
        ("--discrete-num-samples", discrete_num_samples, 1),
        ("--ece-bins", ece_bins, 1),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if sir and sir < max(2, num_posterior_samples):
        raise ValueError(
            f"--sir must be 0 (off) or >= --num-posterior-samples ({num_posterior_samples}) and >= 2: "
            f"L draws resampled from fewer proposals repeat them, got {sir}"
        )
    if not math.isfinite(refine_lr) or refine_lr <= 0:
        raise ValueError(f"--refine-lr must be a positive number, got {refine_lr}")
    ctx = click.get_current_context()
    if not mean_field and opt.given("mf_steps", ctx):
        raise ValueError("--mf-steps applies to the mean-field q* only: give --mean-field too")
    if not refine:
        given = [
            flag
            for flag, param in (("--refine-lr", "refine_lr"), ("--refine-num-samples", "refine_num_samples"))
            if opt.given(param, ctx)
        ]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to the refinement only: give --refine K (K >= 1) too")
    opt.check_size("--num-simulations", num_simulations, MAX_NUM_SIMULATIONS, "SBC simulations")
    opt.check_size("--num-posterior-samples", num_posterior_samples, MAX_NUM_POSTERIOR_SAMPLES, "guide draws each")
    opt.check_size("--num-replicates", num_replicates, MAX_NUM_REPLICATES, "replicates per datapoint")
    opt.check_size("--sir", sir, MAX_SIR, "SIR proposals per simulation")
    opt.check_size("--refine", refine, MAX_REFINE, "refinement steps")
    opt.check_size("--refine-num-samples", refine_num_samples, MAX_REFINE_NUM_SAMPLES, "draws per step")
    if mf_steps is not None:
        opt.check_size("--mf-steps", mf_steps, MAX_MF_STEPS, "Adam steps of each q*")
    opt.check_size("--discrete-num-samples", discrete_num_samples, MAX_DISCRETE_NUM_SAMPLES, "draws per value")
    # a missing or broken run directory is refused before anything else (names: after its plugins)
    load_config(run_dir, check_names=False)
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
        sir=sir or None,
        refine=refine or None,
        refine_lr=refine_lr,
        refine_num_samples=refine_num_samples,
        mean_field=mean_field,
        mean_field_options=({} if mf_steps is None else {"max_steps": mf_steps}) if mean_field else None,
        # the discrete site's settings only where given: a model without one refuses them
        discrete_num_samples=discrete_num_samples if opt.given("discrete_num_samples", ctx) else None,
        num_bins=ece_bins if opt.given("ece_bins", ctx) else None,
        binning=ece_binning.replace("-", "_") if opt.given("ece_binning", ctx) else None,
    )
    click.echo(result.summary())
    io.after_commit(lambda: opt.echo_written(result.files.values(), "calibration"))  # once in place


calibrate.field_flags = {  # type: ignore[attr-defined]  # library errors name the flag
    "out_dir": "--out",
    "sir": "--sir",
    "refine": "--refine",
    "refine_lr": "--refine-lr",
    "refine_num_samples": "--refine-num-samples",
    "mean_field": "--mean-field",
    "mean_field_options": "--mf-steps",
    "num_bins": "--ece-bins",
    "binning": "--ece-binning",
    "discrete_num_samples": "--discrete-num-samples",
}
