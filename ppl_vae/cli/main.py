"""The ``ppl-vae`` command group. Commands live one per module and load lazily."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Dict

import click

# name -> "module:attribute"; a command's module is imported only when it runs.
COMMANDS: Dict[str, str] = {
    "fit": "ppl_vae.cli.fit:fit",
    "evaluate": "ppl_vae.cli.evaluate:evaluate",
    "compare": "ppl_vae.cli.compare:compare",
    "anomaly": "ppl_vae.cli.anomaly:anomaly",
    "models": "ppl_vae.cli.models:models",
    "text": "ppl_vae.cli.text:text",
    "experiment": "ppl_vae.cli.experiment:experiment",
    "generate": "ppl_vae.cli.generate:generate",
    "inpaint": "ppl_vae.cli.generate:inpaint",
    "animate": "ppl_vae.cli.generate:animate",
}


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


class PplVaeGroup(click.Group):
    """Loads commands lazily and turns library errors into one-line messages (exit 1)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        from ppl_vae.errors import PplVaeError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (PplVaeError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            click.echo(f"Error: {one_line(exc)}", err=True)
            sys.exit(1)


@click.group(cls=PplVaeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ppl_vae")
def cli() -> None:
    """Variational autoencoders as Pyro probabilistic programs (Kingma & Welling 2013)."""


def main() -> None:  # console entry point
    cli()
