"""``ppl-vae text``: bits per character, KL, samples and interpolations of a trained text VAE."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple

import click

from ppl_vae.cli import options as opt


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@opt.split_option("Which sentences of the run's dataset to score.")
@opt.num_samples_option(10, "Draws of z per sentence for the ELBO, IW bound and KL.")
@click.option(
    "--samples", "num_sentences", type=int, default=5, show_default=True, help="Sentences to decode from z ~ p(z)."
)
@click.option(
    "--temperature",
    type=float,
    default=0.0,
    show_default=True,
    help="Sampling temperature of decoded characters (0: greedy).",
)
@click.option(
    "--interpolate",
    nargs=2,
    type=str,
    default=None,
    metavar="FIRST SECOND",
    help="Decode points between the codes of two sentences.",
)
@click.option("--steps", type=int, default=5, show_default=True, help="Points of the interpolation.")
@opt.seed_option()
def text(
    run_dir: Path,
    split: str,
    num_samples: int,
    num_sentences: int,
    temperature: float,
    interpolate: Optional[Tuple[str, str]],
    steps: int,
    seed: int,
) -> None:
    """Score a text VAE run on its corpus and show samples (Semeniuta et al. 2017)."""
    from ppl_vae import pipeline
    from ppl_vae.analysis.text import check_endpoints, interpolate_sentences, sample_sentences, text_metrics
    from ppl_vae.data.ondisk import NpyRows
    from ppl_vae.models.text import TextHybridVAE

    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if num_sentences < 0:
        raise ValueError(f"--samples must be >= 0, got {num_sentences}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if steps < 2 and interpolate:
        raise ValueError(f"--steps must be >= 2 to interpolate between two sentences, got {steps}")
    if opt.given("steps") and not interpolate:
        raise ValueError("--steps applies to an interpolation only: give --interpolate FIRST SECOND too")
    if opt.given("temperature") and not num_sentences:
        raise ValueError("--temperature applies to the sampled sentences only; --samples is 0")
    pipeline.seed_everything(seed)
    run = pipeline.load_run(run_dir, history=False)
    if not isinstance(run.vae, TextHybridVAE):
        raise ValueError(f"{run_dir} holds model {run.config.model.model!r}, not a text VAE (text_hybrid...)")
    if interpolate:  # before the scoring
        check_endpoints(run.vae, *interpolate)
    data = pipeline.load_run_data(run)  # the splits the run recorded
    x = data.test if split == "test" else data.train
    assert not isinstance(x, NpyRows)  # text data sets are held in memory
    m = text_metrics(run.vae, x, num_samples=num_samples)
    click.echo(
        f"{m.attrs['num_sentences']} {split} sentences, {m.attrs['num_scored_characters']} scored symbols: "
        f"{float(m['bits_per_character_iw']):.3f} ± {float(m['bits_per_character_iw_se']):.3f} bits/char (IW, "
        f"K={num_samples}: a stochastic upper bound), {float(m['bits_per_character_elbo']):.3f} ± "
        f"{float(m['bits_per_character_elbo_se']):.3f} (ELBO: a stochastic upper bound); KL "
        f"{float(m['kl']):.2f} ± {float(m['kl_se']):.2f} nats/sentence ({float(m['kl_bits_per_character']):.3f} "
        "bits/char; a Monte Carlo estimate); ± se over sentences"
    )
    if num_sentences:  # quoted: a sentence's trailing spaces are part of it (QA)
        click.echo("samples (quoted):")
        for s in sample_sentences(run.vae, num_sentences, temperature=temperature):
            click.echo(f"  {s!r}")
    if interpolate:
        click.echo("interpolation (quoted):")
        for s in interpolate_sentences(run.vae, interpolate[0], interpolate[1], num_steps=steps):
            click.echo(f"  {s!r}")
