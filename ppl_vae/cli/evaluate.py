"""``ppl-vae evaluate``: log p(x) per datapoint for a run directory by IW, AIS or BDMC."""

from __future__ import annotations

from pathlib import Path

import click

from ppl_vae.cli import options as opt

# Far beyond any useful estimate (Burda et al. use K = 5000): refused up front, not run for hours.
MAX_NUM_SAMPLES = 100_000_000
MAX_AIS_STEPS = 1_000_000
MAX_NUM_CHAINS = 100_000


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["iw", "ais", "bdmc"]),
    default="iw",
    show_default=True,
    help="iw: importance sampling with the run's guide (Burda et al. 2015); ais: annealed importance "
    "sampling with HMC (Neal 2001); bdmc: lower and upper bounds on data simulated from the model "
    "(Grosse et al. 2015). All give log p(x) per datapoint.",
)
@opt.num_samples_option(1000, "IW: importance samples K per datapoint (Burda et al. use 5000).", "--num-samples", "-k")
@click.option(
    "--ais-steps",
    type=int,
    multiple=True,
    default=(500,),
    show_default=True,
    help="AIS/BDMC: number of temperatures T; repeat for BDMC (e.g. --ais-steps 10 --ais-steps 100).",
)
@click.option("--num-chains", type=int, default=16, show_default=True, help="AIS/BDMC: chains per datapoint.")
@click.option(
    "--leapfrog-steps", type=int, default=10, show_default=True, help="AIS/BDMC: leapfrog steps per HMC move."
)
@click.option(
    "--step-size",
    type=float,
    default=0.1,
    show_default=True,
    help="AIS/BDMC: initial leapfrog step size, adapted per datapoint toward 65% acceptance.",
)
@click.option(
    "--adaptation",
    type=click.Choice(["pilot", "online", "none"]),
    default="pilot",
    show_default=True,
    help="AIS/BDMC: adapt step sizes in a separate pilot run then fix them (exact AIS), within the "
    "estimating chains (cheaper, slightly biased), or not at all.",
)
@click.option(
    "--schedule",
    type=click.Choice(["sigmoid", "linear"]),
    default="sigmoid",
    show_default=True,
    help="AIS/BDMC: spacing of the temperatures.",
)
@click.option(
    "--ais-start",
    type=click.Choice(["prior", "guide"]),
    default="prior",
    show_default=True,
    help="AIS/BDMC: anneal from the prior p(z) or from the run's guide q(z|x).",
)
@opt.split_option()
@opt.num_datapoints_option(0, "the same rule as compare")
@click.option("--batch-size", type=int, default=100, show_default=True, help="Datapoints per batch.")
@click.option(
    "--particle-batch-size",
    type=int,
    default=None,
    help="IW: samples per chunk (default: about 65,536 samples of z per chunk).",
)
@opt.device_option()
@opt.seed_option()
@opt.out_option("Folder for the netCDF and CSV files (default: the run directory).")
@opt.nproc_option("--batch-size")
@opt.threads_option()
@opt.progress_option()
def evaluate(
    run_dir: Path,
    method: str,
    num_samples: int,
    ais_steps,
    num_chains: int,
    leapfrog_steps: int,
    step_size: float,
    adaptation: str,
    schedule: str,
    ais_start: str,
    split: str,
    num_datapoints,
    batch_size: int,
    particle_batch_size,
    device: str,
    seed: int,
    out,
    nproc: int,
    threads,
    progress: bool,
) -> None:
    """Estimate log p(x) of a run's datapoints; every number printed and saved says which bound it is."""
    from ppl_vae.reports.evaluation import check_out_dir, evaluate_run

    checks = [
        ("--num-samples", num_samples, 1),
        ("--num-chains", num_chains, 1),
        ("--leapfrog-steps", leapfrog_steps, 1),
        ("--batch-size", batch_size, 1),
        ("--nproc", nproc, 1),
        ("--num-datapoints", num_datapoints, 0),
    ]
    if threads is not None:
        checks.append(("--threads", threads, 1))
    checks += [("--ais-steps", t, 1) for t in ais_steps]
    for flag, value, low in checks:
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    opt.check_size("--num-samples", num_samples, MAX_NUM_SAMPLES, "importance samples per datapoint")
    for steps in ais_steps:
        opt.check_size("--ais-steps", steps, MAX_AIS_STEPS, "annealing temperatures per chain")
    opt.check_size("--num-chains", num_chains, MAX_NUM_CHAINS, "AIS chains per datapoint")
    if not step_size > 0:
        raise ValueError(f"--step-size must be > 0, got {step_size}")
    if method == "ais" and len(ais_steps) != 1:
        raise ValueError("--method ais takes one --ais-steps (repeat it only for --method bdmc)")
    if out is not None:
        check_out_dir(out, "--out")
    result = evaluate_run(
        run_dir,
        method=method,
        num_samples=num_samples,
        num_steps=ais_steps,
        num_chains=num_chains,
        num_leapfrog_steps=leapfrog_steps,
        step_size=step_size,
        adaptation=adaptation,
        schedule=schedule,
        ais_start=ais_start,
        split=split,
        num_datapoints=num_datapoints or None,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        device=device,
        seed=seed,
        out_dir=out,
        progress=progress,
        nproc=nproc,
        threads=threads,
    )
    if not result.files:  # a torchrun rank other than 0: rank 0 prints and writes
        return
    click.echo(result.summary())
    for line in result.warnings:
        opt.warn(line)
    click.echo("wrote " + ", ".join(str(p) for p in result.files.values()))
