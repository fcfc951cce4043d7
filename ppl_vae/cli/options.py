"""Options several ``ppl-vae`` commands share, declared once (as rasterio's ``rio/options.py``),
and the one way a command prints a warning.

Each factory returns a click decorator; a command passes only what differs (its default, its
help). Importing this module imports neither torch nor Pyro.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def path_or_none(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[Path]:
    """An output path; an empty name (``--out ""``) is refused instead of meaning the current folder."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("is an empty name; give a file or folder name", ctx=ctx, param=param)
    return Path(value)


def device_option(default: str = "cpu") -> Decorator:
    return click.option("--device", default=default, show_default=True, help="cpu, cuda, cuda:N or auto.")


def seed_option(default: Optional[int] = 0, help: str = "Seed of every random draw.") -> Decorator:
    return click.option("--seed", type=int, default=default, show_default=default is not None, help=help)


def out_option(help: str, *names: str) -> Decorator:
    """``--out PATH`` (``None`` when absent); ``""`` is a usage error."""
    return click.option(
        *(names or ("--out",)), type=str, default=None, metavar="PATH", callback=path_or_none, help=help
    )


def out_file_option(help: str, example: str, what: str = "file") -> Decorator:
    """``--out FILE`` for a command that writes one file: a name that says it is a folder (a
    trailing slash, or an existing folder) is refused in one line (a ``ValueError``, exit 1)
    rather than written as a file of that name; ``example``: the file name the message suggests
    inside it; ``what``: the file in words ("netCDF file"). Missing parent folders are the command's to create (:func:`prepare_out_file`)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[Path]:
        path = path_or_none(ctx, param, value)
        if value is not None and (value.endswith(("/", os.sep)) or Path(value).is_dir()):
            verb = "is" if Path(value).is_dir() else "names"
            raise ValueError(f"--out {value} {verb} a folder; give the {what} to write (e.g. {Path(value) / example})")
        return path

    return click.option("--out", type=str, default=None, metavar="FILE", callback=callback, help=help)


def prepare_out_file(out: Optional[Path]) -> None:
    """Before any work: refuse an ``--out`` file that would replace a run's own file or go through
    a link out of a run, and create its missing parent folders (as every command's output
    folders are; removed again if the command fails before writing)."""
    if out is None:
        return
    from ppl_vae import io

    io.check_target(out)
    io.make_folder(Path(out).parent)


def split_option(help: Optional[str] = None) -> Decorator:
    return click.option(
        "--split",
        type=click.Choice(["test", "train"]),
        default="test",
        show_default=True,
        help=help or "Which split of the run's dataset.",
    )


def num_samples_option(default: int, help: str, *names: str) -> Decorator:
    return click.option(*(names or ("--num-samples",)), type=int, default=default, show_default=True, help=help)


def num_datapoints_option(default: int, why: str) -> Decorator:
    """How many datapoints of the split a command scores; the same rule for evaluate and compare."""
    return click.option(
        "--num-datapoints",
        type=int,
        default=default,
        show_default=True,
        help=f"How many datapoints of the split to score: a seeded random subset of this size (0: all; {why}).",
    )


def nproc_option(blocks: str) -> Decorator:
    """``--nproc``: processes that split the datapoints, in whole ``blocks``, for the same results."""
    return click.option(
        "--nproc",
        type=int,
        default=1,
        show_default=True,
        help=f"Processes to split the datapoints across (whole blocks of {blocks}); the results equal one "
        "process's for the same --seed. Under torchrun leave it at 1.",
    )


def threads_option() -> Decorator:
    """``--threads``: torch threads per process."""
    return click.option(
        "--threads",
        type=int,
        default=None,
        help="Torch threads per process (default: the available cores, shared among the processes).",
    )


def check_processes(nproc: int, threads: Optional[int]) -> None:
    """One-line errors for ``--nproc`` and ``--threads`` below 1."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


def progress_option(help: str = "Show a progress bar.") -> Decorator:
    return click.option("--progress/--no-progress", default=True, show_default=True, help=help)


def given(name: str, ctx: Optional[click.Context] = None) -> bool:
    """Whether the user set the parameter ``name`` (on the command line or through the environment),
    not left it at click's default: an option that does not apply is refused only when given."""
    ctx = ctx or click.get_current_context()
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def warn(message: str) -> None:
    """Print one ``Warning: ...`` line to stderr: every command warns this way (the group shows
    the library's ``warnings.warn`` calls through it too)."""
    click.echo(f"Warning: {' '.join(str(message).split())}", err=True)


def echo_written(files: Any, earlier: str) -> None:
    """Once a report's set is in place (``io.after_commit``): "wrote ..." and, where the set
    removed the ``earlier`` report's files it did not write (``io.supersedes``), which."""
    from ppl_vae import io

    click.echo("wrote " + ", ".join(str(p) for p in files))
    removed = io.last_set_removed()
    if removed:
        click.echo(f"removed the earlier {earlier}'s " + ", ".join(str(p) for p in removed))


def check_size(flag: str, value: int, limit: int, what: str) -> None:
    """Refuse, before any work, a size far beyond what a machine does in reasonable time or
    memory: a one-line error naming ``flag`` and the limit (``what``: the work it sizes)."""
    if value > limit:
        raise ValueError(f"{flag} {value} is far beyond what this machine can do ({what}); choose at most {limit:,}")


def config_options() -> Decorator:
    """The flags of the config fields, generated from their declarations in
    :mod:`ppl_vae.config` (every declared field that has a flag, in declaration order): type,
    default, help, metavar and choices come from the declaration; the flag's value goes into
    the config through :meth:`ppl_vae.config.RunConfig.from_flags`."""
    from ppl_vae.config import declarations

    made = [_config_option(d) for d in declarations() if d.flag is not None]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for make in reversed(made):  # click lists the last decorator applied first
            f = make(f)
        return f

    return decorate


def _config_option(declared: Any) -> Decorator:
    from ppl_vae.config import OneOf

    opt = declared.option
    kind = click.Choice(list(opt.check.values)) if isinstance(opt.check, OneOf) else declared.flag_hint
    default = declared.flag_default
    return click.option(
        declared.flag,
        declared.param,
        type=kind,
        default=default,
        show_default=default is not None and not opt.multiple,
        multiple=opt.multiple,
        metavar=opt.metavar,
        help=opt.help,
    )
