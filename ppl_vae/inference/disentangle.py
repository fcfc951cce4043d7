"""Disentangling objectives for parts-based VAEs: beta-VAE, capacity control, beta-TC-VAE, free bits.

Each is a training objective of the "svi" method (``TrainConfig.objective``) for a VAE whose
model and guide are the base class's (encoder -> (loc, scale), decoder, prior, likelihood), so
every prior and likelihood works. With z ~ q(z|x) reparameterized, per datapoint,
``log_lik`` = log p(x|z) and ``kl`` = KL(q(z|x) || p(z)) (closed form with ``elbo="mean_field"``
where torch knows it, else the single-sample estimate log q(z|x) - log p(z)):

- ``beta_vae`` (Higgins et al. 2017): log_lik - beta kl. beta = 1 is the ELBO.
- ``capacity`` (Burgess et al. 2018, eq. 8): log_lik - gamma |mean kl - C|, the capacity C rising
  linearly from 0 to ``capacity_max`` nats between two epochs (counted in optimizer steps, so a
  resumed run follows the same schedule).
- ``beta_tc`` (Chen et al. 2018, eq. 2 and 4): log q(z|x) - log p(z) split into the index-code
  mutual information log q(z|x) - log q(z), the total correlation log q(z) - sum_j log q(z_j) and
  the dimension-wise KL sum_j log q(z_j) - log p(z); log q(z) and log q(z_j) are estimated from
  the minibatch (:func:`tc_decomposition`), weighted by alpha, beta, gamma. The dimension-wise
  term is sum_j KL(q(z_j) || p(z_j)) for a factorized prior; for any other prior it is still
  E[log prod_j q(z_j) - log p(z)], so the split holds for every prior.
- ``free_bits`` (Kingma et al. 2016, appendix C.8): log_lik - sum_g max(lambda, mean kl_g), the
  minibatch-mean KL of each group g of latent dimensions floored at lambda nats (one group per
  dimension by default). A floor of 0 is no floor (a KL is never negative), so the objective is
  then the ELBO.

KL warm-up (``kl_weight``) multiplies the whole latent penalty. Every loss is a minibatch sum
scaled to ``num_data`` datapoints, as the ELBO's, and the stepper records the epoch means of
its terms in the history (``kl``, ``reconstruction``; ``mutual_info``, ``total_correlation``,
``dimwise_kl`` for beta-TC; ``capacity`` for the capacity objective).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch
from pyro import distributions as dist
from torch import Tensor
from torch.distributions import kl_divergence

from ppl_vae.config import TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.training import KL_FIELDS, OBJECTIVES, TERM_VARS, Stepper
from ppl_vae.models.densities import normal_log_prob
from ppl_vae.models.vae import VAE

__all__ = [
    "ObjectiveStepper",
    "TC_ESTIMATORS",
    "beta_tc_loss",
    "beta_vae_loss",
    "capacity_at",
    "capacity_loss",
    "free_bits_loss",
    "latent_terms",
    "tc_decomposition",
]

TERM_VARS.update(
    {
        "kl": "KL(q(z|x) || p(z)) per datapoint, nats, epoch mean over minibatches (closed form with "
        "elbo mean_field where known, else log q(z|x) - log p(z) at z ~ q)",
        "reconstruction": "log p(x|z) at z ~ q(z|x) per datapoint, nats, epoch mean over minibatches",
        "mutual_info": "beta-TC: index-code mutual information E[log q(z|x) - log q(z)], nats, minibatch estimate",
        "total_correlation": "beta-TC: total correlation E[log q(z) - sum_j log q(z_j)], nats, minibatch estimate",
        "dimwise_kl": "beta-TC: dimension-wise KL E[sum_j log q(z_j) - log p(z)], nats, minibatch estimate",
        "capacity": "capacity-controlled beta-VAE: the target KL C at the epoch's last step, nats",
    }
)

TC_ESTIMATORS = {
    "mws": "minibatch-weighted sampling, Chen et al. (2018) eq. S5 and their code: log q(z_i) ~ "
    "logsumexp_j log q(z_i|x_j) - log(N M), i.e. log N below the minibatch average (1/M) sum_j "
    "q(z_i|x_j); so the terms carry constant offsets (MI +log N, TC +(D-1) log N, dimension-wise "
    "-D log N) that cancel in their sum and leave gradients alone",
    "mss": "minibatch-stratified sampling, Chen et al. (2018) eq. S6: importance weights 1/N for the "
    "point's own q(z|x_i), (N-M+1)/(N(M-1)) for one other and 1/(M-1) for the rest; no offsets",
}


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _draw(loc: Tensor, scale: Tensor, num_particles: int) -> Tensor:
    """z ~ N(loc, scale), ``(K, N, D)``, or ``(N, D)`` for K = 1: the same RNG call as the fused ELBO."""
    return dist.Normal(loc, scale).rsample((num_particles,) if num_particles > 1 else ())


def latent_terms(
    vae: VAE, x: Tensor, *, num_particles: int = 1, analytic_kl: bool = False, per_dimension: bool = False
) -> Dict[str, Tensor]:
    """Per-datapoint pieces of the ELBO of the minibatch ``x`` (``(N,)`` each, means over particles).

    ``log_lik``: log p(x|z); ``kl``: KL(q(z|x)||p(z)), closed form when ``analytic_kl`` and torch
    knows it, else log q(z|x) - log p(z) at the same z. With ``per_dimension``, ``kl_dims``
    ``(N, D)`` splits the KL over latent dimensions; that needs a prior with independent
    dimensions (a diagonal Normal). Also returned: ``z`` ``(K, N, D)``, ``loc``, ``scale``,
    ``log_q`` and ``log_prior`` ``(K, N)`` for the estimators built on them.
    """
    if not vae.encoder_is_guide:  # any guide of the fast-path protocol (a flow, a chain of Gaussians)
        return _guide_terms(vae, x, num_particles=num_particles, per_dimension=per_dimension)
    loc, scale = vae.encoder(x)
    z = _draw(loc, scale, num_particles)
    zk = z if num_particles > 1 else z.unsqueeze(0)
    log_lik = vae.log_likelihood(x, {"z": z})
    log_lik = log_lik if num_particles > 1 else log_lik.unsqueeze(0)
    log_q_dims = normal_log_prob(zk, loc, scale)
    log_q = log_q_dims.sum(-1)
    prior = vae.prior()
    log_prior = vae.log_prior(x, {"z": zk})
    out = {"z": zk, "loc": loc, "scale": scale, "log_q": log_q, "log_prior": log_prior, "log_lik": log_lik.mean(0)}
    marginal = _prior_marginals(prior) if per_dimension else None
    if per_dimension and marginal is None:
        raise ValueError(
            f"a KL per latent dimension needs a prior with independent dimensions (a diagonal "
            f"Normal); {type(vae.prior).__name__} is not: use one group (free_bits_groups=1)"
        )
    kl_dims = None
    if analytic_kl:
        if marginal is not None:
            kl_dims = kl_divergence(dist.Normal(loc, scale), marginal)
            kl = kl_dims.sum(-1)
        else:
            try:
                kl = kl_divergence(dist.Normal(loc, scale).to_event(1), prior)
            except NotImplementedError:
                kl = (log_q - log_prior).mean(0)
    else:
        kl = (log_q - log_prior).mean(0)
        if marginal is not None:
            kl_dims = (log_q_dims - marginal.log_prob(zk)).mean(0)
    out["kl"] = kl
    if kl_dims is not None:
        out["kl_dims"] = kl_dims
    return out


def _guide_terms(vae: VAE, x: Tensor, *, num_particles: int, per_dimension: bool) -> Dict[str, Tensor]:
    """:func:`latent_terms` for a guide that is not the encoder's Gaussian, through the fast-path
    protocol (``sample_guide``, ``log_prior``, ``log_likelihood``): every latent site's terms, so
    a flow's parameters and every layer of a hierarchy get their gradient. The KL is the Monte
    Carlo estimate log q(z|x) - log p(z) (no closed form for such a q)."""
    if per_dimension:
        raise ValueError(
            f"a KL per latent dimension needs the encoder's Gaussian guide; {type(vae).__name__}'s guide is "
            "not: use one group (free_bits_groups=1)"
        )
    latents, log_q = vae.sample_guide(x, num_particles if num_particles > 1 else None)
    log_lik = vae.log_likelihood(x, latents)
    log_prior = vae.log_prior(x, latents)
    if num_particles == 1:
        log_q, log_prior, log_lik = log_q.unsqueeze(0), log_prior.unsqueeze(0), log_lik.unsqueeze(0)
    return {"log_q": log_q, "log_prior": log_prior, "log_lik": log_lik.mean(0), "kl": (log_q - log_prior).mean(0)}


def _prior_marginals(prior: torch.distributions.Distribution) -> Optional[dist.Normal]:
    """The prior's per-dimension Normal, when it is a diagonal Normal (an Independent Normal)."""
    if not isinstance(prior, torch.distributions.Independent):
        return None
    base = prior.base_dist
    if isinstance(base, torch.distributions.Normal) and prior.reinterpreted_batch_ndims == 1:
        return dist.Normal(base.loc, base.scale)
    return None


def _scaled(per_datapoint: Tensor, num_data: Optional[int]) -> Tensor:
    n = per_datapoint.shape[-1]
    return per_datapoint.sum() * ((num_data or n) / n)


def beta_vae_loss(
    vae: VAE,
    x: Tensor,
    *,
    beta: float = 1.0,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    analytic_kl: bool = False,
) -> tuple[Tensor, Dict[str, Tensor]]:
    """-(log p(x|z) - beta KL), summed and scaled to ``num_data`` (Higgins et al. 2017); and the terms."""
    _positive("beta", beta)
    t = latent_terms(vae, x, num_particles=num_particles, analytic_kl=analytic_kl)
    return -_scaled(t["log_lik"] - beta * kl_weight * t["kl"], num_data), t


def capacity_at(step: int, steps_per_epoch: int, *, capacity_max: float, start_epoch: float, end_epoch: float) -> float:
    """The capacity C after ``step`` optimizer steps: 0 until ``start_epoch``, rising linearly to
    ``capacity_max`` at ``end_epoch``, then constant (Burgess et al. 2018)."""
    start, end = start_epoch * steps_per_epoch, end_epoch * steps_per_epoch
    if step >= end:
        return float(capacity_max)
    if step <= start:
        return 0.0
    return float(capacity_max) * (step - start) / (end - start)


def capacity_loss(
    vae: VAE,
    x: Tensor,
    *,
    capacity: float,
    gamma: float = 1000.0,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    analytic_kl: bool = False,
) -> tuple[Tensor, Dict[str, Tensor]]:
    """-(log p(x|z) - gamma |KL - C|) per datapoint, the KL the minibatch mean (Burgess et al. 2018,
    eq. 8), summed and scaled to ``num_data``; and the terms."""
    _positive("gamma", gamma)
    _nonnegative("capacity", capacity)
    t = latent_terms(vae, x, num_particles=num_particles, analytic_kl=analytic_kl)
    penalty = gamma * kl_weight * (t["kl"].mean() - capacity).abs()
    return -_scaled(t["log_lik"] - penalty, num_data), t


def _log_stratified_weights(batch_size: int, num_data: int, device, dtype) -> Tensor:
    """log W ``(M, M)`` of minibatch-stratified sampling (Chen et al. 2018, eq. S6): row i weights
    q(z_i|x_j): 1/N for j = i, (N-M+1)/(N(M-1)) for j = i+1 (mod M), 1/(M-1) for the others, so
    each row sums to 1. (Their code's ``_log_importance_weight_matrix`` puts the second weight
    twice in row M-1 and not in row M; here every row has it once.)"""
    n, m = num_data, batch_size - 1
    w = torch.full((batch_size, batch_size), 1.0 / m, device=device, dtype=dtype)
    rows = torch.arange(batch_size, device=device)
    w[rows, (rows + 1) % batch_size] = (n - m) / (n * m)
    w[rows, rows] = 1.0 / n
    return w.log()


def tc_decomposition(
    z: Tensor, loc: Tensor, scale: Tensor, log_prior: Tensor, *, num_data: int, estimator: str = "mws"
) -> Dict[str, Tensor]:
    """Index-code MI, total correlation and dimension-wise KL per datapoint (Chen et al. 2018).

    ``z`` ``(K, M, D)`` draws from q(z|x_i) of the minibatch with ``loc``/``scale`` ``(M, D)``;
    ``log_prior`` ``(K, M)`` = log p(z). log q(z) and log q(z_j) are estimated from the
    minibatch's M components (``estimator``: one of :data:`TC_ESTIMATORS`); ``num_data`` is N,
    the size of the data set the minibatch comes from. Returns ``mutual_info``,
    ``total_correlation``, ``dimwise_kl`` (means over particles, ``(M,)``); they sum to the
    estimate log q(z|x) - log p(z) of the KL at the same z.
    """
    if estimator not in TC_ESTIMATORS:
        raise ValueError(f"tc_estimator must be one of {', '.join(TC_ESTIMATORS)}, got {estimator!r}")
    m = loc.shape[0]
    if estimator == "mss" and m < 2:
        raise ValueError("tc_estimator 'mss' needs minibatches of at least 2 points")
    # log q(z_i | x_j) per dimension, (K, M_i, M_j, D)
    log_qz_ij = normal_log_prob(z.unsqueeze(-2), loc, scale)
    log_q_cond = normal_log_prob(z, loc, scale).sum(-1)  # log q(z_i|x_i), (K, M)
    if estimator == "mws":
        log_norm = math.log(num_data * m)
        log_qz = torch.logsumexp(log_qz_ij.sum(-1), -1) - log_norm
        log_qz_marginals = (torch.logsumexp(log_qz_ij, -2) - log_norm).sum(-1)
    else:
        log_w = _log_stratified_weights(m, num_data, z.device, z.dtype)
        log_qz = torch.logsumexp(log_w + log_qz_ij.sum(-1), -1)
        log_qz_marginals = torch.logsumexp(log_w.unsqueeze(-1) + log_qz_ij, -2).sum(-1)
    return {
        "mutual_info": (log_q_cond - log_qz).mean(0),
        "total_correlation": (log_qz - log_qz_marginals).mean(0),
        "dimwise_kl": (log_qz_marginals - log_prior).mean(0),
    }


def beta_tc_loss(
    vae: VAE,
    x: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    estimator: str = "mws",
) -> tuple[Tensor, Dict[str, Tensor]]:
    """-(log p(x|z) - alpha MI - beta TC - gamma dimension-wise KL) (Chen et al. 2018, eq. 4),
    summed and scaled to ``num_data``; and the terms (``kl`` is their sum, the Monte Carlo KL)."""
    for name, value in (("tc_alpha", alpha), ("tc_beta", beta), ("tc_gamma", gamma)):
        _nonnegative(name, value)
    t = latent_terms(vae, x, num_particles=num_particles)
    n = num_data or x.shape[0]
    t.update(tc_decomposition(t["z"], t["loc"], t["scale"], t["log_prior"], num_data=n, estimator=estimator))
    penalty = alpha * t["mutual_info"] + beta * t["total_correlation"] + gamma * t["dimwise_kl"]
    return -_scaled(t["log_lik"] - kl_weight * penalty, num_data), t


def _groups(latent_dim: int, num_groups: Optional[int]) -> list[Tensor]:
    if num_groups is None:
        return [torch.tensor([d]) for d in range(latent_dim)]
    if not 1 <= num_groups <= latent_dim:
        raise ValueError(f"free_bits_groups must lie in 1..latent_dim ({latent_dim}) or be null, got {num_groups}")
    return list(torch.arange(latent_dim).tensor_split(num_groups))


def free_bits_loss(
    vae: VAE,
    x: Tensor,
    *,
    free_bits: float = 0.0,
    num_groups: Optional[int] = None,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    analytic_kl: bool = False,
) -> tuple[Tensor, Dict[str, Tensor]]:
    """-(log p(x|z) - sum_g max(lambda, mean KL_g)) (Kingma et al. 2016, appendix C.8), summed and
    scaled to ``num_data``; and the terms. ``num_groups`` None: one group per latent dimension
    (needs a diagonal Normal prior); else that many contiguous groups of dimensions."""
    _nonnegative("free_bits", free_bits)
    groups = _groups(vae.latent_dim, num_groups)
    per_dimension = num_groups is None or num_groups > 1
    t = latent_terms(vae, x, num_particles=num_particles, analytic_kl=analytic_kl, per_dimension=per_dimension)
    log_lik = t["log_lik"]
    if free_bits == 0:  # no floor: the ELBO
        return -_scaled(log_lik - kl_weight * t["kl"], num_data), t
    group_kl = [t["kl"] if not per_dimension else t["kl_dims"][:, g.to(x.device)].sum(-1) for g in groups]
    penalty = sum(torch.clamp(k.mean(), min=free_bits) for k in group_kl)
    n = x.shape[0]
    return -(log_lik.sum() - n * kl_weight * penalty) * ((num_data or n) / n), t


class ObjectiveStepper(Stepper):
    """A disentangling objective of method "svi" over all of the VAE's parameters, through the
    fast-path protocol (any guide it offers: the encoder's Gaussian, a flow, a hierarchy's chain);
    records the epoch means of the objective's terms. The step is :class:`Stepper`'s."""

    name: str = ""
    recorded: Tuple[str, ...] = ("kl", "reconstruction")
    compilable = True  # plain torch: no Pyro trace in the loss
    #: the training methods this objective composes with (it replaces their loss)
    methods: Tuple[str, ...] = ("svi",)
    uses = frozenset({"elbo", "num_particles"}) | KL_FIELDS
    #: the smallest minibatch the objective's estimator can use (beta-TC's q(z) needs 2 points)
    min_batch_size: int = 1

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        return frozenset({"fast_path", "one_kl_weight"})

    def __init__(self, vae: VAE, config: TrainConfig):
        self.num_particles = int(config.num_particles)
        self.analytic_kl = config.elbo == "mean_field"
        super().__init__(vae, config)


def _register(name: str, doc: str, check: Callable[[TrainConfig], None]):
    def wrap(cls):
        cls.name = name
        cls.label = f"objective {name!r}"
        cls.loss_meaning = (
            f"the objective {name!r} negated ({doc}); a bound on log p(x) only where its weights make it the ELBO"
        )
        cls.check_config = staticmethod(check)
        OBJECTIVES.register(name, doc=doc)(cls)
        return cls

    return wrap


def _field_check(*checks: tuple) -> Callable[[TrainConfig], None]:
    """A ``check_config`` that raises ConfigError naming the field (``train.beta``)."""

    def check(config: TrainConfig) -> None:
        for name, fn in checks:
            try:
                fn(name, getattr(config, name))
            except ValueError as exc:
                raise ConfigError(f"train.{exc}", field=f"train.{name}") from None

    return check


def _check_capacity(config: TrainConfig) -> None:
    _field_check(
        ("gamma", _positive),
        ("capacity_max", _nonnegative),
        ("capacity_start_epoch", _nonnegative),
        ("capacity_end_epoch", _nonnegative),
    )(config)
    if config.capacity_end_epoch < config.capacity_start_epoch:
        raise ConfigError(
            f"train.capacity_end_epoch ({config.capacity_end_epoch}) must not come before "
            f"train.capacity_start_epoch ({config.capacity_start_epoch}): the capacity schedule "
            "would end before it starts",
            field="train.capacity_end_epoch",
        )


def _check_tc(config: TrainConfig) -> None:
    _field_check(("tc_alpha", _nonnegative), ("tc_beta", _positive), ("tc_gamma", _nonnegative))(config)
    if config.tc_estimator not in TC_ESTIMATORS:
        raise ConfigError(
            f"train.tc_estimator must be one of {', '.join(TC_ESTIMATORS)}, got {config.tc_estimator!r}",
            field="train.tc_estimator",
        )
    if config.batch_size < 2:
        raise ConfigError(
            "train.batch_size must be >= 2 for objective 'beta_tc' (q(z) is estimated from the minibatch)",
            field="train.batch_size",
        )


def _check_free_bits(config: TrainConfig) -> None:
    _field_check(("free_bits", _nonnegative))(config)
    if config.free_bits == 0:  # no floor: the objective would train the ELBO under its own name
        raise ConfigError(
            "train.objective 'free_bits' needs a KL floor: train.free_bits is 0, which trains the ELBO; "
            "set train.free_bits > 0 (nats per latent dimension or group), or train the objective 'elbo'",
            field="train.free_bits",
        )
    if config.free_bits_groups is not None and config.free_bits_groups < 1:
        raise ConfigError(
            f"train.free_bits_groups must be >= 1 or null (one group per dimension), got {config.free_bits_groups}",
            field="train.free_bits_groups",
        )


@_register(
    "beta_vae", "beta-VAE: log p(x|z) - beta KL, constant beta (Higgins et al. 2017)", _field_check(("beta", _positive))
)
class BetaVAEStepper(ObjectiveStepper):
    data_parallel = True  # a sum of per-datapoint terms: the ranks' mean is the global batch's loss

    def loss(self, x, *, num_data, kl_weight=1.0, **kwargs):
        return beta_vae_loss(
            self.vae,
            x,
            beta=self.config.beta,
            num_data=num_data,
            kl_weight=kl_weight,
            num_particles=self.num_particles,
            analytic_kl=self.analytic_kl,
        )


@_register(
    "capacity",
    "capacity-controlled beta-VAE: log p(x|z) - gamma |KL - C|, C annealed linearly (Burgess et al. 2018)",
    _check_capacity,
)
class CapacityStepper(ObjectiveStepper):
    def capacity(self, step: int) -> float:
        c = self.config
        return capacity_at(
            step,
            self.steps_per_epoch,
            capacity_max=c.capacity_max,
            start_epoch=c.capacity_start_epoch,
            end_epoch=c.capacity_end_epoch,
        )

    def loss(self, x, *, num_data, kl_weight=1.0, **kwargs):
        return capacity_loss(
            self.vae,
            x,
            capacity=self.capacity(self.step_count + 1),
            gamma=self.config.gamma,
            num_data=num_data,
            kl_weight=kl_weight,
            num_particles=self.num_particles,
            analytic_kl=self.analytic_kl,
        )

    def extra_terms(self) -> Dict[str, float]:
        return {"capacity": self.capacity(self.step_count)}


@_register(
    "beta_tc",
    "beta-TC-VAE: MI, total correlation and dimension-wise KL weighted by tc_alpha, tc_beta, "
    "tc_gamma (Chen et al. 2018)",
    _check_tc,
)
class BetaTCStepper(ObjectiveStepper):
    recorded = ("kl", "reconstruction", "mutual_info", "total_correlation", "dimwise_kl")
    uses = frozenset({"num_particles"}) | KL_FIELDS
    min_batch_size = 2

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:  # q(z_j) from the encoder's loc and scale
        return super().requires(config) | {"encoder_guide"}

    def loss(self, x, *, num_data, kl_weight=1.0, **kwargs):
        c = self.config
        return beta_tc_loss(
            self.vae,
            x,
            alpha=c.tc_alpha,
            beta=c.tc_beta,
            gamma=c.tc_gamma,
            num_data=num_data,
            kl_weight=kl_weight,
            num_particles=self.num_particles,
            estimator=c.tc_estimator,
        )


@_register(
    "free_bits",
    "free bits: a KL floor of free_bits nats per latent dimension or group (Kingma et al. 2016)",
    _check_free_bits,
)
class FreeBitsStepper(ObjectiveStepper):
    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        if config.free_bits_groups == 1:
            return super().requires(config)
        return super().requires(config) | {"encoder_guide", "factorized_prior"}  # a KL per dimension

    def loss(self, x, *, num_data, kl_weight=1.0, **kwargs):
        return free_bits_loss(
            self.vae,
            x,
            free_bits=self.config.free_bits,
            num_groups=self.config.free_bits_groups,
            num_data=num_data,
            kl_weight=kl_weight,
            num_particles=self.num_particles,
            analytic_kl=self.analytic_kl,
        )
