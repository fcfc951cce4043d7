"""VAEs with a categorical latent site summed out by enumeration: semi-supervised M2 and the GMVAE.

- ``m2`` (Kingma, Rezende, Mohamed & Welling 2014, "Semi-supervised learning with deep generative
  models", sec. 3.1.2): p(y) uniform over C classes, p(z) = N(0, I), p(x | y, z);
  q(y | x) (a classifier) and q(z | x, y).
- ``gmvae`` (a Gaussian-mixture VAE, e.g. Dilokthanakul et al. 2016, simplified): a mixture
  component c ~ Cat(pi), z | c ~ N(mu_c, diag sigma_c^2), p(x | z); q(c | x) q(z | x, c).
- ``relaxed_gmvae``: the same model with c a Concrete / Gumbel-softmax relaxation of the
  one-hot component (Maddison et al. 2017; Jang et al. 2017) at a temperature that anneals
  during training; :meth:`GaussianMixtureVAE.exact_discrete` scores its parameters under the
  exact (enumerated) discrete model.

The discrete site (``"y"`` for M2, ``"c"`` for the GMVAE) is sampled in the ``"data"`` plate
of both model and guide and marked ``infer={"enumerate": "parallel"}``: Pyro's
``TraceEnum_ELBO`` sums it out exactly (guide-side enumeration, as in Pyro's
``examples/vae/ss_vae_M2.py``), and the estimators of :mod:`ppl_vae.inference.latents` sum it
out where the guide leaves it to the model.

**Labels (M2).** ``y`` is an integer tensor ``(N,)``; :data:`UNLABELLED` (-1) marks a point
whose label is unknown (``y=None``: every point unlabelled). A labelled point observes y:
its q(y | x) is the point mass at its label, so its ELBO is the paper's -L(x, y), a bound
on log p(x, y); an unlabelled point's ELBO sums over classes, the paper's -U(x), a bound on
log p(x). In training mode the model adds the classifier term (alpha / N_l) log q(y | x) of
each labelled point (the paper's alpha = 0.1 N, spread over the N_l labelled points); in eval
mode (every estimator) it does not, so ELBO and IW estimate the model's own densities.

**Clamping.** ``model`` and ``guide`` take ``component`` (an integer tensor ``(N,)``, or
None) to fix the discrete site: the guide then puts its mass there, so IW with
``component=c`` estimates log p(x, c); :func:`ppl_vae.inference.enumerated.enumerated_estimate`
sums these over c for log p(x) with the discrete site summed out exactly.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple, Union, cast

import pyro
import torch
import torch.nn.functional as F
from pyro import distributions as dist
from pyro import poutine
from torch import Tensor, nn
from torch.distributions.utils import _standard_normal

from ppl_vae.models.cvae import ConditionalDecoder, ConditionalGaussianEncoder
from ppl_vae.models.densities import normal_log_prob
from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.networks import MLPDecoder, mlp
from ppl_vae.models.priors import MixtureOfGaussiansPrior, Prior, StandardNormalPrior
from ppl_vae.models.vae import VAE, data_plate, declaration_covers
from ppl_vae.models.zoo import MODELS, ModelSpec, NonNegativeFloat, PositiveFloat, PositiveInt

UNLABELLED = -1
"""The label value of a point whose label is unknown."""

#: Logit of the values a clamped site cannot take: exp() of it is exactly 0 in float32 and
#: float64 (so enumerated sums give those values no weight), while it stays finite (so 0 * cost
#: is 0, not NaN, where Pyro weights each enumerated value's cost by its probability).
MASKED_LOGIT = -1.0e6


class ClassifierMLP(nn.Module):
    """x ``(..., *event_shape)`` -> logits ``(..., num_classes)`` of q(y | x) (normalized)."""

    def __init__(
        self,
        event_shape: Sequence[int],
        num_classes: int,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "relu",
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.net = mlp([math.prod(self.event_shape), *hidden_dims, num_classes], activation)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(*x.shape[: x.dim() - len(self.event_shape)], -1)
        return torch.log_softmax(self.net(h), -1)


def clamp_logits(logits: Tensor, values: Optional[Tensor]) -> Tensor:
    """``logits`` ``(N, C)`` with rows where ``values`` ``(N,)`` is >= 0 replaced by a point mass
    at that value (log-probability 0 there, :data:`MASKED_LOGIT` elsewhere)."""
    if values is None:
        return logits
    clamped = values >= 0
    point = torch.where(
        F.one_hot(values.clamp_min(0), logits.shape[-1]).bool(), logits.new_zeros(()), logits.new_full((), MASKED_LOGIT)
    )
    return torch.where(clamped.unsqueeze(-1), point, logits)


#: what :meth:`EnumeratedCategoricalVAE.enumerated_elbo` and the Pyro program must agree on:
#: overriding one without re-declaring ``has_enumerated_fast_path`` drops the batched ELBO
ENUMERATED_FAST_PATH_MEMBERS = (
    "model",
    "guide",
    "value_logits",
    "clamped_values",
    "value_prior",
    "value_log_prior",
    "guide_value_dist",
    "sample_value",
    "z_prior",
    "z_log_prior",
    "decoder_params",
    "extra_model_terms",
    "extra_terms",
    "enumerated_elbo",
)


class EnumeratedCategoricalVAE(VAE):
    """Base of the VAEs with one categorical latent site ``self.site`` over ``num_values`` values
    and a continuous site ``"z"`` whose guide q(z | x, value) depends on it (see the module
    docstring). Subclasses give the prior of z given the value and the decoder's inputs."""

    has_fast_path = False  # the model sums a discrete site: analysis goes through Pyro's traces
    encoder_is_guide = False  # q(z | x) is a mixture over values, not the encoder's one Gaussian
    site: str = "c"

    has_enumerated_fast_path: bool = False
    """Declares :meth:`enumerated_elbo`: the ELBO with the discrete site summed out, computed as
    one batched tensor computation over its values, equal to ``TraceEnum_ELBO`` on ``model`` and
    ``guide`` at the same random state (the training step then skips Pyro's tracing). As with
    :attr:`~ppl_vae.models.vae.VAE.has_fast_path`, the declaration is a class's own: a subclass
    that overrides a member of :data:`ENUMERATED_FAST_PATH_MEMBERS` without declaring it again
    trains the program it wrote, through Pyro."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not declaration_covers(cls, "has_enumerated_fast_path", ENUMERATED_FAST_PATH_MEMBERS):
            cls.has_enumerated_fast_path = False

    def __init__(
        self,
        classifier: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        prior: Prior,
        likelihood: Likelihood,
        event_shape: Sequence[int],
        num_values: int,
    ):
        super().__init__(encoder, decoder, prior, likelihood, event_shape)
        if int(num_values) < 2:
            raise ValueError(f"the discrete site {self.site!r} needs at least 2 values, got {num_values}")
        self.classifier = classifier
        self.num_values = int(num_values)

    @property
    def enumerated_sites(self) -> Tuple[str, ...]:
        """The discrete sites the model and guide sum out by enumeration (TraceEnum_ELBO trains them)."""
        return (self.site,)

    # -- values and labels

    def check_values(
        self, values: Union[Tensor, int, None], n: int, what: str, allow_unlabelled: bool
    ) -> Optional[Tensor]:
        """``values`` as a long tensor ``(n,)`` (an int is broadcast); a one-line ValueError otherwise."""
        if values is None:
            return None
        param = next(self.parameters())
        values = torch.as_tensor(values, device=param.device)
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
        if values.dim() == 0:
            values = values.expand(n)
        if values.shape != (n,):
            raise ValueError(f"{what} must have shape ({n},), got {tuple(values.shape)}")
        low = UNLABELLED if allow_unlabelled else 0
        if values.numel() and (int(values.min()) < low or int(values.max()) >= self.num_values):
            raise ValueError(
                f"{what} must lie in [{low}, {self.num_values - 1}] for this model ({self.num_values} values of "
                f"site {self.site!r}), got values in [{int(values.min())}, {int(values.max())}]"
                + ("; the class count must match the labels" if allow_unlabelled else "")
            )
        return values.long()

    def given_values(self, values: Union[Tensor, int], n: int, what: str, allow_unlabelled: bool) -> Tensor:
        """:meth:`check_values` of values that are given (not None)."""
        checked = self.check_values(values, n, what, allow_unlabelled)
        assert checked is not None  # values was not None
        return checked

    def clamped_values(self, x: Tensor, y: Optional[Tensor], component: Optional[Tensor]) -> Optional[Tensor]:
        """The values the site is fixed to per datapoint (-1: free), from ``component`` (and labels)."""
        return self.check_values(component, x.shape[0], "component", allow_unlabelled=True)

    def one_hot(self, values: Tensor) -> Tensor:
        return F.one_hot(values, self.num_values).to(next(self.parameters()).dtype)

    def value_logits(self, x: Tensor) -> Tensor:
        """log q(value | x), ``(N, num_values)``."""
        return self.classifier(x)

    # -- the parts subclasses define

    def value_prior(self) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def value_log_prior(self) -> Tensor:  # pragma: no cover - abstract
        """log p(value) ``(num_values,)``, as ``value_prior()`` scores each value."""
        raise NotImplementedError

    def z_prior(self, value_onehot: Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def z_log_prior(self, z: Tensor, value_onehot: Tensor) -> Tensor:  # pragma: no cover - abstract
        """log p(z | value) ``(...)``, as ``z_prior(value_onehot).log_prob(z)`` (broadcast)."""
        raise NotImplementedError

    def decoder_params(self, z: Tensor, value_onehot: Tensor) -> Tuple[Tensor, ...]:  # pragma: no cover
        raise NotImplementedError

    def sample_value(self, name: str, fn: Any) -> Tensor:
        """Sample the discrete site and return it as a one-hot (or relaxed one-hot) tensor."""
        value = pyro.sample(name, fn, infer={"enumerate": "parallel"})
        return self.one_hot(value)

    def extra_terms(self, x: Tensor, y: Optional[Tensor], logits: Optional[Tensor] = None) -> Optional[Tensor]:
        """Per-datapoint terms ``(N,)`` the model adds to log p outside the latent sites (M2's
        classifier term in training mode), or None; ``logits``: ``value_logits(x)`` if already
        computed. The model adds them as a factor, :meth:`enumerated_elbo` directly."""
        return None

    def extra_model_terms(self, x: Tensor, y: Optional[Tensor]) -> None:
        """The factor of :meth:`extra_terms` in the model, where there is one."""
        terms = self.extra_terms(x, y)
        if terms is not None:
            pyro.factor("extra_terms", terms)

    def enumerated_elbo(
        self, x: Tensor, y: Optional[Tensor] = None, *, kl_weight: float = 1.0, num_particles: Optional[int] = None
    ) -> Tensor:
        """The ELBO per datapoint with the discrete site summed out exactly, ``(N,)`` (or
        ``(num_particles, N)``, one reparameterized z per value and particle):

            sum_c q(c | x) [log p(x | z_c, c) + w (log p(c) + log p(z_c | c) - log q(c | x) - log q(z_c | x, c))]

        plus :meth:`extra_terms`, with w = ``kl_weight`` (the model's and guide's scale on both
        latent sites) and z_c ~ q(z | x, c). It is what ``TraceEnum_ELBO`` computes from
        ``model`` and ``guide`` (guide-side parallel enumeration: Pyro's enumerated one-hot
        ``(C, 1, C)``, or ``(C, 1, 1, C)`` with a particle plate, and the z draws of the same
        shape from the same standard-normal call), as one batched computation without tracing;
        the tests compare the two at the same random state. Clamped points (labels,
        ``component``) give q(c | x) no mass off their value, so those terms weigh 0."""
        clamped = self.clamped_values(x, y, None)
        logits = self.value_logits(x)
        log_q_value = clamp_logits(logits, clamped).transpose(0, 1)  # (C, N)
        onehot = self.one_hot(torch.arange(self.num_values, device=x.device)).unsqueeze(-2)  # (C, 1, C)
        if num_particles is not None:
            onehot = onehot.unsqueeze(-2)  # (C, 1, 1, C): the particle plate at dim -2
            log_q_value = log_q_value.unsqueeze(-2)
        loc, scale = self.encoder(x, onehot)  # (C, N, d) or (C, 1, N, d)
        shape = loc.shape if num_particles is None else loc.shape[:1] + (num_particles,) + loc.shape[2:]
        z = loc + _standard_normal(shape, dtype=loc.dtype, device=loc.device) * scale
        log_prior = self.value_log_prior().reshape((-1,) + (1,) * (z.dim() - 2))
        latent = log_prior + self.z_log_prior(z, onehot) - normal_log_prob(z, loc, scale).sum(-1) - log_q_value
        per_value = self.likelihood.log_prob(x, *self.decoder_params(z, onehot)) + kl_weight * latent
        elbo = (log_q_value.exp() * per_value).sum(0)
        extra = self.extra_terms(x, y, logits)
        return elbo if extra is None else elbo + extra

    # -- model and guide

    def model(
        self,
        x: Tensor,
        y: Optional[Tensor] = None,
        *,
        num_data: Optional[int] = None,  # type: ignore[override]
        kl_weight: float = 1.0,
        component: Optional[Tensor] = None,
    ) -> Tensor:
        """p(value) p(z | value) p(x | z, value), ``x`` observed; returns z."""
        self.clamped_values(x, y, component)  # checks labels and clamps (the guide clamps)
        with data_plate(x, num_data):
            with poutine.scale(scale=kl_weight):
                onehot = self.sample_value(self.site, self.value_prior())
                z = pyro.sample("z", cast(Any, self.z_prior(onehot)))
            pyro.sample("x", self.likelihood(*self.decoder_params(z, onehot)), obs=x)
            self.extra_model_terms(x, y)
        return z

    def guide_value_dist(self, x: Tensor, clamped: Optional[Tensor]) -> dist.Distribution:
        return dist.Categorical(logits=clamp_logits(self.value_logits(x), clamped))

    def guide(
        self,
        x: Tensor,
        y: Optional[Tensor] = None,
        *,
        num_data: Optional[int] = None,  # type: ignore[override]
        kl_weight: float = 1.0,
        component: Optional[Tensor] = None,
    ) -> Tensor:
        """q(value | x) q(z | x, value); clamped points put q(value | x) on their value."""
        clamped = self.clamped_values(x, y, component)
        with data_plate(x, num_data):
            with poutine.scale(scale=kl_weight):
                onehot = self.sample_value(self.site, self.guide_value_dist(x, clamped))
                loc, scale = self.encoder(x, onehot)
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # -- the fast-path protocol's members are not offered (has_fast_path is False)

    def latent_shapes(self) -> dict:
        return {"z": (self.latent_dim,)}

    def encode(self, x: Tensor, value: Union[Tensor, int, None] = None) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        """(loc, scale) of q(z | x, value); ``value`` None: the most probable value under q(value | x)."""
        values = (
            self.value_logits(x).argmax(-1)
            if value is None
            else self.given_values(value, x.shape[0], "value", allow_unlabelled=False)
        )
        return self.encoder(x, self.one_hot(values))

    def reconstruct(self, x: Tensor) -> Tensor:  # type: ignore[override]
        values = self.value_logits(x).argmax(-1)
        loc, _ = self.encoder(x, self.one_hot(values))
        return self.likelihood.mean(*self.decoder_params(loc, self.one_hot(values)))


class SemiSupervisedVAE(EnumeratedCategoricalVAE):
    """M2 (Kingma et al. 2014): p(y) uniform, p(z) = N(0, I), p(x | y, z); q(y | x) q(z | x, y).

    ``alpha`` is the paper's weight of the classifier term (default 0.1 ``num_train``); each
    labelled point's term is weighted alpha / ``num_labelled`` (the paper's expectation over
    the labelled data), added by the model in training mode only.
    """

    site = "y"
    label_metrics = ("test_error",)
    labelled_evidence = "log p(x, y)"  # a point scored with its label: y is observed, not summed out
    has_enumerated_fast_path = True  # enumerated_elbo and model/guide below agree (tests compare them)

    def __init__(
        self,
        classifier: nn.Module,
        encoder: ConditionalGaussianEncoder,
        decoder: ConditionalDecoder,
        prior: Prior,
        likelihood: Likelihood,
        event_shape: Sequence[int],
        num_classes: int,
        alpha: float,
        num_labelled: int,
    ):
        super().__init__(classifier, encoder, decoder, prior, likelihood, event_shape, num_classes)
        self.num_classes = self.num_values
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if num_labelled < 1:
            raise ValueError(f"num_labelled must be >= 1, got {num_labelled}")
        self.alpha, self.num_labelled = float(alpha), int(num_labelled)

    @property
    def classifier_weight(self) -> float:
        """The weight of each labelled point's log q(y | x): alpha / num_labelled."""
        return self.alpha / self.num_labelled

    def clamped_values(self, x: Tensor, y: Optional[Tensor], component: Optional[Tensor]) -> Optional[Tensor]:
        labels = self.check_values(y, x.shape[0], "labels y", allow_unlabelled=True)
        forced = super().clamped_values(x, y, component)
        if forced is None:
            return labels
        return forced if labels is None else torch.where(forced >= 0, forced, labels)

    def value_prior(self) -> dist.Distribution:
        param = next(self.parameters())
        return dist.Categorical(logits=param.new_zeros(self.num_values))

    def value_log_prior(self) -> Tensor:
        param = next(self.parameters())
        return param.new_full((self.num_values,), -math.log(self.num_values))

    def z_prior(self, value_onehot: Tensor) -> dist.Distribution:
        return self.prior()

    def z_log_prior(self, z: Tensor, value_onehot: Tensor) -> Tensor:
        return self.prior.log_prob(z)

    def decoder_params(self, z: Tensor, value_onehot: Tensor) -> Tuple[Tensor, ...]:
        return self.decoder(z, value_onehot)

    def extra_terms(self, x: Tensor, y: Optional[Tensor], logits: Optional[Tensor] = None) -> Optional[Tensor]:
        """The classifier term (alpha / N_l) log q(y | x) of each labelled point, in training mode."""
        if not self.training or y is None or self.alpha == 0:
            return None
        labels = self.given_values(y, x.shape[0], "labels y", allow_unlabelled=True)
        labelled = labels >= 0
        if not bool(labelled.any()):
            return None
        logits = self.value_logits(x) if logits is None else logits
        log_q = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return self.classifier_weight * torch.where(labelled, log_q, torch.zeros_like(log_q))

    # generation: the same z (style) under every class

    def decode(self, z: Tensor, y: Union[Tensor, int, None] = None) -> Tensor:  # type: ignore[override]
        """E[x | z, y]; ``y`` one class or ``(N,)`` classes (None: drawn uniformly)."""
        n = z.shape[-2] if z.dim() >= 2 else 1
        if y is None:
            y = torch.randint(self.num_values, (n,), device=z.device)
        values = self.given_values(y, n, "labels y", allow_unlabelled=False)
        return self.likelihood.mean(*self.decoder(z, self.one_hot(values)))

    def sample(self, num_samples: int, y: Union[Tensor, int, None] = None) -> Tensor:  # type: ignore[override]
        return self.decode(self.prior().sample((num_samples,)), y)

    def classify(self, x: Tensor) -> Tensor:
        """argmax_y q(y | x), ``(N,)``."""
        return self.value_logits(x).argmax(-1)


class GaussianMixtureVAE(EnumeratedCategoricalVAE):
    """A Gaussian-mixture VAE: c ~ Cat(pi), z | c ~ N(mu_c, sigma_c^2), x | z; q(c | x) q(z | x, c).

    The component parameters are those of ``prior`` (a :class:`MixtureOfGaussiansPrior`), whose
    ``forward()`` is the marginal mixture over z (for sampling), while the model samples c as
    its own site. With ``relaxed`` the one-hot c is a Concrete (Gumbel-softmax) sample at the
    current temperature, tau = max(tau_min, tau_0 exp(-rate * steps)) (Jang et al. 2017, sec. 2.2),
    and z | c ~ N(c mu, (c sigma)^2): at a vertex of the simplex it is the discrete model.
    ``steps`` is the number of optimizer steps done, set by the training core through
    :meth:`set_training_step` (so methods that run the guide more than once per step, such as
    stl and dreg, follow the same schedule); it is a buffer saved with the weights.
    """

    site = "c"
    label_metrics = ("cluster_accuracy", "clusters_used")
    has_enumerated_fast_path = True  # enumerated_elbo and model/guide below agree (tests compare them)

    def __init__(
        self,
        classifier: nn.Module,
        encoder: ConditionalGaussianEncoder,
        decoder: nn.Module,
        prior: MixtureOfGaussiansPrior,
        likelihood: Likelihood,
        event_shape: Sequence[int],
        *,
        relaxed: bool = False,
        temperature: float = 1.0,
        min_temperature: float = 0.5,
        anneal_rate: float = 1e-3,
    ):
        super().__init__(classifier, encoder, decoder, prior, likelihood, event_shape, prior.num_components)
        if not (0 < min_temperature <= temperature and math.isfinite(temperature)):
            raise ValueError(
                f"temperatures need 0 < min_temperature <= temperature, got {min_temperature}, {temperature}"
            )
        if not (anneal_rate >= 0 and math.isfinite(anneal_rate)):
            raise ValueError(f"anneal_rate must be a finite number >= 0, got {anneal_rate}")
        self.relaxed = bool(relaxed)
        self.initial_temperature, self.min_temperature = float(temperature), float(min_temperature)
        self.anneal_rate = float(anneal_rate)
        self.steps: Tensor
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def mixture(self) -> MixtureOfGaussiansPrior:
        """The prior's mixture parameters (weights, means, scales of the components)."""
        return cast(MixtureOfGaussiansPrior, self.prior)

    @property
    def enumerated_sites(self) -> Tuple[str, ...]:
        return () if self.relaxed else (self.site,)

    @property
    def temperature(self) -> float:
        return max(self.min_temperature, self.initial_temperature * math.exp(-self.anneal_rate * int(self.steps)))

    def value_prior(self) -> dist.Distribution:
        if self.relaxed:
            return dist.RelaxedOneHotCategorical(torch.tensor(self.temperature), logits=self.mixture.logits)
        return dist.Categorical(logits=self.mixture.logits)

    def guide_value_dist(self, x: Tensor, clamped: Optional[Tensor]) -> dist.Distribution:
        if self.relaxed:
            if clamped is not None:
                raise ValueError("the relaxed model cannot clamp its component; score it with exact_discrete()")
            return dist.RelaxedOneHotCategorical(torch.tensor(self.temperature), logits=self.value_logits(x))
        return super().guide_value_dist(x, clamped)

    def sample_value(self, name: str, fn: Any) -> Tensor:
        if self.relaxed:
            return pyro.sample(name, fn)
        return super().sample_value(name, fn)

    def set_training_step(self, step: int) -> None:
        """The training protocol: called by the training core before each optimizer step with
        the number of optimizer steps done so far (a resumed run passes its own count), which
        sets the temperature schedule's ``steps``."""
        try:
            count = -1 if isinstance(step, bool) else operator.index(step)  # int, numpy or 0-d tensor
        except TypeError:
            count = -1
        if count < 0:
            raise ValueError(f"step must be an integer >= 0 (optimizer steps done), got {step!r}")
        self.steps.fill_(count)

    def component_scales(self) -> Tensor:
        return F.softplus(self.mixture.raw_scales) + 1e-4

    def value_log_prior(self) -> Tensor:
        return torch.log_softmax(self.mixture.logits, -1)

    def z_prior(self, value_onehot: Tensor) -> dist.Distribution:
        return dist.Normal(value_onehot @ self.mixture.locs, value_onehot @ self.component_scales()).to_event(1)

    def z_log_prior(self, z: Tensor, value_onehot: Tensor) -> Tensor:
        loc, scale = value_onehot @ self.mixture.locs, value_onehot @ self.component_scales()
        return normal_log_prob(z, loc, scale).sum(-1)

    def decoder_params(self, z: Tensor, value_onehot: Tensor) -> Tuple[Tensor, ...]:
        return self.decoder(z)

    def decode(self, z: Tensor) -> Tensor:  # type: ignore[override]
        return self.likelihood.mean(*self.decoder(z))

    def sample(self, num_samples: int) -> Tensor:  # type: ignore[override]
        return self.decode(self.prior().sample((num_samples,)))

    def cluster(self, x: Tensor) -> Tensor:
        """argmax_c q(c | x), ``(N,)``."""
        return self.value_logits(x).argmax(-1)

    def exact_discrete(self) -> "_ExactDiscrete":
        """A context in which this (relaxed) model is the discrete one with the same parameters:
        ``with vae.exact_discrete(): enumerated_estimate(vae.model, vae.guide, x, ...)``."""
        return _ExactDiscrete(self)


class _ExactDiscrete:
    def __init__(self, vae: GaussianMixtureVAE):
        self.vae = vae

    def __enter__(self) -> GaussianMixtureVAE:
        self.was = self.vae.relaxed
        self.vae.relaxed = False
        return self.vae

    def __exit__(self, *exc) -> None:
        self.vae.relaxed = self.was


# -- builders --------------------------------------------------------------------------------------


def _need_classes(name: str, num_classes: Optional[int]) -> int:
    if num_classes is None:
        raise ValueError(
            f"model {name!r} is semi-supervised and needs labelled data (data_info must give "
            "num_classes); choose a dataset with labels (digits, mnist, fashion-mnist, or an .npz with labels)"
        )
    if int(num_classes) < 2:
        raise ValueError(f"model {name!r} needs num_classes >= 2, got {num_classes}")
    return int(num_classes)


def build_m2(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    num_classes: Optional[int] = None,
    num_train: Optional[int] = None,
    num_labelled: Optional[int] = None,
    *,
    alpha: Optional[NonNegativeFloat] = None,
    **data_info,
) -> SemiSupervisedVAE:
    """The ``m2`` model: one hidden layer of ``hidden_dim`` ReLU units per network
    (the paper: 500); ``alpha`` (a model option: ``--model-option alpha=...``, kept in the run's
    config) defaults to 0.1 ``num_train`` (the paper's 0.1 N)."""
    num_classes = _need_classes("m2", num_classes)
    if not isinstance(prior, StandardNormalPrior):
        raise ValueError(f"model 'm2' has p(z) = N(0, I): use prior 'standard_normal', got {type(prior).__name__}")
    num_train = 1 if num_train is None else int(num_train)
    num_labelled = num_train if num_labelled is None else int(num_labelled)
    alpha = 0.1 * num_train if alpha is None else float(alpha)
    hidden = (hidden_dim,)
    classifier = ClassifierMLP(event_shape, num_classes, hidden)
    encoder = ConditionalGaussianEncoder(event_shape, num_classes, latent_dim, hidden)
    decoder = ConditionalDecoder(latent_dim, num_classes, event_shape, likelihood.num_params, hidden)
    return SemiSupervisedVAE(
        classifier,
        encoder,
        decoder,
        prior,
        likelihood,
        event_shape,
        num_classes,
        alpha=alpha,
        num_labelled=max(1, num_labelled),
    )


#: The initial scale of the component means, N(0, scale^2) per dim, where a model builds its own
#: mixture (the default prior, ``--model-option num_components=K`` for another count); a
#: mixture_of_gaussians prior given instead keeps its own ``init_scale`` (1.0 unless set in Python
#: or config.json). Measured on MNIST (docs/semisupervised.md): the enumerated ``gmvae`` started N(0, 1)
#: apart settled on 1-5 of 10 components within the first epoch in 14 of 14 seeds, started at 0.1
#: on all 10 (3 epochs: 45.5% cluster accuracy against 32.3%); the ``relaxed_gmvae`` goes the other
#: way (3 epochs, 3 seeds: 39.2-41.1% at 1.0, 14.0-21.5% at 0.1), so each keeps its own.
COMPONENT_INIT_SCALE = {"gmvae": 0.1, "relaxed_gmvae": 1.0}


DEFAULT_NUM_COMPONENTS = 10


def _mixture_prior(name: str, prior: Prior, latent_dim: int, num_components: Optional[int]) -> MixtureOfGaussiansPrior:
    if isinstance(prior, MixtureOfGaussiansPrior):  # the user's own mixture, start included
        if num_components is not None and num_components != prior.num_components:
            raise ValueError(
                f"model {name!r}: its model option 'num_components' ({num_components}) and the "
                f"mixture_of_gaussians prior's {prior.num_components} components both set the count: give one"
            )
        return prior
    if isinstance(prior, StandardNormalPrior):  # the default: a mixture with the model's own count and start
        count = DEFAULT_NUM_COMPONENTS if num_components is None else num_components
        return MixtureOfGaussiansPrior(latent_dim, num_components=count, init_scale=COMPONENT_INIT_SCALE[name])
    raise ValueError(
        f"model {name!r} {'relaxes' if name == 'relaxed_gmvae' else 'enumerates'} the component of a Gaussian "
        "mixture over z: use prior "
        f"'mixture_of_gaussians' (num_components) or the default, got {type(prior).__name__}"
    )


def _mixture_vae(
    name: str,
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    num_components: Optional[int],
    uniform_weights: bool,
    hidden_dims: Optional[Sequence[int]] = None,
    **relaxation: Any,
) -> GaussianMixtureVAE:
    prior = _mixture_prior(name, prior, latent_dim, num_components)
    k = prior.num_components
    if k < 2:
        raise ValueError(f"the mixture needs at least 2 components, got {k}")
    if uniform_weights:  # a learned p(c) can collapse onto one component
        prior.logits.requires_grad_(False)
    hidden = (hidden_dim,) if hidden_dims is None else tuple(int(h) for h in hidden_dims)
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden_dims must be a non-empty list of positive integers, got {hidden_dims!r}")
    classifier = ClassifierMLP(event_shape, k, hidden)
    encoder = ConditionalGaussianEncoder(event_shape, k, latent_dim, hidden)
    decoder = MLPDecoder(latent_dim, event_shape, likelihood.num_params, hidden, "relu")
    return GaussianMixtureVAE(classifier, encoder, decoder, prior, likelihood, event_shape, **relaxation)


def build_gmvae(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    *,
    num_components: Optional[PositiveInt] = None,
    uniform_weights: bool = True,
    hidden_dims: Optional[Sequence[PositiveInt]] = None,
    **data_info,
) -> GaussianMixtureVAE:
    """The ``gmvae`` model: ReLU MLPs with one hidden layer of ``hidden_dim`` units (the model
    option ``hidden_dims``, e.g. ``[512, 512]``, gives every network those hidden layers: Rui
    Shu's configuration is ``hidden_dims=[512,512]`` with ``--latent-dim 64``); the model option
    ``num_components`` (default 10) sets the count of the model's own mixture, whose component
    means start at N(0, 0.1^2) (:data:`COMPONENT_INIT_SCALE`); a mixture_of_gaussians prior given
    instead is used as it is, its count and start included; p(c) uniform (its logits not
    trained) unless the model option ``uniform_weights`` is false."""
    return _mixture_vae(
        "gmvae", event_shape, latent_dim, hidden_dim, prior, likelihood, num_components, uniform_weights, hidden_dims
    )


def build_relaxed_gmvae(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    *,
    num_components: Optional[PositiveInt] = None,
    uniform_weights: bool = True,
    hidden_dims: Optional[Sequence[PositiveInt]] = None,
    temperature: PositiveFloat = 1.0,
    min_temperature: PositiveFloat = 0.5,
    anneal_rate: NonNegativeFloat = 1e-3,
    **data_info,
) -> GaussianMixtureVAE:
    """The ``relaxed_gmvae`` model: the gmvae with c relaxed. Its model options (``--model-option``,
    kept in the run's config) are the gmvae's ``num_components``, ``uniform_weights`` and ``hidden_dims`` and the temperature schedule
    tau = max(``min_temperature``, ``temperature`` exp(-``anneal_rate`` step))."""
    return _mixture_vae(
        "relaxed_gmvae",
        event_shape,
        latent_dim,
        hidden_dim,
        prior,
        likelihood,
        num_components,
        uniform_weights,
        hidden_dims,
        relaxed=True,
        temperature=temperature,
        min_temperature=min_temperature,
        anneal_rate=anneal_rate,
    )


MODELS.register("m2", doc="Kingma et al. 2014: semi-supervised M2, y summed out by enumeration for unlabelled points")(
    ModelSpec(
        build_m2,
        "Kingma et al. 2014 (M2): p(y) uniform, p(z) = N(0, I), p(x|y,z); q(y|x) q(z|x,y), ReLU MLPs; "
        "unlabelled points (label -1) have y summed out by enumeration; needs labelled data (--labels N)",
        likelihood="bernoulli",
        latent_dim=50,
        hidden_dim=500,
        uses_labels=True,
    )
)
MODELS.register("gmvae", doc="Gaussian-mixture VAE: the component c is a latent site summed out by enumeration")(
    ModelSpec(
        build_gmvae,
        "Gaussian-mixture VAE: c ~ Cat(pi) (enumerated), z|c ~ N(mu_c, sigma_c^2), p(x|z); q(c|x) q(z|x,c), "
        "ReLU MLPs, 10 components (--model-option num_components=K for another count)",
        likelihood="bernoulli",
        latent_dim=10,
        hidden_dim=500,
    )
)
MODELS.register("relaxed_gmvae", doc="the GMVAE with c relaxed (Concrete / Gumbel-softmax), annealed temperature")(
    ModelSpec(
        build_relaxed_gmvae,
        "the gmvae with c a Concrete / Gumbel-softmax relaxation (Maddison et al. 2017, Jang et al. 2017), "
        "temperature max(0.5, exp(-1e-3 step)); vae.exact_discrete() scores it as the discrete model",
        likelihood="bernoulli",
        latent_dim=10,
        hidden_dim=500,
    )
)
