"""``ppl-vae data``: write data sets to disk once, for runs that read them from there."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

from ppl_vae.cli import options as opt


@click.group()
@click.pass_context
def data(ctx: click.Context) -> None:
    """Write a data set to disk once (rendered in batches), for --data-dir of later runs."""
    from ppl_vae.cli.main import SUBCOMMAND_META_KEY

    ctx.meta[SUBCOMMAND_META_KEY] = ctx.invoked_subcommand  # the group's error hints name its options


@data.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    callback=opt.path_or_none,
    help="Folder for the rendered file (created if missing); pass it as --data-dir of runs.",
)
@click.option(
    "--chunk",
    type=int,
    default=None,
    help="Images rendered and written at a time (default: ppl_vae.data.dsprites.WRITE_CHUNK); memory "
    "holds one chunk, 4 KiB of pixels per image.",
)
@click.option("--overwrite", is_flag=True, default=False, help="Render again over an existing file.")
@opt.progress_option()
def dsprites(out_dir: Path, chunk: Optional[int], overwrite: bool, progress: bool) -> None:
    """Render all 737,280 dSprites combinations (3.0 GB, uint8) into --out, in the original file's
    order; `ppl-vae fit --dataset dsprites --data-dir DIR` then reads rows from it per minibatch."""
    from ppl_vae.data import dsprites as lib

    start = time.perf_counter()
    # a killed render removes its partial file, as Ctrl-C does (the command group turns SIGTERM into it)
    path = lib.write_dsprites(out_dir, chunk=chunk, overwrite=overwrite, progress=progress)
    click.echo(f"wrote {path} ({lib.NUM_COMBINATIONS:,} images, {time.perf_counter() - start:.0f} s)")
