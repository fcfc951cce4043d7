"""Annealed importance sampling of log p(x) per datapoint (Neal 2001), and BDMC (Grosse et al. 2015).

AIS moves C chains per datapoint along the geometric path between a normalized start density
f_0 and the unnormalized posterior f_1(z) = p(x, z):

    f_beta(z) = f_0(z) (p(x, z) / f_0(z))^beta,   0 = beta_0 < beta_1 < ... < beta_T = 1,

with f_0 = p(z) (so f_beta = p(z) p(x|z)^beta) or f_0 = q(z|x), a guide. Each chain starts at
z_0 ~ f_0, adds log f_t(z_{t-1}) - log f_{t-1}(z_{t-1}) to its log-weight, then moves by one
HMC transition that leaves f_t invariant. exp(log-weight) is an unbiased estimate of p(x), so
the log of its mean over chains is a stochastic LOWER bound on log p(x) (Jensen), whose bias
shrinks as T grows.

BDMC (bidirectional Monte Carlo, Grosse, Ghahramani & Adams 2015): for data simulated from
the model, (z*, x) ~ p(z) p(x|z), z* is an exact sample of p(z|x); AIS run backwards from z*
(beta from 1 to 0) gives an unbiased estimate of 1/p(x), so minus the log of its mean is a
stochastic UPPER bound. The two bounds sandwich log p(x); the gap between them bounds the
error of either and closes as T grows.

Transitions: HMC with Pyro's leapfrog integrator (:func:`pyro.ops.integrator.velocity_verlet`),
an identity mass matrix, ``num_leapfrog_steps`` steps, and a step size per datapoint and
temperature adapted toward ``target_accept_prob`` from the acceptance probability averaged over
that datapoint's chains at the previous temperature (as in Wu et al. 2017, "On the quantitative
analysis of decoder-based generative models"). By default (``adaptation="pilot"``) the
adaptation runs in a separate pilot of ``pilot_chains`` chains and the step sizes it found are
then fixed for the estimating chains: a step size that depends on the estimating chains' own
earlier states breaks the invariance AIS needs, and on the linear-Gaussian model such "online"
adaptation pushed log p̂ about 0.01-0.03 nat ABOVE the exact log p(x) at T = 500-2000.
BDMC's reverse chains reuse the forward pilot's step sizes, temperature by temperature.

Works for any model/guide pair that keeps the library's contract (datapoints in
``pyro.plate("data")``, latent sites in it, observed ``"x"``): the chains move the flat vector of
every continuous latent site (:mod:`ppl_vae.inference.latents`), discrete sites the model marks
for enumeration are summed out, and chains and datapoints are flattened to ``C * N`` rows of
one plate, so the model is called once per leapfrog step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
from pyro import poutine
from pyro.ops.integrator import potential_grad, velocity_verlet
from torch import Tensor

from ppl_vae.inference import estimators
from ppl_vae.inference.estimators import Estimate, Variable, register_estimator
from ppl_vae.inference.latents import Layout, flat_terms, model_layout
from ppl_vae.inference.modes import in_eval_mode, rows, seeded
from ppl_vae.inference.stats import THRESHOLDS, log_mean_exp_stats

if TYPE_CHECKING:  # xarray is imported where a dataset is built: choosing an estimator imports none of it
    import xarray as xr


def sigmoid_schedule(num_steps: int, delta: float = 4.0) -> Tensor:
    """beta_0 = 0 < ... < beta_T = 1 spaced as a rescaled sigmoid on [-delta, delta] (Grosse et al. 2015).

    Denser near both ends, where the intermediate distributions change fastest.
    """
    s = torch.sigmoid(torch.linspace(-delta, delta, num_steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def linear_schedule(num_steps: int) -> Tensor:
    """beta_t = t / T, shape ``(T + 1,)``."""
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


SCHEDULES: Dict[str, Callable[[int], Tensor]] = {"sigmoid": sigmoid_schedule, "linear": linear_schedule}


def _rows(v: Any, n: int, num_chains: int) -> Any:
    """A tensor with one row per datapoint repeated for each chain: ``(C * N, ...)``, chain-major."""
    if torch.is_tensor(v) and v.dim() and v.shape[0] == n:
        return v.unsqueeze(0).expand(num_chains, *v.shape).reshape(num_chains * n, *v.shape[1:])
    return v


class _Path:
    """The geometric path from f_0 (prior or guide) to p(x, z) over ``C * N`` flattened rows.

    z is the flat vector of every continuous latent site (:class:`~ppl_vae.inference.latents.Layout`);
    discrete sites the model marks for enumeration are summed out in every density.
    """

    def __init__(
        self,
        model: Callable,
        guide: Optional[Callable],
        x: Tensor,
        num_chains: int,
        kwargs: Dict[str, Any],
        layout: Layout,
    ):
        n = x.shape[0]
        self.model = model
        self.guide = guide
        self.layout = layout
        self.x = _rows(x, n, num_chains)
        self.kwargs = {k: _rows(v, n, num_chains) for k, v in kwargs.items()}
        self.q: Optional[torch.distributions.Distribution] = None
        if guide is not None:
            with torch.no_grad():  # q's parameters are constants for the chains
                trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(self.x, **self.kwargs)
            latents = {}
            for site in layout.sites:
                if site.name not in trace.nodes:
                    raise ValueError(f"the guide has no sample site {site.name!r}, a latent site of the model")
                latents[site.name] = cast(Tensor, trace.nodes[site.name]["value"]).detach()
            self._q_sample = layout.join(latents, 1)
            if len(layout.sites) == 1:  # one site: its distribution is fixed, score it directly
                self.q = cast(torch.distributions.Distribution, trace.nodes[layout.sites[0].name]["fn"])

    def log_q(self, z: Tensor) -> Tensor:
        """log q(latents | x) of the guide at ``z`` ``(C * N, size)``."""
        if self.q is not None:
            return self.q.log_prob(self.layout.split(z)[self.layout.sites[0].name])
        conditioned = poutine.condition(poutine.block(self.guide, hide_types=["param"]), data=self.layout.split(z))
        trace = poutine.trace(conditioned).get_trace(self.x, **self.kwargs)
        trace.compute_log_prob()
        return cast(Tensor, sum(trace.nodes[s.name]["log_prob"] for s in self.layout.sites))  # one or more sites

    def sample_start(self) -> Tensor:
        """z_0 ~ f_0 for every row."""
        if self.guide is not None:
            return self._q_sample
        with torch.no_grad():
            trace = poutine.trace(poutine.block(self.model, hide_types=["param"])).get_trace(self.x, **self.kwargs)
        return self.layout.join(
            {s.name: cast(Tensor, trace.nodes[s.name]["value"]).detach() for s in self.layout.sites}, 1
        )

    def terms(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """(log f_0(z), log p(x, z) - log f_0(z)), each ``(C * N,)``; log f_beta = first + beta * second."""
        log_prior, log_lik = flat_terms(self.model, self.x, z, self.layout, **self.kwargs)
        if self.guide is None:
            return log_prior, log_lik
        log_q = self.log_q(z)
        return log_q, log_prior + log_lik - log_q


@dataclass
class _Annealed:
    log_weight: Tensor  # (C, N) float64
    accept_rate: Tensor  # (N,) mean acceptance probability over transitions and chains
    log_steps: Tensor  # (T - 1, N) log leapfrog step size of each transition (before jitter)


ADAPTATIONS = ("pilot", "online", "none")


def _hmc_transition(
    path: _Path,
    z: Tensor,
    beta: float,
    step: Tensor,
    num_leapfrog_steps: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One HMC move of every row leaving f_beta invariant.

    Returns (new z, its log p(x,z) - log f_0(z), acceptance probability), each with ``M`` rows.
    """
    cache: Dict[str, Tensor] = {}

    def potential(params: Dict[str, Tensor]) -> Tensor:
        log_base, log_ratio = path.terms(params["z"])
        energy = -(log_base + beta * log_ratio)
        cache["energy"], cache["log_ratio"] = energy.detach(), log_ratio.detach()
        return energy.sum()

    grads, _ = potential_grad(potential, {"z": z})
    energy0, log_ratio0 = cache["energy"], cache["log_ratio"]
    r = torch.randn_like(z)
    kinetic0 = 0.5 * r.pow(2).flatten(1).sum(1)
    z_new, r_new, _, _ = velocity_verlet(
        {"z": z}, {"z": r}, potential, lambda r_: r_, step, num_leapfrog_steps, z_grads=grads
    )
    z_new, r_new = z_new["z"].detach(), r_new["z"]
    energy1, log_ratio1 = cache["energy"], cache["log_ratio"]  # the integrator's last evaluation is at z_new
    log_accept = (energy0 + kinetic0) - (energy1 + 0.5 * r_new.pow(2).flatten(1).sum(1))
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf, posinf=-math.inf).clamp(max=0.0)
    accept_prob = log_accept.exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    shape = (-1,) + (1,) * (z.dim() - 1)
    return (torch.where(accept.view(shape), z_new, z), torch.where(accept, log_ratio1, log_ratio0), accept_prob)


def _anneal(
    path: _Path,
    z: Tensor,
    betas: Tensor,
    *,
    num_chains: int,
    num_leapfrog_steps: int,
    step_size_jitter: float,
    log_steps: Optional[Tensor] = None,
    step_size: float = 0.1,
    target_accept_prob: float = 0.65,
    adapt_rate: float = 0.5,
    bar: Any = None,
) -> _Annealed:
    """Run the chains ``z`` ``(C * N, ...)`` (distributed as f_{betas[0]}) along ``betas``.

    With ``log_steps`` ``(T - 1, N)`` the step sizes are fixed in advance (the chains are then
    exact AIS); without, they start at ``step_size`` and adapt after each transition toward
    ``target_accept_prob`` from the acceptance averaged over a datapoint's chains.
    """
    m = z.shape[0]
    n = m // num_chains
    shape = (-1,) + (1,) * (z.dim() - 1)
    log_step = torch.full((n,), math.log(step_size), dtype=torch.float64, device=z.device)
    used = []
    log_w = torch.zeros(m, dtype=torch.float64, device=z.device)
    accept_sum = torch.zeros(n, dtype=torch.float64, device=z.device)
    with torch.no_grad():
        log_ratio = path.terms(z)[1]
    for t in range(1, len(betas)):
        log_w = log_w + float(betas[t] - betas[t - 1]) * log_ratio.double()
        if t == len(betas) - 1:
            break  # a move after the last weight update cannot change the weights
        if log_steps is not None:
            log_step = log_steps[t - 1]
        used.append(log_step)
        jitter = 1.0 + step_size_jitter * (2.0 * torch.rand(m, dtype=torch.float64, device=z.device) - 1.0)
        step = (log_step.exp().repeat(num_chains) * jitter).to(z.dtype).view(shape)
        with torch.enable_grad():
            z, log_ratio, accept_prob = _hmc_transition(path, z, float(betas[t]), step, num_leapfrog_steps)
        accept_n = accept_prob.double().view(num_chains, n).mean(0)
        accept_sum += accept_n
        if log_steps is None:
            log_step = (log_step + adapt_rate * (accept_n - target_accept_prob)).clamp(math.log(1e-4), math.log(5.0))
        if bar is not None:
            bar.update(1)
    accept_rate = accept_sum / len(used) if used else torch.full_like(accept_sum, math.nan)
    schedule = torch.stack(used) if used else log_step.new_zeros(0, n)
    return _Annealed(log_w.view(num_chains, n), accept_rate, schedule)


def _check(name: str, value: Any, low: int) -> None:
    if int(value) != value or not value >= low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")


def _betas(num_steps: int, schedule: str) -> Tensor:
    _check("num_steps", num_steps, 1)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule](int(num_steps))


@dataclass(frozen=True)
class AISSettings:
    """How the annealing runs, shared by :func:`ais_log_px` and :func:`bdmc`.

    One HMC transition of ``num_leapfrog_steps`` leapfrog steps per temperature, on the
    ``schedule`` ("sigmoid" or "linear"); ``step_size``: the initial leapfrog step;
    ``adaptation``: "pilot" (adapt in a separate run of ``pilot_chains`` chains, then fix:
    exact AIS), "online" (adapt within the estimating chains; cheaper, slightly biased) or
    "none" (keep ``step_size``), toward ``target_accept_prob``; ``step_size_jitter``: each
    move's step is scaled by U(1 - j, 1 + j) to avoid periodic trajectories (Neal 2011);
    ``batch_size``: datapoints annealed together.
    """

    num_leapfrog_steps: int = 10
    step_size: float = 0.1
    adaptation: str = "pilot"
    pilot_chains: int = 4
    target_accept_prob: float = 0.65
    step_size_jitter: float = 0.2
    schedule: str = "sigmoid"
    batch_size: int = 100


def _run(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    betas: Tensor,
    settings: AISSettings,
    *,
    num_chains: int,
    initial_z: Optional[Tensor],
    progress: bool,
    desc: str,
    kwargs: Dict[str, Any],
    log_steps: Optional[Tensor] = None,
) -> _Annealed:
    """AIS over batches of datapoints; ``initial_z`` ``(N, ...)`` starts every chain of a datapoint there.

    ``log_steps`` ``(T - 1, N)`` fixes the step sizes, overriding ``settings.adaptation``.
    """
    from tqdm.auto import tqdm

    num_leapfrog_steps, step_size, adaptation = settings.num_leapfrog_steps, settings.step_size, settings.adaptation
    pilot_chains, target_accept_prob = settings.pilot_chains, settings.target_accept_prob
    step_size_jitter, batch_size = settings.step_size_jitter, settings.batch_size
    _check("num_chains", num_chains, 1)
    _check("num_leapfrog_steps", num_leapfrog_steps, 1)
    _check("batch_size", batch_size, 1)
    _check("pilot_chains", pilot_chains, 1)
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"adaptation must be one of {', '.join(ADAPTATIONS)}, got {adaptation!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not 0.0 < target_accept_prob < 1.0:
        raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob}")
    if not 0.0 <= step_size_jitter < 1.0:
        raise ValueError(f"step_size_jitter must lie in [0, 1), got {step_size_jitter}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x holds no datapoints")
    if initial_z is not None and initial_z.shape[0] != n:
        raise ValueError(f"initial_z must have one row per datapoint ({n}), got shape {tuple(initial_z.shape)}")
    layout = model_layout(model, x, **kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site to anneal")
    if initial_z is not None and tuple(initial_z.shape[1:]) != (layout.size,):
        raise ValueError(
            f"initial_z must be the flat latent vector ({layout.size} numbers: sites "
            f"{', '.join(layout.names)}), got shape {tuple(initial_z.shape)}"
        )
    pilot = adaptation == "pilot" and log_steps is None
    opts: Dict[str, Any] = dict(
        num_leapfrog_steps=num_leapfrog_steps,
        step_size_jitter=step_size_jitter,
        step_size=step_size,
        target_accept_prob=target_accept_prob,
    )
    parts = []
    num_batches = math.ceil(n / batch_size)
    with tqdm(
        total=num_batches * max(len(betas) - 2, 0) * (2 if pilot else 1),
        disable=not progress,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            xb = x[sl]
            nb = xb.shape[0]
            kw = {k: rows(v, n, sl) for k, v in kwargs.items()}
            steps = None if log_steps is None else log_steps[:, sl]
            if adaptation == "none" and steps is None:
                steps = torch.full(
                    (max(len(betas) - 2, 0), nb), math.log(step_size), dtype=torch.float64, device=x.device
                )
            if pilot:  # its weights are discarded: only the step sizes it found are kept
                pilot_path = _Path(model, guide, xb, pilot_chains, kw, layout)
                steps = _anneal(
                    pilot_path, pilot_path.sample_start(), betas, num_chains=pilot_chains, bar=bar, **opts
                ).log_steps
            path = _Path(model, guide, xb, num_chains, kw, layout)
            z0 = path.sample_start() if initial_z is None else _rows(initial_z[sl].detach(), nb, num_chains)
            parts.append(_anneal(path, z0.detach(), betas, num_chains=num_chains, log_steps=steps, bar=bar, **opts))
    return _Annealed(
        torch.cat([p.log_weight for p in parts], 1),
        torch.cat([p.accept_rate for p in parts]),
        torch.cat([p.log_steps for p in parts], 1),
    )


def _last_step(log_steps: Tensor, step_size: float) -> Tensor:
    if log_steps.shape[0] == 0:
        return torch.full((log_steps.shape[1],), float(step_size), dtype=torch.float64)
    return log_steps[-1].exp()


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@in_eval_mode("model", "guide")
def ais_log_px(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    num_steps: int = 500,
    num_chains: int = 16,
    settings: AISSettings = AISSettings(),
    seed: Optional[int] = None,
    progress: bool = False,
    datapoint: Optional[Sequence[int] | np.ndarray] = None,
    **kwargs: Any,
) -> xr.Dataset:
    """AIS estimate of log p(x) for each row of ``x`` ``(N, ...)`` (Neal 2001), as an xarray Dataset.

    ``num_chains`` independent chains per datapoint, ``num_steps`` temperatures, one HMC
    transition per temperature (see :class:`AISSettings`). ``guide=None`` anneals from the prior p(z); a guide q(z|x) starts
    the chains at q and anneals q^(1-beta) p(x,z)^beta, usually far shorter a path. Tensor
    kwargs with one row per datapoint (labels ``y``) are passed to model and guide. ``seed``:
    the chains' own random stream (the caller's RNG state is left as it was; None draws from
    the caller's stream). z is the flat vector of every continuous latent site (each with its
    own event shape); discrete sites the model marks for enumeration are summed out.

    Variables over dim ``datapoint`` (each with an attribute ``bound``):

    - ``log_px``: log (1/C) sum_c w_c, a stochastic lower bound on log p(x);
    - ``log_px_stderr``: its Monte Carlo standard error over chains (delta method);
    - ``ess``: ESS of the C final AIS weights (near C: chains agree; near 1: one dominates);
    - ``accept_rate``: HMC acceptance probability averaged over transitions and chains;
    - ``step_size``: the leapfrog step size (before jitter) at the last temperature;
    - ``log_weight`` over (``chain``, ``datapoint``): each chain's log-weight.
    """
    betas = _betas(num_steps, settings.schedule)
    with seeded(seed, x.device):
        res = _run(
            model,
            guide,
            x,
            betas,
            settings,
            num_chains=num_chains,
            initial_z=None,
            progress=progress,
            desc=f"AIS T={num_steps}",
            kwargs=kwargs,
        )
    log_px, se, ess = log_mean_exp_stats(res.log_weight)
    n = x.shape[0]
    import xarray as xr

    ds = xr.Dataset(
        {
            "log_px": ("datapoint", _np(log_px)),
            "log_px_stderr": ("datapoint", _np(se)),
            "ess": ("datapoint", _np(ess)),
            "accept_rate": ("datapoint", _np(res.accept_rate)),
            "step_size": ("datapoint", _np(_last_step(res.log_steps, settings.step_size))),
            "log_weight": (("chain", "datapoint"), _np(res.log_weight)),
        },
        coords={
            "datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint),
            "chain": np.arange(num_chains),
        },
    )
    start = "prior" if guide is None else "guide"
    _describe(
        ds,
        {
            "log_px": (
                "lower bound",
                f"AIS estimate of log p(x), T={num_steps}, C={num_chains}, from the {start} "
                "(nats; stochastic lower bound: log of an unbiased estimate)",
            ),
            "log_px_stderr": ("neither", "Monte Carlo standard error of log_px over chains (nats)"),
            "ess": ("neither", f"effective sample size of the {num_chains} final AIS weights"),
            "accept_rate": ("neither", "HMC acceptance probability, mean over transitions and chains"),
            "step_size": ("neither", "leapfrog step size at the last temperature"),
            "log_weight": (
                "lower bound",
                "log AIS weight of each chain (nats; each is log of an unbiased estimate of p(x))",
            ),
        },
    )
    ds.attrs.update(
        {
            "method": "ais",
            "num_steps": int(num_steps),
            "num_chains": int(num_chains),
            "start": start,
            **_settings_attrs(settings),
            "reference": "Neal (2001), Annealed importance sampling",
        }
    )
    return ds


def _settings_attrs(settings: AISSettings) -> Dict[str, Any]:
    return {k: settings.__dict__[k] for k in ("num_leapfrog_steps", "schedule", "adaptation", "target_accept_prob")}


def _describe(ds: xr.Dataset, info: Dict[str, Tuple[str, str]]) -> None:
    for name, (bound, long_name) in info.items():
        ds[name].attrs.update({"bound": bound, "long_name": long_name})


@torch.no_grad()
def simulate_data(
    model: Callable, x_like: Tensor, *, seed: Optional[int] = None, **kwargs: Any
) -> Tuple[Tensor, Tensor]:
    """(x, z*) drawn from the model, z* ~ p(z) and x ~ p(x|z*), one per row of ``x_like``.

    ``x_like`` only fixes the number and shape of the datapoints (the model is run with its
    observed site unconditioned). z* ``(N, size)`` is the flat vector of every continuous latent
    site, an exact sample of p(z|x), which BDMC's reverse chain needs (Grosse et al. 2015). A
    discrete site the model sums out is drawn too and forgotten, so z* is still exact for the
    marginal posterior over the continuous sites.
    """
    layout = model_layout(model, x_like, **kwargs)
    with seeded(seed, x_like.device):
        trace = poutine.trace(poutine.uncondition(poutine.block(model, hide_types=["param"]))).get_trace(
            x_like, **kwargs
        )
    if "x" not in trace.nodes:
        raise ValueError("the model has no sample site 'x'")
    return cast(Tensor, trace.nodes["x"]["value"]).detach(), layout.join(
        {s.name: cast(Tensor, trace.nodes[s.name]["value"]).detach() for s in layout.sites}, 1
    )


def _bdmc_pair(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    z_exact: Tensor,
    betas: Tensor,
    settings: AISSettings,
    steps: int,
    opts: Dict[str, Any],
) -> Tuple[_Annealed, _Annealed]:
    """The forward chains from f_0 and the reverse chains from the exact posterior sample."""
    fwd = _run(model, guide, x, betas, settings, initial_z=None, desc=f"BDMC forward T={steps}", **opts)
    # the reverse chains meet the temperatures in reverse order: reuse the forward step sizes
    reuse = None if settings.adaptation == "online" else fwd.log_steps.flip(0)
    rev = _run(
        model,
        guide,
        x,
        betas.flip(0),
        settings,
        initial_z=z_exact,
        desc=f"BDMC reverse T={steps}",
        log_steps=reuse,
        **opts,
    )
    return fwd, rev


@in_eval_mode("model")
def bdmc(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    z_exact: Tensor,
    *,
    step_counts: Sequence[int] = (10, 100, 1000),
    num_chains: int = 4,
    settings: AISSettings = AISSettings(),
    seed: Optional[int] = None,
    progress: bool = False,
    datapoint: Optional[Sequence[int] | np.ndarray] = None,
    **kwargs: Any,
) -> xr.Dataset:
    """Bidirectional Monte Carlo (Grosse et al. 2015): a lower and an upper bound on log p(x).

    ``z_exact`` ``(N, ...)`` must be an exact sample of p(z|x) for each row of ``x``, e.g. from
    :func:`simulate_data` (or a closed-form posterior). For each T in ``step_counts``: forward
    AIS (f_0 -> p(x,z), chains from f_0) gives ``lower``, a stochastic lower bound; reverse AIS
    (p(x,z) -> f_0, all ``num_chains`` chains of a datapoint from z_exact) estimates 1/p(x)
    without bias, so ``upper`` = -log mean(reverse weights) is a stochastic upper bound.
    ``gap`` = upper - lower bounds the error of either; it shrinks toward 0 as T grows.
    The reverse chains share their start, so ``upper_stderr`` can understate their spread.
    Other arguments as in :func:`ais_log_px`. Dims (``num_steps``, ``datapoint``).
    """
    if not step_counts:
        raise ValueError("step_counts must name at least one number of steps")
    if z_exact.shape[0] != x.shape[0]:
        raise ValueError(f"z_exact must have one row per datapoint ({x.shape[0]}), got {tuple(z_exact.shape)}")
    opts = dict(num_chains=num_chains, progress=progress, kwargs=kwargs)
    out: Dict[str, list] = {
        k: [] for k in ("lower", "lower_stderr", "upper", "upper_stderr", "forward_accept_rate", "reverse_accept_rate")
    }
    for i, steps in enumerate(step_counts):
        betas = _betas(steps, settings.schedule)
        with seeded(None if seed is None else seed + i, x.device):
            fwd, rev = _bdmc_pair(model, guide, x, z_exact, betas, settings, steps, opts)
        lower, lower_se, _ = log_mean_exp_stats(fwd.log_weight)
        neg_upper, upper_se, _ = log_mean_exp_stats(rev.log_weight)
        for k, v in (
            ("lower", lower),
            ("lower_stderr", lower_se),
            ("upper", -neg_upper),
            ("upper_stderr", upper_se),
            ("forward_accept_rate", fwd.accept_rate),
            ("reverse_accept_rate", rev.accept_rate),
        ):
            out[k].append(_np(v))
    n = x.shape[0]
    dims = ("num_steps", "datapoint")
    import xarray as xr

    ds = xr.Dataset(
        {k: (dims, np.stack(v)) for k, v in out.items()},
        coords={
            "num_steps": np.asarray(list(step_counts), dtype=int),
            "datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint),
        },
    )
    ds["gap"] = ds["upper"] - ds["lower"]
    _describe(
        ds,
        {
            "lower": ("lower bound", "forward AIS log p(x) (nats; stochastic lower bound)"),
            "lower_stderr": ("neither", "Monte Carlo standard error of lower over chains (nats)"),
            "upper": (
                "upper bound",
                "reverse AIS -log mean(1/p-hat) from an exact posterior sample (nats; stochastic upper bound)",
            ),
            "upper_stderr": ("neither", "Monte Carlo standard error of upper over chains (nats; chains share a start)"),
            "forward_accept_rate": ("neither", "HMC acceptance probability of the forward chains"),
            "reverse_accept_rate": ("neither", "HMC acceptance probability of the reverse chains"),
            "gap": ("neither", "upper - lower: the width of the BDMC sandwich (nats; bounds either bound's error)"),
        },
    )
    ds.attrs.update(
        {
            "method": "bdmc",
            "num_chains": int(num_chains),
            **_settings_attrs(settings),
            "start": "prior" if guide is None else "guide",
            "reference": "Grosse, Ghahramani & Adams (2015), Sandwiching the marginal likelihood "
            "using bidirectional Monte Carlo",
        }
    )
    return ds


# --------------------------------------------------------------------------------------------
# the estimator interface (ppl_vae.inference.estimators): "ais" and "bdmc"


def _from_dataset(ds: xr.Dataset, name: str, headline: str, stderr: str, skip: Sequence[str] = ()) -> Estimate:
    """An :class:`~ppl_vae.inference.estimators.Estimate` holding the variables of ``ds`` (the
    ``headline`` one as ``log_px``), each with its bound and long name."""
    as_t = lambda v: torch.from_numpy(np.ascontiguousarray(ds[v].values))  # noqa: E731
    variables = {}
    for v in ds.data_vars:
        if v in (headline, stderr) or v in skip:
            continue
        attrs = ds[v].attrs
        diag = attrs["bound"] == "neither" and not str(v).endswith("stderr") and v != "gap"
        variables[str(v)] = Variable(as_t(v), attrs["bound"], attrs["long_name"], tuple(map(str, ds[v].dims)), diag)
    coords = {str(c): ds[c].values for c in ds.coords if c != "datapoint"}
    settings = {k: v for k, v in ds.attrs.items() if k not in ("method", "reference")}
    return Estimate(
        name,
        as_t(headline),
        as_t(stderr),
        ds[headline].attrs["bound"],
        ds[headline].attrs["long_name"],
        variables,
        coords,
        settings,
        str(ds.attrs.get("reference", "")),
    )


def _one_step_count(num_steps: int | Sequence[int]) -> int:
    if isinstance(num_steps, (list, tuple)):
        if len(num_steps) != 1:
            raise ValueError(
                f"AIS takes one number of temperatures (num_steps, --ais-steps), got {list(num_steps)}; "
                "several are for the estimator 'bdmc'"
            )
        return int(num_steps[0])
    return int(num_steps)  # type: ignore[arg-type]


def _estimator_settings(
    start: str, num_leapfrog_steps: int, step_size: float, adaptation: str, schedule: str, batch_size: int
) -> AISSettings:
    """The :class:`AISSettings` of the "ais" and "bdmc" estimators' options (``start`` checked)."""
    if start not in ("prior", "guide"):
        raise ValueError(f"start must be 'prior' or 'guide', got {start!r}")
    return AISSettings(
        num_leapfrog_steps=num_leapfrog_steps,
        step_size=step_size,
        adaptation=adaptation,
        schedule=schedule,
        batch_size=batch_size,
    )


def _ais_warnings(ds: xr.Dataset, names: Dict[str, str]) -> List[str]:
    n = ds.sizes["datapoint"]
    out = []
    c = int(ds.attrs["num_chains"])
    low = THRESHOLDS.low_ess(ds["ess"].values, c)
    if c > 1 and low.sum() > 0.1 * n:
        out.append(
            f"AIS chain ESS < {min(THRESHOLDS.min_ess, c / 2):g} of {c} for {int(low.sum())} of {n} datapoints: the "
            f"chains disagree and the standard error is optimistic; raise {names['num_steps']}"
        )
    acc = ds["accept_rate"].values
    if np.nanmean(acc) < 0.3:
        out.append(
            f"HMC acceptance is {np.nanmean(acc):.2f} on average: the chains barely move; raise "
            f"{names['num_steps']} (the step size adapts over more temperatures)"
        )
    if c == 1:
        out.append(f"one chain per datapoint gives no standard error; raise {names['num_chains']}")
    return out


@register_estimator(
    "ais",
    title="annealed importance sampling with HMC, from the prior or the guide",
    bound="lower bound",
    reference="Neal (2001), Annealed importance sampling",
    files=("evaluation_ais.nc", "evaluation_ais.csv"),
    needs_guide=False,
    warnings=_ais_warnings,
)
def ais(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_steps: int | Sequence[int] = 500,
    num_chains: int = 16,
    num_leapfrog_steps: int = 10,
    step_size: float = 0.1,
    adaptation: str = "pilot",
    schedule: str = "sigmoid",
    start: str = "prior",
    batch_size: int = 100,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    """AIS log p̂(x) per datapoint (:func:`ais_log_px`): ``num_chains`` chains of
    ``num_steps`` temperatures from the prior (``start="prior"``; the guide is not used) or from
    the guide (``start="guide"``), settings as in :class:`AISSettings`."""
    settings = _estimator_settings(start, num_leapfrog_steps, step_size, adaptation, schedule, batch_size)
    ds = ais_log_px(
        model,
        None if start == "prior" else guide,
        x,
        num_steps=_one_step_count(num_steps),
        num_chains=num_chains,
        settings=settings,
        seed=seed,
        progress=progress,
        **kwargs,
    )
    return _from_dataset(ds, "ais", "log_px", "log_px_stderr")


def _bdmc_summary(ds: xr.Dataset) -> List[str]:
    n = ds.sizes["datapoint"]

    def mean_se(v: xr.DataArray) -> str:
        return estimators.mean_se(v).strip()

    lines = [
        f"BDMC on {n} datapoints simulated from the model (C={ds.attrs['num_chains']} chains; "
        "nats per datapoint, mean ± se over datapoints; the gap's se is paired):",
        f"{'steps':>8} {'lower (fwd AIS)':>20} {'upper (rev AIS)':>20} {'gap':>16}",
    ]
    for t in ds["num_steps"].values:
        s = ds.sel(num_steps=t)
        lines.append(f"{int(t):>8} {mean_se(s['lower']):>20} {mean_se(s['upper']):>20} {mean_se(s['gap']):>16}")
    last = ds.isel(num_steps=-1)
    evidence = str(ds.attrs.get("evidence", "log p(x)"))
    lower, upper = float(last["lower"].mean()), float(last["upper"].mean())
    if lower <= upper:
        gap, gap_se = _mean_gap(ds)
        width = f"{gap:.3f} ± {gap_se:.3f}" if math.isfinite(gap_se) else f"{gap:.3f} (one datapoint: no se)"
        lines.append(
            f"{lower:.3f} <= {evidence} <= {upper:.3f} "
            f"(BDMC, T={int(last['num_steps'])}: stochastic lower and upper bounds on simulated data, "
            f"means over datapoints; the sandwich is {width} nats wide)"
        )
    else:  # each bound holds in expectation only: crossed within their noise means closed
        gap, gap_se = _mean_gap(ds)
        by = f"{-gap:.3f} ± {gap_se:.3f}" if math.isfinite(gap_se) else f"{-gap:.3f} (one datapoint: no se)"
        if math.isfinite(gap_se) and -gap <= 3 * gap_se:
            verdict = f"{evidence} is about {0.5 * (lower + upper):.3f} on simulated data (each bound holds in "
            verdict += "expectation; the sandwich is closed to within their Monte Carlo noise)"
        else:
            verdict = (
                "more than their Monte Carlo noise can explain, or with no se to tell: no sandwich (see the warning)"
            )
        lines.append(f"the bounds cross by {by} nats at T={int(last['num_steps'])}: {verdict}")
    return lines


def _mean_gap(ds: xr.Dataset) -> Tuple[float, float]:
    """The mean BDMC gap (upper - lower) at the largest T and its standard error over datapoints."""
    gap = np.asarray(ds["gap"].isel(num_steps=-1).values, dtype=float)
    se = float(gap.std(ddof=1) / math.sqrt(gap.size)) if gap.size > 1 else math.nan
    return float(gap.mean()), se


def _bdmc_warnings(ds: xr.Dataset, names: Dict[str, str]) -> List[str]:
    gap, gap_se = _mean_gap(ds)
    if gap > 1.0:
        return [
            f"the BDMC sandwich is still {gap:.2f} nats wide at the largest step count: raise "
            f"{names['num_steps']} before trusting either bound to within a nat"
        ]
    if gap < 0 and not math.isfinite(gap_se):
        return [
            f"the BDMC bounds cross by {-gap:.3f} nats on one datapoint, with no standard error to tell noise from a "
            f"failed sandwich; simulate more datapoints, or raise {names['num_chains']} and {names['num_steps']}"
        ]
    if gap < -3 * gap_se:  # beyond noise: the chains are too few to make either bound hold
        return [
            f"the BDMC bounds cross by {-gap:.3f} nats, more than 3 standard errors ({gap_se:.3f}): the lower bound "
            f"above the upper one is no sandwich; raise {names['num_chains']} and {names['num_steps']}"
        ]
    return []


@register_estimator(
    "bdmc",
    title="bidirectional Monte Carlo: forward-AIS lower and reverse-AIS upper bounds",
    bound="lower bound",
    reference="Grosse, Ghahramani & Adams (2015), Sandwiching the marginal likelihood using bidirectional Monte Carlo",
    needs_guide=False,
    simulated=True,
    summary=_bdmc_summary,
    warnings=_bdmc_warnings,
)
def bdmc_estimate(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_steps: int | Sequence[int] = (10, 100, 1000),
    num_chains: int = 4,
    num_leapfrog_steps: int = 10,
    step_size: float = 0.1,
    adaptation: str = "pilot",
    schedule: str = "sigmoid",
    start: str = "prior",
    batch_size: int = 100,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    """BDMC on data simulated from the model, one datapoint per row of ``x`` (``x`` fixes only
    their number and shape): for each T in ``num_steps``, forward AIS (a stochastic lower bound)
    and reverse AIS from the exact z* (a stochastic upper bound) (:func:`bdmc`). ``log_px`` is
    the lower bound at the largest T; ``upper`` over (num_steps, datapoint) the upper bounds."""
    counts = [int(t) for t in num_steps] if isinstance(num_steps, (list, tuple)) else [int(num_steps)]  # type: ignore[arg-type]
    settings = _estimator_settings(start, num_leapfrog_steps, step_size, adaptation, schedule, batch_size)
    with seeded(seed, x.device):
        x_sim, z_sim = simulate_data(model, x, **kwargs)
        ds = bdmc(
            model,
            None if start == "prior" else guide,
            x_sim,
            z_sim,
            step_counts=counts,
            num_chains=num_chains,
            settings=settings,
            progress=progress,
            **kwargs,
        )
    last = ds.isel(num_steps=-1)
    ds["log_px"] = last["lower"].assign_attrs(
        bound="lower bound",
        long_name=f"forward AIS log p(x) at T={counts[-1]} on data simulated from the model (nats; stochastic lower "
        "bound)",
    )
    ds["log_px_stderr"] = last["lower_stderr"].assign_attrs(last["lower_stderr"].attrs)
    ds = ds.drop_vars([c for c in ("num_steps",) if c in ds.coords and c not in ds.dims])
    est = _from_dataset(ds, "bdmc", "log_px", "log_px_stderr")
    est.settings["data"] = "simulated from the model: z* ~ p(z), x ~ p(x|z*), one per row of x"
    return est
