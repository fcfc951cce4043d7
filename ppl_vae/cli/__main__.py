"""``python -m ppl_vae.cli``: the same as the ``ppl-vae`` command."""

from ppl_vae.cli.main import main

main()
