"""``ppl-vae data``: write data sets to disk once, for runs that read them from there."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import click

from ppl_vae.cli import options as opt


@click.group()
@click.pass_context
def data(ctx: click.Context) -> None:
    """Write a data set to disk once (rendered in batches), for --data-dir of later runs."""
    from ppl_vae.cli.main import SUBCOMMAND_META_KEY

    ctx.meta[SUBCOMMAND_META_KEY] = ctx.invoked_subcommand  # the group's error hints name its options


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) raises KeyboardInterrupt, so that the clean-up a
    Ctrl-C gets runs too: Python's default for SIGTERM ends the process without it (a 940 MB
    partial render stayed behind). The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    with _terminate_as_interrupt():  # a killed render removes its partial file, as Ctrl-C does
        path = lib.write_dsprites(out_dir, chunk=chunk, overwrite=overwrite, progress=progress)
    click.echo(f"wrote {path} ({lib.NUM_COMBINATIONS:,} images, {time.perf_counter() - start:.0f} s)")
