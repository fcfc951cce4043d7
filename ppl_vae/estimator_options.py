"""The options of the estimators of log p(x), declared once (flag, help, range), torch-free.

:mod:`ppl_vae.inference.estimators` checks every registered estimator's keyword-only options
against :data:`OPTIONS`; ``ppl-vae evaluate`` builds its flags from it and the docs' table reads
it. Importing this module imports neither torch nor Pyro (the CLI builds its flags before it
knows which estimator will run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Option:
    """A keyword-only option of one or more estimators: its command-line ``flag``, ``help``,
    the smallest value allowed (``low``, for numbers) or the ``choices``, and whether the flag
    may be repeated (``multiple``). Its default is the estimator function's."""

    flag: str
    help: str
    low: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    multiple: bool = False
    integer: bool = True
    positive: bool = False
    checked: bool = True  # False: a dict of another function's options, checked by ``check``
    #: "module:function" that checks a dict option's value (one-line ValueError), imported when called
    check: Optional[str] = None
    #: far beyond any useful estimate (Burda et al. use K = 5000): refused up front, not run for hours
    high: Optional[int] = None
    what: str = ""
    short: Optional[str] = None  # a one-letter alias of the flag


ADAM_STEPS_BEFORE_POLISH = 50
"""Mean-field VI's most Adam steps by default when the L-BFGS polish follows
(:func:`ppl_vae.inference.meanfield.fit_mean_field`, ``max_steps=None``): Adam only brings each q*
near its optimum, which the polish then reaches to ``gtol`` whatever the start. Measured against
500 steps (issue 28, benchmarks/bench_meanfield_defaults.py): L[q*] moves no more than another
seed of the old fit moves it, and the fit is 1.3-2x faster."""

ADAM_STEPS_WITHOUT_POLISH = 500
"""Mean-field VI's most Adam steps by default without the polish (``polish=False``): Adam alone must
then reach the optimum (its plateau rule usually stops it first)."""

MEAN_FIELD_INIT_CHOICES = ("encoder", "prior")
"""Where mean-field VI may start each q*: the encoder's q(z|x) or p(z) (the names of
:data:`ppl_vae.inference.meanfield.MEAN_FIELD_INITS`; a test holds them equal)."""
MEAN_FIELD_INIT = "encoder"
"""Where mean-field VI starts each q* by default."""
MEAN_FIELD_LR = 1e-2
"""Mean-field VI's Adam learning rate by default."""
MEAN_FIELD_TOL = 1e-4
"""Relative change of the windowed mean ELBO that counts as a plateau in mean-field VI's Adam phase."""
MEAN_FIELD_POLISH_STEPS = 300
"""Most L-BFGS iterations of mean-field VI's polish by default."""
MEAN_FIELD_GTOL = 1e-3
"""A q* counts as converged when its largest gradient component of the polish's objective is below this."""

#: every option an estimator may take beyond ``seed``, ``batch_size`` and ``progress``.
OPTIONS: Dict[str, Option] = {
    "num_samples": Option(
        "--num-samples",
        "Draws K of the proposal per datapoint (IW: importance samples; Burda et al. use 5000).",
        low=1,
        high=100_000_000,
        what="draws per datapoint",
        short="-k",
    ),
    "particle_batch_size": Option(
        "--particle-batch-size",
        "Draws per chunk (default: about 65,536 samples of z per chunk; 4,096 where the model is scored through Pyro's traces).",
        low=1,
    ),
    "num_steps": Option(
        "--ais-steps",
        "Number of annealing temperatures T; repeat it for BDMC (e.g. --ais-steps 10 --ais-steps 100).",
        low=1,
        multiple=True,
        high=1_000_000,
        what="annealing temperatures per chain",
    ),
    "num_chains": Option(
        "--num-chains", "Annealing chains per datapoint.", low=1, high=100_000, what="annealing chains per datapoint"
    ),
    "num_leapfrog_steps": Option("--leapfrog-steps", "Leapfrog steps per HMC move.", low=1),
    "step_size": Option(
        "--step-size",
        "Initial leapfrog step size, adapted per datapoint toward 65% acceptance.",
        integer=False,
        positive=True,
    ),
    "adaptation": Option(
        "--adaptation",
        "Adapt step sizes in a separate pilot run then fix them (exact AIS), within the estimating chains "
        "(cheaper, slightly biased), or not at all.",
        choices=("pilot", "online", "none"),
    ),
    "schedule": Option("--schedule", "Spacing of the temperatures.", choices=("sigmoid", "linear")),
    "start": Option(
        "--ais-start", "Anneal from the prior p(z) or from the run's guide q(z|x).", choices=("prior", "guide")
    ),
    "warmup_steps": Option("--warmup-steps", "HMC warm-up steps before the posterior samples are kept.", low=0),
    "mean_field_options": Option(
        "--mf-option",
        "Mean-field VI's fit of q*: KEY=VALUE, VALUE in JSON (e.g. max_steps=800); repeatable. "
        "Keys: fit_mean_field's arguments.",
        checked=False,
        multiple=True,
        check="ppl_vae.inference.meanfield:check_mean_field_options",
    ),
}
#: the arguments every estimator takes, with the same meaning everywhere
COMMON = ("seed", "batch_size", "progress")
