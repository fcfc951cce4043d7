"""Multi-sample objectives computed per datapoint inside the ``"data"`` plate.

For K particles z_k ~ q(z|x) per datapoint, the log weights log w_k = log p(x, z_k) - log q(z_k|x)
come from :func:`ppl_vae.inference.traces.trace_pair` with a particle plate of size K to the left
of the data plate, so every estimator is per datapoint (Pyro's RenyiELBO instead treats the whole
minibatch as one latent variable). Each function returns a differentiable scalar loss whose
*value* is the negative bound summed over the minibatch and scaled to ``num_data`` datapoints,
and whose *gradient* is the method's estimator:

- :func:`iwae_loss`: IWAE, -log (1/K) sum_k w_k (Burda et al. 2015); K=1 is the ELBO.
- :func:`dreg_loss`: the same value; the guide gets the doubly reparameterized gradient
  sum_k w~_k^2 d log w_k / dz_k dz_k/dphi (Tucker et al. 2018, eq. 5), the model the IWAE gradient.
- :func:`stl_loss`: the K-sample ELBO with "sticking the landing" gradients: log q is evaluated
  with the guide's parameters detached, so the guide's gradient is the path derivative only
  (Roeder et al. 2017); it is exactly zero when q(z|x) = p(z|x).
- :func:`rws_loss`: reweighted wake-sleep's wake phases (Bornschein & Bengio 2015): the model
  ascends sum_k w~_k log p(x, z_k), the guide ascends sum_k w~_k log q(z_k|x), z_k not
  differentiated; the value reported is the IWAE bound.

(w~ are the self-normalized weights, treated as constants.) Each works for any model/guide pair
that keeps the contract, and each is registered as a training method (``iwae``, ``dreg``,
``stl``, ``rws``) with K = ``TrainConfig.num_particles``.

Detached guide parameters: for a guide site whose distribution is a Normal or MultivariateNormal
(optionally inside ``Independent``), log q is re-scored under a copy with detached parameters;
for any other distribution (normalizing flows, ...) the guide is run again with its parameters
detached (``torch.func.functional_call`` for a guide that is an ``nn.Module`` or a method of one,
and every ``pyro.param`` value detached) and replayed on the same draw of z.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, FrozenSet, Optional, Tuple, cast

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from ppl_vae.config import TrainConfig
from ppl_vae.inference.traces import PARTICLE_PLATE, LogProbs, log_probs, trace_pair
from ppl_vae.inference.training import KL_FIELDS, METHODS, Stepper

__all__ = [
    "dreg_loss",
    "iwae_bound",
    "iwae_loss",
    "detached_guide_log_prob",
    "rws_loss",
    "stl_loss",
]


def iwae_bound(log_weight: Tensor) -> Tensor:
    """log (1/K) sum_k w_k per datapoint from log weights ``(K, N)``; shape ``(N,)``."""
    return torch.logsumexp(log_weight, 0) - math.log(log_weight.shape[0])


class _DetachLatents(Messenger):
    """Draw every latent sample site without a gradient path (z ~ q treated as data).

    Entered *outside* the particle plate so the draw has the plates' full batch shape; replayed
    and observed sites are left alone.
    """

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["done"] or msg["value"] is not None or site_is_subsample(msg):
            return
        msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"]).detach()
        msg["done"] = True


class _DetachParams(Messenger):
    """Every ``pyro.param`` value is returned detached."""

    def _pyro_post_param(self, msg) -> None:
        msg["value"] = msg["value"].detach()


def _check(num_particles: int, num_data: Optional[int], x: Tensor) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    if num_data is not None and num_data < x.shape[0]:
        raise ValueError(f"num_data must be >= the minibatch size {x.shape[0]}, got {num_data}")


def _weights(
    model: Callable,
    guide: Callable,
    x: Tensor,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    kl_weight: float,
    *,
    detach_latents: bool = False,
) -> Tuple[poutine.Trace, poutine.Trace, LogProbs]:
    """Traces and per-datapoint log densities ``(K, N)``; ``kl_weight`` scales log p(z) - log q(z)."""
    if kl_weight != 1.0:
        kwargs = dict(kwargs, kl_weight=kl_weight)
    with _DetachLatents() if detach_latents else nullcontext():
        model_trace, guide_trace = trace_pair(model, guide, x, *args, num_particles=num_particles, **kwargs)
    return model_trace, guide_trace, log_probs(model_trace, guide_trace, (num_particles, x.shape[0]))


def _latent_sites(trace: poutine.Trace):
    return [
        s for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]


def _detached_distribution(fn: Any) -> Optional[dist.Distribution]:
    """A copy of ``fn`` with detached parameters, for the families where that is simple; else None."""
    if isinstance(fn, torch.distributions.Independent):
        base = _detached_distribution(fn.base_dist)
        return None if base is None else dist.Independent(base, fn.reinterpreted_batch_ndims)
    if type(fn) in (dist.Normal, torch.distributions.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach())
    if type(fn) in (dist.MultivariateNormal, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    return None


class _Call(nn.Module):
    """Lets ``functional_call`` swap the parameters of ``owner`` while ``fn`` runs."""

    def __init__(self, owner: nn.Module, fn: Callable):
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _module_of(guide: Callable) -> Optional[nn.Module]:
    if isinstance(guide, nn.Module):
        return guide
    owner = getattr(guide, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def detached_guide_log_prob(
    guide: Callable, guide_trace: poutine.Trace, x: Tensor, *args: Any, num_particles: int, **kwargs: Any
) -> Tensor:
    """log q(z|x) of the trace's draws with the guide's parameters detached, shape ``(K, N)``.

    The draws keep their own gradient path (reparameterization), so the result differentiates
    with respect to the guide's parameters only through z: the "path derivative" of Roeder et
    al. (2017) and Tucker et al. (2018). Site scales (a KL weight) are applied as in the trace.
    """
    shape = (num_particles, x.shape[0])
    sites = _latent_sites(guide_trace)
    detached = [_detached_distribution(s["fn"]) for s in sites]
    if any(d is None for d in detached):  # e.g. a flow: run the guide again with detached parameters
        owner = _module_of(guide)
        run = poutine.trace(poutine.replay(_DetachParams()(guide), trace=guide_trace)).get_trace
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-2):
            if owner is None:
                rerun = run(x, *args, **kwargs)
            else:
                params = {f"owner.{k}": v.detach() for k, v in owner.named_parameters()}
                rerun = torch.func.functional_call(_Call(owner, run), params, (x, *args), kwargs)
        detached = [cast(dist.Distribution, rerun.nodes[s["name"]]["fn"]) for s in sites]
    total = x.new_zeros(shape)
    for site, fn in zip(sites, detached):
        assert fn is not None  # every None was replaced by the rerun above
        lp = scale_and_mask(fn.log_prob(site["value"]), site["scale"], site["mask"])
        total = total + lp.expand(shape)
    return total


def _scaled(per_datapoint: Tensor, num_data: Optional[int]) -> Tensor:
    """Sum over the minibatch, scaled to ``num_data`` datapoints (AEVB eq. 8)."""
    n = per_datapoint.shape[-1]
    return per_datapoint.sum() * ((num_data or n) / n)


def _with_value(surrogate: Tensor, value: Tensor) -> Tensor:
    """``surrogate``'s gradient with ``value``'s value."""
    return surrogate - surrogate.detach() + value.detach()


def iwae_loss(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int = 5,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    **kwargs: Any,
) -> Tensor:
    """Negative IWAE bound -sum_i log (1/K) sum_k w_ik (Burda et al. 2015), scaled to ``num_data``.

    Gradient: the IWAE estimator (reparameterized through z, score term of log q included).
    """
    _check(num_particles, num_data, x)
    _, _, lp = _weights(model, guide, x, args, kwargs, num_particles, kl_weight)
    return -_scaled(iwae_bound(lp.log_weight), num_data)


def dreg_loss(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int = 5,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    **kwargs: Any,
) -> Tensor:
    """The IWAE loss with doubly reparameterized guide gradients (Tucker et al. 2018).

    Value: as :func:`iwae_loss`. Gradient for the model's parameters: IWAE's,
    sum_k w~_k grad log p(x, z_k). For the guide's: sum_k w~_k^2 (d log w_k / d z_k)(dz_k / dphi),
    with log w evaluated under detached guide parameters; unbiased for IWAE's gradient and of
    lower variance. Needs a reparameterizable guide.
    """
    _check(num_particles, num_data, x)
    _, guide_trace, lp = _weights(model, guide, x, args, kwargs, num_particles, kl_weight)
    zs = [s["value"] for s in _latent_sites(guide_trace)]
    if not all(z.requires_grad for z in zs):
        raise ValueError("dreg_loss needs a reparameterized guide (its draws of z carry no gradient)")
    if kl_weight != 1.0:
        kwargs = dict(kwargs, kl_weight=kl_weight)
    log_w = lp.log_joint - detached_guide_log_prob(guide, guide_trace, x, *args, num_particles=num_particles, **kwargs)
    bound = iwae_bound(log_w)  # model gradient: IWAE's; guide gradient through z: IWAE-STL's
    w = torch.softmax(log_w.detach(), 0)
    dreg = (w**2 * log_w).sum(0)  # guide gradient through z: DReG's
    # Swap the guide's path gradient: add (d dreg/dz - d bound/dz) . z, which only reaches phi.
    correction = torch.autograd.grad((dreg - bound).sum(), zs, retain_graph=True)
    swap = sum((g.detach() * z).sum() for g, z in zip(correction, zs))
    total = bound.sum() + swap
    n = x.shape[0]
    return -_with_value(total, bound.sum()) * ((num_data or n) / n)


def stl_loss(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int = 1,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    **kwargs: Any,
) -> Tensor:
    """Negative K-sample ELBO with sticking-the-landing gradients (Roeder et al. 2017).

    log q(z_k|x) is evaluated with the guide's parameters detached, so the guide's gradient is
    the path derivative mean_k (d log w_k / d z_k)(dz_k / dphi): unbiased for the ELBO's gradient
    and exactly zero when the guide equals the posterior. Needs a reparameterizable guide.
    """
    _check(num_particles, num_data, x)
    _, guide_trace, lp = _weights(model, guide, x, args, kwargs, num_particles, kl_weight)
    if not all(s["value"].requires_grad for s in _latent_sites(guide_trace)):
        raise ValueError("stl_loss needs a reparameterized guide (its draws of z carry no gradient)")
    if kl_weight != 1.0:
        kwargs = dict(kwargs, kl_weight=kl_weight)
    log_w = lp.log_joint - detached_guide_log_prob(guide, guide_trace, x, *args, num_particles=num_particles, **kwargs)
    return -_scaled(log_w.mean(0), num_data)


def rws_loss(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int = 5,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    **kwargs: Any,
) -> Tensor:
    """Reweighted wake-sleep, wake-theta and wake-phi phases (Bornschein & Bengio 2015).

    With z_k ~ q(z|x) not differentiated and w~ the self-normalized weights (constants), the
    model's gradient ascends sum_k w~_k log p(x, z_k) (the IWAE gradient for theta) and the
    guide's ascends sum_k w~_k log q(z_k|x) (a self-normalized estimate of -grad KL(p(z|x) || q)).
    The two surrogates share no parameters, so one optimizer step over both is both phases.
    Value: the negative IWAE bound, scaled to ``num_data``. Works for non-reparameterizable guides.
    """
    _check(num_particles, num_data, x)
    _, _, lp = _weights(model, guide, x, args, kwargs, num_particles, kl_weight, detach_latents=True)
    log_w = lp.log_weight
    w = torch.softmax(log_w.detach(), 0)
    surrogate = (w * (lp.log_joint + lp.log_guide)).sum(0)
    return -_with_value(_scaled(surrogate, num_data), _scaled(iwae_bound(log_w), num_data))


class MultiSampleStepper(Stepper):
    """A multi-sample objective as a training method, over all of the VAE's parameters.

    K is ``config.num_particles``. The model and guide go through Pyro (not the fused ELBO path),
    so any VAE that keeps the contract works, flow guides included. ``kl_weight`` (KL warm-up)
    scales log p(z) - log q(z|x) inside each log weight. The step is :class:`Stepper`'s.
    """

    name: str = ""
    objective: Callable[..., Tensor]
    #: needs every latent site reparameterized (the guide's draws carry the gradient)
    reparameterized: bool = True
    uses = frozenset({"num_particles"}) | KL_FIELDS

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        return frozenset({"reparameterized"}) if cls.reparameterized else frozenset()

    @property
    def optimizer_name(self) -> str:  # type: ignore[override]
        return self.name

    def __init__(self, vae: nn.Module, config: TrainConfig):
        self.num_particles = int(config.num_particles)
        super().__init__(cast(Any, vae), config)

    def loss(self, x: Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs: Any) -> Tensor:
        return type(self).objective(
            self.vae.model,
            self.vae.guide,
            x,
            num_particles=self.num_particles,
            num_data=num_data,
            kl_weight=kl_weight,
            **kwargs,
        )


def _register(name: str, objective: Callable[..., Tensor], doc: str, **declared: Any) -> type:
    cls = type(
        f"{name.upper()}Stepper",
        (MultiSampleStepper,),
        {"name": name, "label": f"method {name!r}", "objective": staticmethod(objective), "__doc__": doc, **declared},
    )
    METHODS.register(name, doc=doc)(cls)
    return cls


IW_LOSS = "the negative IW bound with K = num_particles draws (its KL weight inside each log weight)"
IWAEStepper = _register(
    "iwae",
    iwae_loss,
    "IWAE, K = num_particles per datapoint (Burda et al. 2015)",
    data_parallel=True,
    loss_meaning=IW_LOSS,
)
# DReG's gradient surgery (torch.autograd.grad inside the loss) has not been verified under DDP.
DReGStepper = _register(
    "dreg", dreg_loss, "IWAE with doubly reparameterized guide gradients (Tucker et al. 2018)", loss_meaning=IW_LOSS
)
STLStepper = _register(
    "stl",
    stl_loss,
    "K-sample ELBO with sticking-the-landing gradients (Roeder et al. 2017)",
    data_parallel=True,
    loss_meaning="the negative ELBO averaged over K = num_particles draws, with its KL weight",
)
RWSStepper = _register(
    "rws",
    rws_loss,
    "reweighted wake-sleep, wake phases, K = num_particles (Bornschein & Bengio 2015)",
    reparameterized=False,
    data_parallel=True,
    loss_meaning=IW_LOSS + ", the wake phases' value",
)
