"""Command-line interface: the click group ``ppl-vae``, one module per command."""
