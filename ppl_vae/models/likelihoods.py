"""Likelihoods p(x | decoder output): each turns raw decoder outputs into a Distribution.

A decoder returns ``num_params`` tensors shaped like one datapoint (``(..., *event_shape)``);
the likelihood applies its own constraints (sigmoid, softplus) and returns a Distribution
whose event shape is the datapoint's shape. Adding a likelihood never touches the VAE class:
subclass :class:`Likelihood` and register a factory in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from torch import Tensor, nn

from ppl_vae.errors import DataError
from ppl_vae.models.densities import normal_log_prob
from ppl_vae.registry import Registry

LIKELIHOODS: Registry = Registry("likelihood")


class DataRangeWarning(UserWarning):
    """The data lies in a likelihood's support but far from the scale it starts training at."""


def value_range(x) -> Tuple[float, float, int]:
    """(min, max, number of NaN/infinite values) of ``x``.

    ``x`` is a tensor or any array-like with its own ``value_range()`` (a memory-mapped dataset
    scans its file in chunks rather than loading it).
    """
    own = getattr(x, "value_range", None)
    if callable(own):
        return own()
    if x.numel() == 0:
        return math.nan, math.nan, 0
    if x.is_floating_point():
        # one pass: min and max propagate NaN and show infinities, so finite ones mean no bad value
        low, high = torch.aminmax(x)
        if torch.isfinite(low) and torch.isfinite(high):
            return float(low), float(high), 0
    finite = torch.isfinite(x)
    n_bad = int((~finite).sum())
    values = x[finite] if n_bad else x
    if values.numel() == 0:
        return math.nan, math.nan, n_bad
    return float(values.min()), float(values.max()), n_bad


class Likelihood(nn.Module):
    """Base class. ``support`` is ``(low, high)`` of the data this likelihood can score.

    ``unit_scale_bound``: for a likelihood on the whole real line whose decoder starts near
    mean 0 and scale about 1, data with ``|x|`` above this bound gets a
    :class:`DataRangeWarning` (it trains, but slowly, to a very low ELBO; rescaling fixes it).
    ``None``: no such warning.
    """

    num_params: int = 1
    support: Tuple[float, float] = (-math.inf, math.inf)
    unit_scale_bound: Optional[float] = None
    name: str = "likelihood"
    #: what to suggest when data falls outside ``support``
    support_hint: str = "rescale the data or choose a likelihood for its range"

    fuses_linear_head: bool = False
    """Declares :meth:`linear_head_scorer`: log p(x | decoder output) from the decoder's last
    hidden features when its last layer is linear, faster than materializing the parameters and
    equal to :meth:`log_prob` to float rounding. A subclass that overrides ``forward`` or
    ``log_prob`` without declaring ``fuses_linear_head`` itself loses the declaration (the
    fused scorer would no longer compute what it scores)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "fuses_linear_head" not in vars(cls) and any(name in vars(cls) for name in ("forward", "log_prob")):
            cls.fuses_linear_head = False

    def linear_head_scorer(
        self, x: Tensor, weight: Tensor, bias: Optional[Tensor], event_shape: Tuple[int, ...]
    ) -> Optional[Callable[[Tensor], Tensor]]:
        """A function ``h -> log p(x | h @ weight.T + bias)`` for features ``h`` ``(..., N, H)``
        (the decoder's one parameter tensor, reshaped to ``event_shape``), returning ``(..., N)``;
        ``x`` is ``(N, *event_shape)``. None where this likelihood offers no fused scorer for
        that layout (the caller then scores the decoder's output with :meth:`log_prob`)."""
        return None

    # Each likelihood takes its own number of decoder outputs (``num_params`` tensors): the
    # signatures below accept any arguments, so subclasses may name theirs.
    def forward(self, *params: Any, **kwargs: Any) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, *params: Any, **kwargs: Any) -> Tensor:
        """E[x | decoder output], used for reconstructions and generated images."""
        return self(*params, **kwargs).mean

    def log_prob(self, x: Tensor, *params: Any, **kwargs: Any) -> Tensor:
        """log p(x | decoder output), summed over each datapoint's event: the distribution's own;
        a likelihood with a closed form may compute it without building a distribution (the
        fused ELBO calls this every step)."""
        return self(*params, **kwargs).log_prob(x)

    def check_support(self, x: Any, what: str = "data") -> None:  # a Tensor or rows with value_range()
        """Raise :class:`DataError` if ``x`` has values this likelihood cannot score; warn
        (:class:`DataRangeWarning`, once per likelihood) if its scale is far from the one the
        likelihood starts training at."""
        x_min, x_max, n_bad = value_range(x)
        if n_bad:
            raise DataError(f"{what} contains {n_bad} NaN or infinite value(s)")
        if math.isnan(x_min):
            raise DataError(f"{what} is empty")
        low, high = self.support
        if x_min < low or x_max > high:
            raise DataError(
                f"likelihood {self.name!r} needs {what} in [{low:g}, {high:g}], "
                f"but its values lie in [{x_min:g}, {x_max:g}]; {self.support_hint}"
            )
        bound = self.unit_scale_bound
        if bound is not None and max(abs(x_min), abs(x_max)) > bound and not getattr(self, "_warned_scale", False):
            self._warned_scale = True
            warnings.warn(
                f"{what} has values in [{x_min:g}, {x_max:g}], but likelihood {self.name!r} starts from a "
                f"mean near 0 and a scale near 1: it will train slowly to a very low ELBO; rescale the "
                f"data (e.g. divide 8-bit images by 255) or standardize it",
                DataRangeWarning,
                stacklevel=2,
            )


# The distributions below are built with validate_args=False: their parameters are valid by
# construction (sigmoid/softplus + a floor), the data was checked once by check_support, and a
# NaN from a diverging decoder then reaches the loss, where training stops naming the step,
# instead of failing inside the distribution. It also saves argument checks over every pixel
# on every step.
def _independent(base: dist.Distribution, event_dims: int) -> dist.Distribution:
    return dist.Independent(base, event_dims, validate_args=False)


class _SummedBernoulli(dist.Independent):
    """Independent Bernoulli(logits) whose log_prob negates after summing over the event.

    The same numbers as ``Bernoulli(logits).to_event(n).log_prob``, with one pass fewer over
    every element: it matters when K = 5000 importance samples of 784 pixels are scored.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        return _bernoulli_log_prob(value, self.base_dist.logits, self.reinterpreted_batch_ndims)


def _bernoulli_log_prob(value: Tensor, logits: Tensor, event_dims: int) -> Tensor:
    shape = torch.broadcast_shapes(logits.shape, value.shape)
    cross_entropy = F.binary_cross_entropy_with_logits(logits.expand(shape), value.expand(shape), reduction="none")
    return -cross_entropy.sum(tuple(range(-event_dims, 0)))


class BernoulliLikelihood(Likelihood):
    """Bernoulli over each element (AEVB appendix C.1); values in [0, 1] score as cross-entropy.

    Grey-level data in [0, 1] is allowed, as in AEVB's MNIST experiments, so argument
    validation is off for the observed values; the result is then the binary cross-entropy,
    not a normalized density.
    """

    num_params = 1
    support = (0.0, 1.0)
    name = "bernoulli"
    support_hint = (
        "rescale the data into [0, 1] (e.g. divide 8-bit images by 255) or choose a likelihood "
        "for real values (gaussian, laplace)"
    )

    def __init__(self, event_dims: int = 1):
        super().__init__()
        self.event_dims = event_dims

    def forward(self, logits: Tensor) -> dist.Distribution:
        return _SummedBernoulli(dist.Bernoulli(logits=logits, validate_args=False), self.event_dims)

    def log_prob(self, x: Tensor, logits: Tensor) -> Tensor:  # type: ignore[override]
        return _bernoulli_log_prob(x, logits, self.event_dims)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    fuses_linear_head = True

    def linear_head_scorer(
        self, x: Tensor, weight: Tensor, bias: Optional[Tensor], event_shape: Tuple[int, ...]
    ) -> Optional[Callable[[Tensor], Tensor]]:
        """log p(x | l) = sum_j x_j l_j - softplus(l_j) with l = h W^T + b: the first sum is
        h . (W^T x) + b . x, one matrix-vector product per datapoint computed here once, so only
        the softplus term needs every logit; it is computed block by block in place."""
        if self.event_dims != len(event_shape) or x.shape[1:] != torch.Size(event_shape):
            return None  # events smaller than a datapoint: log_prob keeps the extra dims
        flat = x.reshape(x.shape[0], -1).to(weight.dtype)
        x_w = flat @ weight  # (N, H): W^T x per datapoint
        x_b = flat @ bias if bias is not None else flat.new_zeros(flat.shape[0])
        weight_t = weight.t()

        def score(h: Tensor) -> Tensor:
            rows = h.reshape(-1, h.shape[-1])
            logits = torch.mm(rows, weight_t) if bias is None else torch.addmm(bias, rows, weight_t)
            if torch.is_grad_enabled():
                softplus_sum = F.softplus(logits).sum(-1)
            else:
                softplus_sum = _softplus_sum_(logits)
            return torch.linalg.vecdot(h, x_w) + x_b - softplus_sum.reshape(h.shape[:-1])

        return score


SOFTPLUS_GROUP = 32
"""At most this many sigmoid(|l|) multiplied before one log in :func:`_softplus_sum_`: each lies
in [1/2, 1], so a product stays at or above 2^-32, far from float32's smallest normal number."""


def _softplus_sum_(t: Tensor) -> Tensor:
    """sum_j softplus(t_j) over the last dim, overwriting ``t`` (no autograd): the IW scorer's
    elementwise term, one value per image and particle over K x 784 logits.

    softplus(l) = relu(l) - log sigmoid(|l|); with sigmoid(|l|) in [1/2, 1], the log of a
    product of up to :data:`SOFTPLUS_GROUP` of them replaces as many logs. On CPU float32 that is
    0.9 ns a value against torch's softplus at 1.7-2.1 (one thread, MNIST logits), whose time is
    its log1p(exp(.)). Rounding: sigmoid(|l|) is 1 in float32 for |l| > 17, dropping
    log1p(exp(-|l|)) < 4.2e-8 a value, and the log of a product near 1 is off by about as many
    ulp of 1 as it has factors: within 16 u of the sum plus 2 u a value of float64's, the bound
    torch's own float32 softplus sum meets (tests/inference/test_fused_scorer.py; 4e-5 on a sum
    of 146 over 784 MNIST logits). Off the CPU (a GPU, where the sum is bound by memory traffic,
    not by the log) it is one in-place softplus and a sum: two passes instead of six."""
    if t.device.type != "cpu":
        return torch._C._nn.softplus(t, 1, 20, out=t).sum(-1)  # type: ignore[call-arg]
    relu = t.clamp_min(0).sum(-1)
    t.abs_().sigmoid_()
    n, factors = t.shape[-1], 1  # factors: the most sigmoids multiplied into one column so far
    while n > 1:
        half, odd = n // 2, n % 2
        grown = factors * (3 if odd else 2)
        if grown > SOFTPLUS_GROUP:
            break
        t[..., :half].mul_(t[..., half : 2 * half])
        if odd:
            t[..., :1].mul_(t[..., 2 * half : n])
        n, factors = half, grown
    return relu - t[..., :n].log_().sum(-1)


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1]."""

    num_params = 1
    support = (0.0, 1.0)
    name = "continuous_bernoulli"
    support_hint = BernoulliLikelihood.support_hint

    def __init__(self, event_dims: int = 1):
        super().__init__()
        self.event_dims = event_dims

    def forward(self, logits: Tensor) -> dist.Distribution:
        return _independent(dist.ContinuousBernoulli(logits=logits, validate_args=False), self.event_dims)


class GaussianLikelihood(Likelihood):
    """Diagonal Gaussian with a learned per-element scale (AEVB appendix C.2).

    ``squash=True`` maps the mean into (0, 1) with a sigmoid, as the paper does for Frey Face.
    ``min_scale`` (default 0.01, about the grey-level resolution of image data) keeps the
    density bounded where the data has constant pixels, which otherwise drives the scale to 0.
    """

    num_params = 2
    name = "gaussian"
    unit_scale_bound: Optional[float] = 10.0

    def __init__(self, event_dims: int = 1, squash: bool = False, min_scale: float = 1e-2):
        super().__init__()
        _check_event_dims(event_dims)
        if not (min_scale >= 0 and math.isfinite(min_scale)):
            raise ValueError(f"min_scale must be a finite number >= 0, got {min_scale}")
        self.event_dims = event_dims
        self.squash = squash
        self.min_scale = min_scale
        if squash:
            # the mean cannot leave (0, 1): data outside [0, 1] could never be fitted
            self.name = "gaussian_sigmoid"
            self.support = (0.0, 1.0)
            self.unit_scale_bound = None
            self.support_hint = (
                "its mean is squashed into (0, 1): rescale the data into [0, 1] (e.g. divide 8-bit "
                "images by 255) or choose a likelihood with an unbounded mean (gaussian, laplace)"
            )

    def _loc(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.squash else raw

    def forward(self, loc: Tensor, scale: Tensor) -> dist.Distribution:
        scale = F.softplus(scale) + self.min_scale
        return _independent(dist.Normal(self._loc(loc), scale, validate_args=False), self.event_dims)

    def log_prob(self, x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        log_p = normal_log_prob(x, self._loc(loc), F.softplus(scale) + self.min_scale)
        return log_p.sum(tuple(range(-self.event_dims, 0)))

    def mean(self, loc: Tensor, scale: Tensor) -> Tensor:
        return self._loc(loc)


class FixedScaleGaussianLikelihood(GaussianLikelihood):
    """Diagonal Gaussian with a fixed scale (the decoder outputs only the mean)."""

    num_params = 1
    name = "gaussian_fixed"
    scale: Tensor  # a buffer

    def __init__(self, event_dims: int = 1, squash: bool = False, scale: float = 0.1):
        super().__init__(event_dims, squash)
        self.name = "gaussian_fixed"
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, loc: Tensor) -> dist.Distribution:  # type: ignore[override]
        loc = self._loc(loc)
        return _independent(dist.Normal(loc, self.scale.expand_as(loc), validate_args=False), self.event_dims)

    def log_prob(self, x: Tensor, loc: Tensor) -> Tensor:  # type: ignore[override]
        return self(loc).log_prob(x)

    def mean(self, loc: Tensor) -> Tensor:  # type: ignore[override]
        return self._loc(loc)


class LaplaceLikelihood(Likelihood):
    """Laplace with a learned per-element scale: an L1 reconstruction error, robust to outliers."""

    num_params = 2
    name = "laplace"
    unit_scale_bound = 10.0

    def __init__(self, event_dims: int = 1, min_scale: float = 1e-2):
        super().__init__()
        self.event_dims = event_dims
        self.min_scale = min_scale

    def forward(self, loc: Tensor, scale: Tensor) -> dist.Distribution:
        return _independent(dist.Laplace(loc, F.softplus(scale) + self.min_scale, validate_args=False), self.event_dims)

    def mean(self, loc: Tensor, scale: Tensor) -> Tensor:
        return loc


def _check_event_dims(event_dims: int) -> None:
    if isinstance(event_dims, bool) or not isinstance(event_dims, int) or event_dims < 1:
        raise ValueError(f"event_dims must be an integer >= 1 (the trailing dims of a datapoint), got {event_dims!r}")


LIKELIHOODS.register("bernoulli")(BernoulliLikelihood)
LIKELIHOODS.register("continuous_bernoulli")(ContinuousBernoulliLikelihood)
LIKELIHOODS.register("gaussian")(GaussianLikelihood)


@LIKELIHOODS.register(
    "gaussian_sigmoid",
    doc="Diagonal Gaussian, learned scale, mean squashed into (0, 1) (AEVB appendix C.2).",
)
def gaussian_sigmoid(event_dims: int = 1, min_scale: float = 1e-2) -> GaussianLikelihood:
    """:class:`GaussianLikelihood` with ``squash=True``; its one option is ``min_scale`` (declared
    here, so that another option is refused by name, not a TypeError)."""
    return GaussianLikelihood(event_dims, squash=True, min_scale=min_scale)


LIKELIHOODS.register("gaussian_fixed")(FixedScaleGaussianLikelihood)
LIKELIHOODS.register("laplace")(LaplaceLikelihood)


def make_likelihood(name: str, event_dims: int = 1, **options) -> Likelihood:
    """Build a registered likelihood by name; options go to its constructor (unknown ones:
    ValueError naming them, as for priors)."""
    from ppl_vae.models.priors import check_options

    factory = LIKELIHOODS.get(name)
    check_options("likelihood", name, factory, options, skip=1)
    return factory(event_dims=event_dims, **options)
