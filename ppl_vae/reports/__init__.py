"""Drivers that read run directories and write results: ``evaluate``, ``compare`` (one run or
several), ``disentanglement`` and their HTML reports.

The estimators they call live in :mod:`ppl_vae.inference` and :mod:`ppl_vae.analysis`, which
never read run directories; only this package and the run layer (:mod:`ppl_vae.pipeline`,
:mod:`ppl_vae.runs`) touch them.
"""
