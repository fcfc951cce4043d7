"""The inference-gap decomposition of Cremer, Li & Duvenaud (2018), per datapoint.

For a fitted model and its amortized guide q(z|x):

    log p(x) - L[q] = (log p(x) - L[q*]) + (L[q*] - L[q])
    inference gap   =  approximation gap  +  amortization gap

where q* is the best diagonal Gaussian for that datapoint alone (non-amortized mean-field VI,
:mod:`ppl_vae.inference.meanfield`).

log p(x) is estimated by multiple importance sampling (Veach & Guibas 1995; Owen 2013, ch. 9)
with K draws from q and K draws from q*, every draw weighted against the mixture
proposal ½q + ½q* (the balance heuristic):

    p̂(x) = 1/(2K) Σ_{all 2K draws z} p(x, z) / (½ q(z|x) + ½ q*(z)).

p̂(x) is an unbiased estimate of p(x), so log p̂(x) is a stochastic lower bound on log p(x)
(E log p̂ <= log p by Jensen). Each mixture weight is at most twice either proposal's own
weight, so the relative variance of p̂ exceeds that of the better proposal's K-sample
estimate by at most 1/(2K): never much worse than the better of the two. Taking the per-datapoint maximum of two IW estimates instead is biased
upward and no longer a bound. The plain IW estimates with q and with q* (Burda et al. 2015)
and both ELBOs come from the same draws; every standard error is a delta-method error over
the K independent (q-draw, q*-draw) pairs, so the gaps' errors account for shared samples.
Only the model/guide contract is used, so any conforming pair can be analysed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, cast

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vae.inference.estimators import Estimate, diagnostic, register_estimator, variable
from ppl_vae.inference.importance import default_particle_batch_size
from ppl_vae.inference.latents import (
    log_joint,
    richer_than_mean_field,
    sample_enumerated,
    sample_guide,
    traced_log_probs,
)
from ppl_vae.inference.meanfield import (
    MeanFieldGuide,
    MeanFieldResult,
    check_mean_field_options,
    fit_mean_field,
    guide_moments,
)
from ppl_vae.inference.modes import batches as data_batches
from ppl_vae.inference.modes import block_seed, check_positive, eval_mode, in_eval_mode, seeded
from ppl_vae.inference.stats import THRESHOLDS, ess, log_mean_exp, mean_se, psis_khat
from ppl_vae.inference.traces import PARTICLE_PLATE

if TYPE_CHECKING:  # imported where a dataset or table is built: after the scoring, off compare's path to it
    import pandas as pd
    import xarray as xr

ESTIMATORS = ("log_px", "iw_amortized", "iw_meanfield", "elbo_meanfield", "elbo_amortized")
"""estimator coordinate: log p̂ by multiple importance sampling over ½q + ½q*; log p̂_K with q
as the proposal; log p̂_K with q* as the proposal; L[q*]; L[q]."""

GAPS = ("approximation_gap", "amortization_gap", "inference_gap")

LABELS = {
    "log_px": "log p̂(x) (MIS, ½q + ½q*)",
    "iw_amortized": "log p̂(x) (IW, amortized q)",
    "iw_meanfield": "log p̂(x) (IW, q* proposal)",
    "elbo_meanfield": "L[q*] (mean-field VI)",
    "elbo_amortized": "L[q] (amortized)",
    "approximation_gap": "approximation gap log p̂ − L[q*]",
    "amortization_gap": "amortization gap L[q*] − L[q]",
    "inference_gap": "inference gap log p̂ − L[q]",
}

BOUNDS = {
    "log_px": "lower bound",
    "iw_amortized": "lower bound",
    "iw_meanfield": "lower bound",
    "elbo_meanfield": "lower bound",
    "elbo_amortized": "lower bound",
    "approximation_gap": "lower bound",
    "amortization_gap": "neither",
    "inference_gap": "lower bound",
}
"""What each number is with respect to its target: "lower bound", "upper bound" or "neither"."""

MEANINGS = {
    "log_px": "stochastic lower bound on log p(x): log of an unbiased estimate of p(x) (E log p̂ <= log p)",
    "iw_amortized": "stochastic lower bound on log p(x) (IW with K draws of q; Burda et al. 2015)",
    "iw_meanfield": "stochastic lower bound on log p(x) (IW with K draws of q*)",
    "elbo_meanfield": "unbiased Monte Carlo estimate of L[q*], itself a lower bound on log p(x)",
    "elbo_amortized": "unbiased Monte Carlo estimate of L[q], itself a lower bound on log p(x)",
    "approximation_gap": "stochastic lower bound on log p(x) − L[q*] (log p̂ is one on log p(x)); "
    "overstated if q* is not the best diagonal Gaussian",
    "amortization_gap": "unbiased estimate of L[q*] − L[q] for the fitted q*; understates the true gap "
    "if q* is not the best diagonal Gaussian",
    "inference_gap": "stochastic lower bound on log p(x) − L[q]",
}


MEAN_FIELD_FAMILY = "a diagonal Gaussian per latent site, as q*"
"""The ``guide_family`` attribute of a gap decomposition whose amortized guide is in q*'s family."""


def for_evidence(text: str, evidence: str = "log p(x)") -> str:
    """``text`` written for log p(x), said of ``evidence`` instead: for a model given labels
    (``log p(x | y)``, a cvae) log p(x) and log p̂(x) become log p(x | y) and log p̂(x | y), and
    the guide q(z|x) becomes q(z|x, y)."""
    if evidence == "log p(x)" or not evidence.startswith("log p(x | "):
        return text
    given = evidence[len("log p(x | ") : -1]
    for old, new in (
        ("log p̂(x)", f"log p̂(x | {given})"),
        ("log p(x)", evidence),
        ("q(z|x)", f"q(z|x, {given})"),
        ("q(z_u|x)", f"q(z_u|x, {given})"),
    ):
        text = text.replace(old, new)
    return text


def relabel(ds: xr.Dataset, evidence: str) -> xr.Dataset:
    """``ds`` with every string attribute and string coordinate said of ``evidence``
    (:func:`for_evidence`); ``ds`` itself where the evidence is log p(x)."""
    if evidence == "log p(x)":
        return ds
    ds = ds.copy()
    ds.attrs = {k: for_evidence(v, evidence) if isinstance(v, str) else v for k, v in ds.attrs.items()}
    for name in list(ds.variables):
        var = ds[name]
        var.attrs = {k: for_evidence(v, evidence) if isinstance(v, str) else v for k, v in var.attrs.items()}
        if name in ds.coords and var.dtype.kind in "OU":
            ds = ds.assign_coords({name: (var.dims, [for_evidence(str(v), evidence) for v in var.values], var.attrs)})
    return ds


def describe(name: str) -> str:
    """``"<label>: <what it is>"`` for an estimator or gap name."""
    return f"{LABELS[name]}: {MEANINGS[name]}"


def _guide_log_prob(guide: Callable, x: Tensor, values: Dict[str, Tensor], k: int, kw: Dict[str, Any]) -> Tensor:
    """log guide(values) ``(k, B)``: the guide run with every site it samples fixed to ``values``."""
    with pyro.plate(PARTICLE_PLATE, k, dim=-2):
        trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(x, **kw)
    trace.compute_log_prob()
    total = x.new_zeros((k, x.shape[0]))
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if name not in values:
            raise ValueError(
                f"the guide samples site {name!r}, which the other proposal does not draw: the two "
                "cannot be mixed over the same latents"
            )
        total = total + site["log_prob"].expand(total.shape)
    return total


def _draws(
    model: Callable, guide: Callable, meanfield: Callable, x: Tensor, k: int, kw: Dict[str, Any]
) -> List[Tensor]:
    """[log p(x,z), log q, log r, then the same at K draws of r], each ``(k, B)``: K draws of the
    amortized guide q, then K of r, q* made a proposal over every site q samples, through Pyro's
    traces (:func:`_fast_draws` is the same without them).

    Discrete sites the model enumerates and q does not sample are summed out of every term. A
    discrete site q samples and q* (continuous) does not gets its exact conditional:
    r(z, d) = q*(z) p(d | x, z), drawn by :func:`~ppl_vae.inference.latents.sample_enumerated`;
    L[r] is then E_q*[log p(x, z) - log q*(z)], the ELBO the mean-field fit maximizes. The
    weights are the same as scoring both proposals on the continuous sites alone with d summed
    out of p, where q has no discrete site.
    """
    lp, guide_trace = traced_log_probs(model, guide, x, num_particles=k, **kw)
    shape = (k, x.shape[0])
    continuous: Dict[str, Tensor] = {}
    discrete: Dict[str, Tensor] = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        fn: Any = site["fn"]
        value = cast(Tensor, site["value"])
        value = value.expand(shape + value.shape[value.dim() - len(fn.event_shape) :])
        (discrete if fn.support.is_discrete else continuous)[name] = value
    log_s_at_q = _guide_log_prob(meanfield, x, continuous, k, kw)
    s_draws, log_s = sample_guide(model, meanfield, x, k, **kw)
    if not discrete:
        joint_s = log_joint(model, x, s_draws, **kw)
        return [lp.log_joint, lp.log_guide, log_s_at_q, joint_s, log_s, _guide_log_prob(guide, x, s_draws, k, kw)]
    # r(z, d) = q*(z) p(d | x, z): at q's draws p(d | x, z) = p(x, d, z) / p(x, z)
    log_px_z_at_q = log_joint(model, x, continuous, **kw)
    log_r_at_q = log_s_at_q + lp.log_joint - log_px_z_at_q
    d_s, joint_s, log_px_z_s = sample_enumerated(model, x, s_draws, **kw)
    if set(d_s) != set(discrete):
        raise ValueError(
            f"the guide samples the discrete sites {sorted(discrete)} and the model enumerates {sorted(d_s)}: "
            "the gap decomposition needs the guide to sample every enumerated site or none"
        )
    log_r = log_s + joint_s - log_px_z_s
    log_q_at_r = _guide_log_prob(guide, x, {**s_draws, **d_s}, k, kw)
    return [lp.log_joint, lp.log_guide, log_r_at_q, joint_s, log_r, log_q_at_r]


def _fast_mixture_pair(
    model: Callable, guide: Callable, meanfield_guide: Callable, kw: Dict[str, Any], x: Optional[Tensor] = None
) -> Any:
    """The pair whose protocol draws and scores both proposals without tracing, or None.

    It must offer the fast path (:func:`~ppl_vae.inference.latents.fast_pair`), its guide must be
    its encoder's Gaussian over the one site ``z`` (``encoder_is_guide``: log q(z|x) at q*'s draws
    is then a Normal density of the encoder's output), and q* a :class:`MeanFieldGuide` of that
    site. The draws are the traced path's (the same standard-normal calls in the same order:
    q's, then q*'s) and the log densities equal it to float rounding; the model's log p(x | z)
    goes through its blocked, fused scorer (:meth:`ppl_vae.models.VAE.log_likelihood`)."""
    from ppl_vae.inference.capabilities import offers
    from ppl_vae.inference.latents import fast_pair

    owner = fast_pair(model, guide, kw, x)  # with x: a user's class is checked against its program first
    if owner is None or not offers(owner, "fast_path", "encoder_guide") or not hasattr(owner, "encoder"):
        return None
    if not isinstance(meanfield_guide, MeanFieldGuide) or meanfield_guide.latent_site != "z":
        return None
    shapes = owner.latent_shapes() if callable(getattr(owner, "latent_shapes", None)) else None
    if shapes is None or list(shapes) != ["z"] or meanfield_guide.loc.dim() != 2:
        return None
    return owner


def _fast_draws(owner: Any, meanfield: MeanFieldGuide, x: Tensor, k: int, kw: Dict[str, Any]) -> List[Tensor]:
    """:func:`_draws` of q, then of q*, through the pair's protocol: [log p(x,z), log q, log q*] at
    K draws of q, then [log p(x,z), log q*, log q] at K draws of q*, each ``(k, B)``."""
    from ppl_vae.inference.latents import guide_and_prior
    from ppl_vae.models.densities import normal_log_prob

    latents, log_q, log_prior = guide_and_prior(owner, x, k, **kw)  # q's standard-normal call first
    joint_q = log_prior + owner.log_likelihood(x, latents, **kw)
    log_s_at_q = normal_log_prob(latents["z"], meanfield.loc, meanfield.log_scale.exp()).sum(-1)
    drawn, log_s = meanfield.draw_latents(k)  # q*'s: the call Pyro's Normal.rsample makes
    z_s = drawn["z"]
    loc_q, scale_q = owner.encoder(x)
    log_q_at_s = normal_log_prob(z_s, loc_q, scale_q).sum(-1)
    joint_s = owner.log_prior(x, {"z": z_s}, **kw) + owner.log_likelihood(x, {"z": z_s}, **kw)
    return [joint_q, log_q, log_s_at_q, joint_s, log_s, log_q_at_s]


@torch.no_grad()
@in_eval_mode("model", "guide")
def mixture_estimates(
    model: Callable,
    guide: Callable,
    meanfield_guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    progress: bool = False,
    seed: Optional[int] = None,
    fast_path: bool = True,
    **kwargs: Any,
) -> Dict[str, Tensor]:
    """Every estimator of :data:`ESTIMATORS` and every gap from K draws of q and K of q*.

    ``guide``: the amortized q(z|x); ``meanfield_guide``: q* over the same ``x`` (e.g.
    :meth:`MeanFieldResult.guide`). Returns ``{name: (N,)}`` for each estimator and gap, with
    ``<name>_stderr``, and ``ess_amortized``, ``ess_meanfield``, ``ess_mixture`` (ESS of
    the q, q* and mixture weights, out of K, K and 2K) with the PSIS Pareto k̂ of the same
    weights as ``khat_*`` (Vehtari et al. 2024; above 0.7 the estimate and its standard error
    are not to be trusted).

    ``fast_path``: where the pair offers the fast-path protocol with its encoder's Gaussian as
    guide and q* is a :class:`MeanFieldGuide` (:func:`_fast_mixture_pair`), draw and score
    without Pyro's traces, through the model's fused scorer: the same draws, and the same numbers
    to float rounding (a test compares both ways); False always traces.

    Standard errors: the K draws of q and the K of q* form K independent pairs; each quantity
    is (to first order) a mean over pairs of an influence term, whose sample sd / sqrt(K) is
    its error. For log p̂_MIS the term is ψ_k = (w_k^q + w_k^{q*}) / (2 p̂) with the mixture
    weights w; for L[q*] it is log w*_k; for a gap, the difference of its two terms.
    """
    check_positive("num_samples", num_samples)
    check_positive("batch_size", batch_size)
    if x.shape[0] == 0:
        raise ValueError("x holds no datapoints")
    from tqdm.auto import tqdm

    log_half = math.log(0.5)
    out: Dict[str, list] = {}
    batches = list(data_batches(x, kwargs, batch_size))
    mf_batches = _split_guide(meanfield_guide, x.shape[0], batch_size)
    if particle_batch_size is None:
        traced = not fast_path or _fast_mixture_pair(model, guide, mf_batches[0], batches[0][1], batches[0][0]) is None
        particle_batch_size = default_particle_batch_size(batch_size, traced=traced)
    check_positive("particle_batch_size", particle_batch_size)
    chunks = math.ceil(num_samples / particle_batch_size)
    with tqdm(
        total=len(batches) * chunks,
        disable=not progress,
        desc=f"MIS K={num_samples}+{num_samples}",
        unit="chunk",
        dynamic_ncols=True,
    ) as bar:
        for i, ((xb, kw), mf) in enumerate(zip(batches, mf_batches)):
            parts: Dict[str, List[Tensor]] = {"a": [], "b": [], "mq": [], "ms": []}
            with seeded(None if seed is None else block_seed(seed, i * batch_size), xb.device):
                owner = _fast_mixture_pair(model, guide, mf, kw, xb) if fast_path else None
                for start in range(0, num_samples, particle_batch_size):
                    k = min(particle_batch_size, num_samples - start)
                    if owner is not None:
                        terms = [t.double() for t in _fast_draws(owner, mf, xb, k, kw)]
                        joint_q, log_q, log_s_at_q, joint_s, log_s, log_q_at_s = terms
                    else:
                        terms = [t.double() for t in _draws(model, guide, mf, xb, k, kw)]
                        joint_q, log_q, log_s_at_q, joint_s, log_s, log_q_at_s = terms
                    parts["a"].append(joint_q - log_q)
                    parts["b"].append(joint_s - log_s)
                    parts["mq"].append(joint_q - torch.logaddexp(log_q + log_half, log_s_at_q + log_half))
                    parts["ms"].append(joint_s - torch.logaddexp(log_q_at_s + log_half, log_s + log_half))
                    bar.update(1)
            a, b, mq, ms = (torch.cat(parts[n]) for n in ("a", "b", "mq", "ms"))
            for t in (a, b, mq, ms):
                if torch.isnan(t).any():
                    raise ValueError(
                        "an importance weight is NaN: the model or a guide produced an invalid log-density"
                    )
            log_px = log_mean_exp(torch.cat([mq, ms]))
            psi = 0.5 * ((mq - log_px).exp() + (ms - log_px).exp())  # mean exactly 1
            values = {}
            values["log_px"] = (log_px, mean_se(psi)[1])
            for name, lw in (("iw_amortized", a), ("iw_meanfield", b)):
                est = log_mean_exp(lw)
                values[name] = (est, mean_se((lw - est).exp())[1])
            values["elbo_amortized"] = mean_se(a)
            values["elbo_meanfield"] = mean_se(b)
            # gaps: value from the estimates, error from the paired influence terms
            values["approximation_gap"] = (log_px - b.mean(0), mean_se(psi - b)[1])
            values["amortization_gap"] = (b.mean(0) - a.mean(0), mean_se(b - a)[1])
            values["inference_gap"] = (log_px - a.mean(0), mean_se(psi - a)[1])
            for name, (v, se) in values.items():
                out.setdefault(name, []).append(v)
                out.setdefault(f"{name}_stderr", []).append(se)
            for name, lw in (("amortized", a), ("meanfield", b), ("mixture", torch.cat([mq, ms]))):
                out.setdefault(f"ess_{name}", []).append(ess(lw))
                out.setdefault(f"khat_{name}", []).append(torch.from_numpy(psis_khat(lw)).to(lw))
    return {k: torch.cat(v) for k, v in out.items()}


def _split_guide(guide: Callable, n: int, batch_size: int):
    """q* restricted to each batch of datapoints (a MeanFieldGuide holds one row per datapoint)."""
    if isinstance(guide, MeanFieldGuide):
        if guide.loc.shape[0] != n:
            raise ValueError(f"the mean-field guide holds {guide.loc.shape[0]} datapoints but x has {n}")
        return [guide.take(slice(s, s + batch_size)) for s in range(0, n, batch_size)]
    return [guide] * math.ceil(n / batch_size)


@in_eval_mode("model", "guide")
def gap_decomposition(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    mean_field: Optional[MeanFieldResult] = None,
    mean_field_options: Optional[Dict[str, Any]] = None,
    datapoint: Optional[Sequence[int] | np.ndarray] = None,
    progress: bool = True,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> xr.Dataset:
    """Per-datapoint estimates and gaps as an xarray Dataset (Cremer et al. 2018).

    ``x``: ``(N, ...)``; tensor kwargs with one row per datapoint (``y`` labels) go with it.
    q* comes from :func:`~ppl_vae.inference.meanfield.fit_mean_field` (run here with
    ``mean_field_options`` unless a fitted ``mean_field`` is given). Then K = ``num_samples``
    draws of q and K of q* give every estimate (:func:`mixture_estimates`). ``datapoint``: the
    indices of ``x`` in its dataset, stored as the ``datapoint`` coordinate. ``seed``: each
    batch of datapoints draws from its own stream seeded by (seed, its first index), so the
    result does not depend on how datapoints are split across calls or processes; the caller's
    RNG state is left as it was (None: the caller's stream). Works for any number of latent
    sites: q* is then the product of one diagonal Gaussian per site.

    Returns ``estimate`` and ``stderr`` over (datapoint, estimator) (see :data:`ESTIMATORS`;
    coordinates ``bound`` and ``meaning`` say what each one is), the gaps and their standard
    errors over datapoint, the ESS of each proposal, whether q* converged per datapoint,
    and the (loc, scale) of q and q* over (datapoint, latent). Dataset attrs
    ``estimate_<name>`` describe each number in words. The model and guide are scored in eval
    mode (their modes are restored afterwards).
    """
    with seeded(seed, x.device):
        return _gap_decomposition(
            model,
            guide,
            x,
            num_samples=num_samples,
            batch_size=batch_size,
            particle_batch_size=particle_batch_size,
            mean_field=mean_field,
            mean_field_options=mean_field_options,
            datapoint=datapoint,
            progress=progress,
            seed=seed,
            **kwargs,
        )


def _gap_decomposition(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int,
    batch_size: int,
    particle_batch_size: Optional[int],
    mean_field: Optional[MeanFieldResult],
    mean_field_options: Optional[Dict[str, Any]],
    datapoint: Optional[Sequence[int] | np.ndarray],
    progress: bool,
    seed: Optional[int],
    **kwargs: Any,
) -> xr.Dataset:
    if mean_field is None:
        options = {"progress": progress, **(mean_field_options or {})}
        mean_field = fit_mean_field(model, guide, x, seed=seed, **options, **kwargs)
    elif mean_field.loc.shape[0] != x.shape[0]:
        raise ValueError(f"mean_field holds {mean_field.loc.shape[0]} datapoints but x has {x.shape[0]}")
    layout = mean_field.layout
    richer = richer_than_mean_field(guide, x, **kwargs)
    q_loc, q_scale = guide_moments(guide, x, layout if layout is not None and len(layout.sites) > 1 else None, **kwargs)
    est = mixture_estimates(
        model,
        guide,
        mean_field.guide(),
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        particle_batch_size=particle_batch_size,
        progress=progress,
        **kwargs,
    )

    n = x.shape[0]
    as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    flat = lambda t: as_np(t.reshape(n, -1))  # noqa: E731
    coords: Dict[str, Any] = {
        "datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint),
        "estimator": list(ESTIMATORS),
        "latent": np.arange(flat(q_loc).shape[1]),
    }
    if layout is not None and len(layout.sites) > 1:  # which latent site each column belongs to
        coords["latent_site"] = ("latent", layout.column_sites().astype(str))
    data = {
        "estimate": (("datapoint", "estimator"), np.stack([as_np(est[e]) for e in ESTIMATORS], axis=1)),
        "stderr": (("datapoint", "estimator"), np.stack([as_np(est[f"{e}_stderr"]) for e in ESTIMATORS], axis=1)),
        "ess_amortized": ("datapoint", as_np(est["ess_amortized"])),
        "ess_meanfield": ("datapoint", as_np(est["ess_meanfield"])),
        "ess_mixture": ("datapoint", as_np(est["ess_mixture"])),
        "khat_amortized": ("datapoint", as_np(est["khat_amortized"])),
        "khat_meanfield": ("datapoint", as_np(est["khat_meanfield"])),
        "khat_mixture": ("datapoint", as_np(est["khat_mixture"])),
        "meanfield_converged": ("datapoint", mean_field.converged.cpu().numpy().astype(bool)),
        "amortized_loc": (("datapoint", "latent"), flat(q_loc)),
        "amortized_scale": (("datapoint", "latent"), flat(q_scale)),
        "meanfield_loc": (("datapoint", "latent"), flat(mean_field.loc)),
        "meanfield_scale": (("datapoint", "latent"), flat(mean_field.scale)),
    }
    for g in GAPS:
        data[g] = ("datapoint", as_np(est[g]))
        data[f"{g}_stderr"] = ("datapoint", as_np(est[f"{g}_stderr"]))
    import xarray as xr

    ds = xr.Dataset(data, coords=coords)
    ds = ds.assign_coords(
        bound=("estimator", [BOUNDS[e] for e in ESTIMATORS]), meaning=("estimator", [MEANINGS[e] for e in ESTIMATORS])
    )
    ds["estimate"].attrs.update({"units": "nats", "long_name": "per-datapoint estimate (see coords bound, meaning)"})
    ds["stderr"].attrs.update({"units": "nats", "long_name": "Monte Carlo standard error (delta method over K pairs)"})
    for g in GAPS:
        ds[g].attrs.update({"units": "nats", "long_name": LABELS[g], "bound": BOUNDS[g], "meaning": MEANINGS[g]})
        ds[f"{g}_stderr"].attrs.update({"units": "nats", "long_name": f"Monte Carlo standard error of the {LABELS[g]}"})
    ds["ess_amortized"].attrs["long_name"] = f"ESS of the IW weights of q, out of K = {num_samples}"
    ds["ess_meanfield"].attrs["long_name"] = f"ESS of the IW weights of q*, out of K = {num_samples}"
    ds["ess_mixture"].attrs["long_name"] = f"ESS of the mixture weights, out of 2K = {2 * num_samples}"
    for name, what in (("amortized", "q"), ("meanfield", "q*"), ("mixture", "½q + ½q*")):
        ds[f"khat_{name}"].attrs["long_name"] = f"PSIS Pareto k̂ of the weights of {what} (> 0.7: unreliable)"
    ds["meanfield_converged"].attrs["long_name"] = "mean-field VI met its stopping rule for this datapoint"
    ds.attrs.update(
        {
            "reference": "Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders; "
            "multiple importance sampling: Veach & Guibas (1995)",
            "log_px_estimator": "multiple importance sampling, balance heuristic, proposal ½q + ½q*, "
            f"K = {num_samples} draws of each",
            "num_samples": int(num_samples),
            "guide_family": MEAN_FIELD_FAMILY if richer is None else f"richer than q*'s: {richer}",
            "meanfield_num_converged": int(mean_field.converged.sum()),
            "meanfield_num_datapoints": int(mean_field.converged.numel()),
            "meanfield_max_steps_taken": int(mean_field.num_steps.max()),
            **{f"estimate_{name}": describe(name) for name in ESTIMATORS + GAPS},
        }
    )
    return ds


def gap_table(gaps: xr.Dataset) -> pd.DataFrame:
    """Mean over datapoints of each estimator and gap, with two standard errors.

    ``se``: the spread across datapoints, sd / sqrt(N) (how well the mean over the data
    population is known). ``mc_se``: the Monte Carlo error of the mean for these datapoints,
    sqrt(sum_i se_i^2) / N. ``bound``: lower bound, upper bound or neither.
    """
    rows = []
    n = gaps.sizes["datapoint"]

    def row(name: str, values: xr.DataArray, stderr: xr.DataArray) -> None:
        v = values.values
        rows.append(
            {
                "quantity": name,
                "description": LABELS[name],
                "bound": BOUNDS[name],
                "mean": float(np.mean(v)),
                "se": float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                "mc_se": float(np.sqrt(np.nansum(stderr.values**2)) / n),
                "median": float(np.median(v)),
                "meaning": MEANINGS[name],
            }
        )

    for e in gaps.estimator.values:
        row(str(e), gaps["estimate"].sel(estimator=e), gaps["stderr"].sel(estimator=e))
    for g in GAPS:
        row(g, gaps[g], gaps[f"{g}_stderr"])
    import pandas as pd

    return pd.DataFrame(rows).set_index("quantity")


def format_gap_table(table: pd.DataFrame, evidence: str = "log p(x)") -> str:
    """The table as aligned text: ``mean ± se`` per quantity (nats) and what each one bounds
    (``evidence``: what log p̂ estimates, log p(x | y) for a model given labels)."""
    width = max(len(d) for d in table["description"])
    lines = [f"{'quantity':<{width}}  {'mean ± se (nats)':>22}  {'MC se':>7}  kind"]
    for _, r in table.iterrows():
        lines.append(
            f"{r['description']:<{width}}  {r['mean']:>12.3f} ± {r['se']:<7.3f}  {r['mc_se']:>7.3f}  {r['bound']}"
        )
    lines.append(
        f"kind: stochastic lower bound on its target ({evidence} or a gap), or neither; "
        "log p̂ by multiple importance sampling over ½q + ½q*"
    )
    return "\n".join(lines)


__all__ = [
    "BOUNDS",
    "ESTIMATORS",
    "GAPS",
    "LABELS",
    "MEANINGS",
    "describe",
    "format_gap_table",
    "gap_decomposition",
    "gap_table",
    "mixture_estimates",
]


# --------------------------------------------------------------------------------------------
# the estimator interface (ppl_vae.inference.estimators): "mis"


def fit_and_decompose(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    mean_field_options: Optional[Dict[str, Any]] = None,
    datapoint: Optional[Sequence[int] | np.ndarray] = None,
    progress: bool = False,
    **kwargs: Any,
) -> xr.Dataset:
    """q* fitted by mean-field VI (``mean_field_options``), then :func:`gap_decomposition`, from
    the caller's random stream: one number is drawn first and seeds the decomposition's draws,
    so a fit that takes a step more or less (as rounding under another thread count can cause)
    changes q* but not the draws. ``compare``'s blocks and the ``"mis"`` estimator both call it."""
    check_mean_field_options(dict(mean_field_options or {}))  # an unknown key would reach the model
    draw_seed = int(torch.randint(0, 2**62, (), device="cpu"))
    with eval_mode(model, guide):
        mean_field = fit_mean_field(model, guide, x, **{"progress": progress, **(mean_field_options or {})}, **kwargs)
    return gap_decomposition(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        mean_field=mean_field,
        datapoint=datapoint,
        progress=False,
        seed=draw_seed,
        **kwargs,
    )


def as_estimate(gaps: xr.Dataset) -> Estimate:
    """A gap decomposition as an :class:`~ppl_vae.inference.estimators.Estimate`: ``log_px`` the
    MIS estimate, the other estimates, the gaps and their standard errors as variables, the
    ESS, k̂ and convergence of q* as diagnostics."""
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    variables = {}
    for q in ESTIMATORS[1:]:
        variables[q] = variable(
            as_t(gaps["estimate"].sel(estimator=q).values), BOUNDS[q], f"{LABELS[q]}: {MEANINGS[q]}"
        )
        variables[f"{q}_stderr"] = variable(
            as_t(gaps["stderr"].sel(estimator=q).values), "neither", f"Monte Carlo standard error of {q} (nats)"
        )
    for q in GAPS:
        variables[q] = variable(as_t(gaps[q].values), BOUNDS[q], f"{LABELS[q]}: {gaps[q].attrs['meaning']}")
        variables[f"{q}_stderr"] = variable(
            as_t(gaps[f"{q}_stderr"].values), "neither", gaps[f"{q}_stderr"].attrs["long_name"]
        )
    for name in gaps.data_vars:
        if gaps[name].dims == ("datapoint",) and name not in variables:
            variables[str(name)] = diagnostic(as_t(gaps[name].values), gaps[name].attrs.get("long_name", str(name)))
    # the counts over datapoints are the meanfield_converged variable's (a block's count would not join)
    settings = {
        k: v
        for k, v in gaps.attrs.items()
        if not k.startswith(("estimate_", "meanfield_num_", "meanfield_max_")) and k != "reference"
    }
    return Estimate(
        "mis",
        as_t(gaps["estimate"].sel(estimator="log_px").values),
        as_t(gaps["stderr"].sel(estimator="log_px").values),
        BOUNDS["log_px"],
        f"{LABELS['log_px']}: {MEANINGS['log_px']}",
        variables,
        settings=settings,
        reference=str(gaps.attrs.get("reference", "")),
    )


def mis_warnings(ds: xr.Dataset, names: Dict[str, str]) -> List[str]:
    """Plain-language warnings for weak estimates of a gap decomposition (or a ``"mis"``
    estimate's dataset: the same variable names), each with what to do; ``names`` spell the
    options as the calling command does."""
    n = ds.sizes["datapoint"]
    k = int(ds.attrs["num_samples"])
    out = []
    not_converged = int((~ds["meanfield_converged"].values.astype(bool)).sum())
    if not_converged:
        out.append(
            f"Mean-field VI did not converge for {not_converged} of {n} datapoints: their L[q*] is below the best "
            "diagonal Gaussian's, which understates the amortization gap and overstates the approximation gap. "
            f"Raise {names['mean_field_steps']} or try init='prior'."
        )
    low = int(THRESHOLDS.low_ess(ds["ess_mixture"].values, 2 * k).sum())
    if low:
        out.append(
            f"Low effective sample size: for {low} of {n} datapoints the mixture weights' ESS is below "
            f"{min(THRESHOLDS.min_ess, k):g} of the 2K = {2 * k} draws, so log p̂ there rests on a few draws and may sit "
            f"well below log p(x). Raise {names['num_samples']}, or use {names['estimator']}."
        )
    if "khat_mixture" in ds:
        high = int((ds["khat_mixture"].values > THRESHOLDS.khat).sum())
        if high:
            out.append(
                f"Heavy-tailed importance weights: PSIS k̂ > {THRESHOLDS.khat} for {high} of {n} datapoints, so "
                "their log p̂ and its standard error are unreliable (Vehtari et al. 2024). A better proposal "
                f"(a flow guide) or {names['estimator']} gives trustworthy numbers there."
            )
    for who, label in (("amortized", "q"), ("meanfield", "q*")):
        name = f"khat_{who}"
        high = int((ds[name].values > THRESHOLDS.khat).sum()) if name in ds else 0
        if high:
            out.append(
                f"IW with {label} alone has heavy-tailed weights (PSIS k̂ > {THRESHOLDS.khat}) for {high} of {n} "
                f"datapoints: its log p̂ may sit far below log p(x) with a standard error that understates it; "
                f"where the mixture's k̂ is at most {THRESHOLDS.khat}, its log p̂ (MIS) is the estimate to read."
            )
    family = str(ds.attrs.get("guide_family", MEAN_FIELD_FAMILY))
    if family != MEAN_FIELD_FAMILY:
        out.append(
            f"The amortized guide is {family}. q* is the best diagonal Gaussian, a smaller family than q's, so "
            "L[q*] − L[q] mixes the amortization gap with the difference between the families (it may be "
            "negative), and log p̂ − L[q*] is the diagonal Gaussian's approximation gap, not that of q's family. "
            "log p̂, L[q] and L[q*] themselves are unaffected."
        )
    if n < THRESHOLDS.min_datapoints:
        out.append(
            f"Only {n} datapoints: the means over datapoints have wide standard errors (se column); "
            f"use more datapoints ({names.get('num_datapoints', '--num-datapoints')}) before comparing runs."
        )
    return out


MIS_NAMES = {
    "mean_field_steps": "mean_field_options max_steps / polish_steps (CLI --mf-steps, --mf-polish-steps)",
    "estimator": "AIS (ppl-vae evaluate RUN --estimator ais)",
}
"""How the ``"mis"`` warnings name what to change, unless the command says otherwise."""


def mean_field_batch(options: Dict[str, Any]) -> int:
    """Datapoints per block for an estimator that fits q*: mean-field VI's own batch (its
    stopping rule looks at the batch's mean ELBO, so a block must be a whole batch)."""
    return int((options.get("mean_field_options") or {}).get("batch_size", 500))


@register_estimator(
    "mis",
    title="multiple importance sampling over ½q + ½q*, q* fitted per datapoint by mean-field VI; "
    "with L[q], L[q*] and the gap decomposition",
    bound="lower bound",
    reference="Cremer, Li & Duvenaud (2018); Veach & Guibas (1995)",
    warnings=lambda ds, names: mis_warnings(ds, {**MIS_NAMES, **names}),
    block_size=mean_field_batch,
)
def mis(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    mean_field_options: Optional[Dict[str, Any]] = None,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    """log p̂(x) by multiple importance sampling with K draws of q and K of q* (the balance
    heuristic), with the IW estimates of each, L[q], L[q*] and the gaps from the same draws
    (:func:`fit_and_decompose`)."""
    with seeded(seed, x.device):
        gaps = fit_and_decompose(
            model,
            guide,
            x,
            num_samples=num_samples,
            batch_size=batch_size,
            particle_batch_size=particle_batch_size,
            mean_field_options=mean_field_options,
            progress=progress,
            **kwargs,
        )
    return as_estimate(gaps)
