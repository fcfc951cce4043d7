"""The experiments of Kingma & Welling (2013), one module per figure (``ppl-vae experiment``).

Each ``figN.run(settings, out_dir, ...)`` is resumable: it writes its numbers after each
finished unit of work and skips finished units when rerun. Defaults are scaled down to a CPU;
``FigNSettings.paper()`` gives the paper's settings. Modules are imported on use.
"""
