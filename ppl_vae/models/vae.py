"""The VAE as a Pyro model/guide pair assembled from four swappable parts.

Contract (relied on by training and analysis, and by hand-written pairs alike):
datapoints live in ``pyro.plate("data", ...)`` at dim -1, the latent site is ``"z"`` and the
observed site is ``"x"``. ``model(x, y=None)`` and ``guide(x, y=None)`` take the dataset's
labels as ``y`` when it has them (callers always pass what the dataset holds; unconditional
models ignore it, conditional ones need it and say so). ``num_data`` scales a minibatch to the full dataset (Kingma &
Welling 2013, eq. 8); ``kl_weight`` scales log p(z) - log q(z|x) for KL warm-up.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from torch import Tensor, nn
from torch.distributions.utils import _standard_normal

from ppl_vae.models.densities import normal_log_prob
from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.priors import Prior


def data_plate(x: Tensor, num_data: Optional[int]) -> pyro.plate:
    """The ``"data"`` plate over the leading dim of ``x``, scaled to ``num_data`` points."""
    batch_size = x.shape[0]
    if num_data is None or num_data == batch_size:
        return pyro.plate("data", batch_size)
    # An explicit subsample avoids drawing a random permutation of num_data every step.
    return pyro.plate("data", num_data, subsample=torch.arange(batch_size, device=x.device))


#: what the fast path and the Pyro program must agree on: overriding one without re-declaring
#: ``has_fast_path`` drops the protocol (see :attr:`VAE.has_fast_path`)
FAST_PATH_MEMBERS = (
    "model",
    "guide",
    "latent_shapes",
    "log_prior",
    "log_likelihood",
    "log_joint",
    "sample_guide",
    "guide_and_prior",
)


def _defining_class(cls: type, name: str) -> Optional[type]:
    return next((k for k in cls.__mro__ if name in vars(k)), None)


ENCODER_GUIDE_MEMBERS = ("guide", "sample_guide", "guide_and_prior")
"""The members :attr:`VAE.encoder_is_guide` vouches for: the guide is ``encoder(x)``'s Gaussian."""


def declaration_covers(cls: type, flag: str, members: Sequence[str]) -> bool:
    """Whether the class-level declaration ``flag`` (e.g. ``has_fast_path``) that ``cls`` has
    still covers each of ``members``: true where ``cls`` declares it itself, or where every
    member comes from the class it would come from in the class that declared ``flag``. A member
    overridden since, by ``cls`` or by a mixin earlier in its MRO, is a program the declaration
    never vouched for (a mixin's tempered ``model`` must not be scored as the base model)."""
    if flag in vars(cls):
        return True
    declarer = _defining_class(cls, flag)
    if declarer is None:
        return False
    return all(_defining_class(cls, name) is _defining_class(declarer, name) for name in members)


def bounds_of_training_elbos(model: Any) -> Dict[str, str]:
    """What the history's ELBOs bound, by variable: ``evidence_of(model)`` for each, unless the
    model declares a ``labelled_evidence`` (M2): then the test ELBO, scored with the test labels,
    bounds it, and the training and validation ELBOs (points of the training split, scored with
    its partly hidden labels) bound it on the labelled points and the evidence on the others."""
    evidence, labelled = evidence_of(model), getattr(model, "labelled_evidence", None)
    if labelled is None:
        return {name: evidence for name in ("train_elbo", "test_elbo", "val_elbo")}
    mixed = f"{labelled} on the labelled points and {evidence} on the others"
    return {"train_elbo": mixed, "test_elbo": labelled, "val_elbo": mixed}


def evidence_of(model: Any) -> str:
    """What ``model``'s ELBO bounds and its estimates estimate (:attr:`VAE.evidence`): log p(x)
    unless it declares another (a cvae's log p(x | y)); a pair written by hand declares none."""
    return str(getattr(model, "evidence", "log p(x)"))


class VAE(nn.Module):
    """A variational autoencoder: encoder, decoder, prior over z, likelihood of x.

    ``encoder(x) -> (loc, scale)`` of q(z|x); ``decoder(z) -> params``; ``prior() ->
    Distribution`` over z; ``likelihood(*params) -> Distribution`` over x. Every part is an
    ``nn.Module`` and every parameter is a module parameter, so ``vae.parameters()`` is all
    that an optimizer needs (no global param store).

    ``num_classes`` is None for a model that ignores labels; a conditional model (``cvae``)
    sets it to the number of classes its ``y`` ranges over. ``generates_images``: whether a
    decoded mean E[x|z] is something to show as an image (False for text's character indices).
    """

    num_classes: Optional[int] = None
    generates_images: bool = True
    #: what the ELBO bounds, as printed and recorded: log p(x | y) for a model conditioned on labels
    evidence: str = "log p(x)"
    #: what the ELBO of a point scored with its label bounds, where that differs from ``evidence``
    #: (M2: log p(x, y); training scores test points with their labels); None: ``evidence``
    labelled_evidence: Optional[str] = None

    has_fast_path: bool = True
    """Declares the fast-path protocol (:class:`ppl_vae.inference.latents.FastPair`): ``log_prior``,
    ``log_likelihood`` and ``sample_guide`` below give the same numbers as ``model`` and ``guide``.

    The declaration is a class's own: a subclass that overrides ``model``, ``guide`` or a member
    of the protocol (:data:`FAST_PATH_MEMBERS`) without declaring ``has_fast_path`` itself loses
    it, so the estimators and the training step score the program it wrote, through Pyro's
    traces (a power posterior written with ``poutine.scale`` in ``model`` is tempered, not
    silently scored as the base model). A subclass that keeps both sides in step re-declares
    ``has_fast_path = True`` (:func:`ppl_vae.inference.latents.check_fast_path` compares them)."""

    label_metrics: Tuple[str, ...] = ()
    """Metrics of the model against the data's labels that ``ppl-vae fit`` records per epoch on the
    test set where the data has labels (names from
    :data:`ppl_vae.analysis.semisupervised.LABEL_METRICS`, each a function of argmax of
    ``value_logits(x)``): M2 declares ``("test_error",)``, a GMVAE ``("cluster_accuracy",
    "clusters_used")``; most models none."""

    encoder_is_guide: bool = True
    """The guide is the encoder's diagonal Gaussian N(loc(x), scale(x)^2) itself (a flow guide is not);
    methods that fit or call the encoder directly (wake-sleep, MCEM, SA, the fused analytic-KL
    ELBO, the disentangling objectives' KL terms, the gap decomposition's q density) need it.
    Like :attr:`has_fast_path` the declaration is a class's own: a subclass that overrides a
    member of :data:`ENCODER_GUIDE_MEMBERS` (a guide widened or shifted from the encoder's output)
    without declaring ``encoder_is_guide`` itself loses it, so those methods refuse it and the
    analyses draw from its own guide."""

    fast_path_members: Tuple[str, ...] = FAST_PATH_MEMBERS
    """The members :attr:`has_fast_path` vouches for: set on an instance, one of them is not what
    the declaration covered, and :func:`ppl_vae.inference.latents.fast_pair` traces the pair."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not declaration_covers(cls, "has_fast_path", FAST_PATH_MEMBERS):
            cls.has_fast_path = False
        if not declaration_covers(cls, "encoder_is_guide", ENCODER_GUIDE_MEMBERS):
            cls.encoder_is_guide = False

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        prior: Prior,
        likelihood: Likelihood,
        event_shape: Sequence[int],
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood
        self.event_shape = tuple(event_shape)
        num_params = getattr(decoder, "num_params", likelihood.num_params)
        if num_params != likelihood.num_params:
            raise ValueError(
                f"the decoder returns {num_params} parameter(s) per element but likelihood "
                f"{likelihood.name!r} takes {likelihood.num_params}"
            )

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    def model(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """p(x, z) = p(z) p(x|z), with ``x`` observed; returns z. Labels ``y`` are ignored."""
        with data_plate(x, num_data):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(*self.decoder(z)), obs=x)
        return z

    def guide(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """q(z|x) = N(z; encoder(x)), the amortized guide (AEVB's recognition model); ``y`` is ignored."""
        with data_plate(x, num_data):
            loc, scale = self.encoder(x)
            with poutine.scale(scale=kl_weight):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # The fast-path protocol: per-datapoint log densities and guide draws without tracing.

    def latent_shapes(self) -> dict:
        """``{site: event_shape}`` of the latent sites, in the model's order."""
        return {"z": (self.latent_dim,)}

    def log_prior(self, x: Tensor, latents, y: Optional[Tensor] = None) -> Tensor:
        """log p(z), ``(*draws, N)`` for ``latents["z"]`` ``(*draws, N, latent_dim)``."""
        return self.prior.log_prob(latents["z"])

    score_block_samples: int = 512
    """Draws of z scored at a time per torch thread when no gradient is taken (importance
    weighting, AIS, ...): each thread's share of a block's decoder output (512 x 784 floats,
    1.6 MB, for MNIST) stays in its core's cache between the decoder's last matrix product and
    the likelihood's elementwise passes. Blocks split the draws only (the random draws are made
    before); every number is the one the whole batch would give, to float rounding."""

    def log_likelihood(self, x: Tensor, latents, y: Optional[Tensor] = None) -> Tensor:
        """log p(x | z), ``(*draws, N)``.

        In eval mode without autograd, draws are scored :attr:`score_block_samples` at a time, and where the
        decoder declares a linear head (``has_linear_head``) and the likelihood a fused scorer
        (``fuses_linear_head``, e.g. Bernoulli), through that scorer: the same numbers to
        float rounding (tests compare it with the generic path)."""
        z = latents["z"]
        if torch.is_grad_enabled() or self.training or z.dim() < 2:  # training: batch norm's statistics
            return self.likelihood.log_prob(x, *self.decoder(z))
        return self._log_likelihood_in_blocks(x, z)

    def _log_likelihood_in_blocks(self, x: Tensor, z: Tensor) -> Tensor:
        n = x.shape[0]
        draws = z.shape[:-2]
        z3 = z.reshape(-1, n, z.shape[-1])
        block = max(1, int(self.score_block_samples) * torch.get_num_threads())
        per_block, width = (max(1, block // n), n) if n <= block else (1, block)
        decoder: Any = self.decoder  # any module; MLPDecoder declares has_linear_head
        scorers = {}
        if getattr(decoder, "has_linear_head", False) and self.likelihood.fuses_linear_head:
            head = decoder.head
            for start in range(0, n, width):
                scorers[start] = self.likelihood.linear_head_scorer(
                    x[start : start + width], head.weight, head.bias, tuple(decoder.event_shape)
                )
        out = None
        for k0 in range(0, z3.shape[0], per_block):
            for start in range(0, n, width):
                zb = z3[k0 : k0 + per_block, start : start + width]
                score = scorers.get(start)
                if score is not None:
                    value = score(decoder.features(zb))
                else:
                    value = self.likelihood.log_prob(x[start : start + width], *self.decoder(zb))
                if out is None:
                    out = value.new_empty(z3.shape[:2])
                out[k0 : k0 + per_block, start : start + width] = value
        assert out is not None
        return out.reshape(draws + (n,))

    def log_joint(self, x: Tensor, latents, y: Optional[Tensor] = None) -> Tensor:
        """log p(x, z) = log p(z) + log p(x | z), ``(*draws, N)``."""
        return self.log_prior(x, latents, y) + self.log_likelihood(x, latents, y)

    def sample_guide(self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None):
        """(``{"z": z}``, log q(z|x)) for z ~ q(z|x), ``(num_particles, N, d)`` and ``(num_particles, N)``
        (no particle dim when ``num_particles`` is None). The draw is the one Pyro's guide makes
        (``Normal(loc, scale).rsample``: the same standard-normal call and RNG stream)."""
        loc, scale = self.encoder(x)
        return self.sample_gaussian_guide(loc, scale, num_particles)

    def guide_and_prior(self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None):
        """(latents, log q, log p(latents)): :meth:`sample_guide` and :meth:`log_prior` of its
        draws, what the fused ELBO and importance weighting need; a model whose guide already
        computes parts of the prior (the ladder's top-down pass computes p(z_l | z_{l+1})) gives
        them from one pass, with the same draws and numbers."""
        latents, log_q = self.sample_guide(x, num_particles, y)
        return latents, log_q, self.log_prior(x, latents, y)

    @staticmethod
    def sample_gaussian_guide(loc: Tensor, scale: Tensor, num_particles: Optional[int] = None):
        """:meth:`sample_guide` from the encoder's ``(loc, scale)`` already computed (the fused
        analytic-KL ELBO needs them for the KL too)."""
        shape = torch.Size(() if num_particles is None else (num_particles,)) + loc.shape
        eps = _standard_normal(shape, dtype=loc.dtype, device=loc.device)
        z = loc + eps * scale
        return {"z": z}, normal_log_prob(z, loc, scale).sum(-1)

    # Conveniences that bypass tracing (no sample sites are recorded).

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(loc, scale) of q(z|x), each ``(batch, latent_dim)``."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """E[x|z] under the likelihood, shape ``(..., *event_shape)``."""
        return self.likelihood.mean(*self.decoder(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z = E_q[z|x]]: the decoded posterior mean."""
        return self.decode(self.encoder(x)[0])

    def sample(self, num_samples: int) -> Tensor:
        """E[x|z] for ``num_samples`` draws z ~ p(z)."""
        z = self.prior().sample((num_samples,))
        return self.decode(z)
