"""The semi-amortized VAE (Kim, Wiseman, Miller, Sontag & Rush 2018, "Semi-Amortized Variational
Autoencoders", algorithm 1) as the training method ``sa``.

Per minibatch: the encoder gives lambda_0 = (mu, log sigma) for every datapoint; K steps of
gradient ascent on each datapoint's own ELBO, lambda_{k+1} = lambda_k + alpha * grad_lambda
ELBO(lambda_k, theta; x), each with one fresh reparameterized draw, refine it to lambda_K; the
loss is -ELBO(lambda_K, theta; x). The steps are taken with ``create_graph=True``, so lambda_K is
a differentiable function of the encoder's output and of the decoder's parameters, and one
backward pass gives what the paper's algorithm 1 computes by its reverse loop:

- the decoder (and prior, likelihood) parameters theta: the total derivative d ELBO(lambda_K,
  theta)/d theta, the direct term plus the terms through the unrolled steps (the paper's
  H_{theta,lambda} products);
- the encoder phi: d ELBO(lambda_K)/d lambda_0 backpropagated through the K steps (the paper's
  H_{lambda,lambda} products, exact here where the paper's code took finite differences) and
  then through lambda_0 = enc(x; phi).

This is the paper's end-to-end variant (its code's ``train_n2n=1``); the encoder is *not* also
trained on the ELBO at its own output. The inner steps are plain SGD without momentum (the paper
uses momentum 0.5) and, as in the paper's code, each datapoint's gradient is clipped to norm
``sa_max_grad_norm`` before its step, so that one large gradient cannot throw a datapoint far.
The KL warm-up weight scales the KL term in the inner steps and in the loss alike (the paper
anneals it too). The KL of q = N(mu, sigma^2) to the prior is in closed form where torch knows
it, else the prior term is one Monte Carlo draw with the Gaussian entropy in closed form.

Each step costs about (K + 1) forward passes and 2 (K + 1) backward passes of the decoder;
:func:`ppl_vae.inference.refine.refine` is the same refinement at evaluation time, model frozen.
"""

from __future__ import annotations

from typing import Annotated, FrozenSet, Optional, Tuple

import torch
from pyro import distributions as dist
from torch import Tensor
from torch.distributions import kl_divergence

from ppl_vae.config import TrainConfig
from ppl_vae.inference.capabilities import KL_FIELDS
from ppl_vae.inference.training import METHODS, Stepper
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import PositiveFloat, PositiveInt, Range, check_keyword_options


def gaussian_elbo(vae: VAE, x: Tensor, loc: Tensor, log_scale: Tensor, kl_weight: float = 1.0) -> Tensor:
    """One-draw ELBO of each datapoint under q = N(loc, diag(exp(log_scale)^2)), ``(N,)``:
    log p(x | z) at z = loc + scale * eps minus ``kl_weight`` times KL(q || p(z)) (closed form
    where torch knows it; else log q(z) - log p(z) with the entropy of q in closed form)."""
    scale = log_scale.exp()
    z = loc + scale * torch.randn_like(loc)
    log_lik = vae.log_likelihood(x, {"z": z})
    q = dist.Normal(loc, scale).to_event(1)
    try:
        kl = kl_divergence(q, vae.prior())
    except NotImplementedError:  # e.g. a mixture prior: its log-density at the draw
        kl = -q.entropy() - vae.log_prior(x, {"z": z})
    return log_lik - kl_weight * kl


def refine_unrolled(
    vae: VAE,
    x: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    *,
    num_steps: int,
    lr: float,
    max_grad_norm: Optional[float] = None,
    kl_weight: float = 1.0,
    create_graph: bool = True,
) -> Tuple[Tensor, Tensor]:
    """(loc, log_scale) after ``num_steps`` SGD steps up each datapoint's one-draw ELBO.

    With ``create_graph`` the result is differentiable with respect to the starting point and to
    ``vae``'s parameters (the graph holds every step); without it each step's gradient is a
    constant, so d(result)/d(start) is the identity (a first-order approximation). ``max_grad_norm``: each datapoint's
    gradient (over loc and log_scale together) is scaled down to at most this norm.
    """
    with torch.enable_grad():  # the steps need gradients even where the caller turned them off
        if not (loc.requires_grad and log_scale.requires_grad):  # a detached start: steps from a leaf
            loc, log_scale = loc.detach().requires_grad_(True), log_scale.detach().requires_grad_(True)
        for _ in range(num_steps):
            elbo = gaussian_elbo(vae, x, loc, log_scale, kl_weight).sum()  # datapoint i's terms: row i only
            g_loc, g_log_scale = torch.autograd.grad(elbo, (loc, log_scale), create_graph=create_graph)
            if max_grad_norm is not None:
                # + 1e-20 inside the root: its derivative stays finite at a zero gradient (double backward)
                norm = (g_loc.pow(2).sum(-1) + g_log_scale.pow(2).sum(-1) + 1e-20).sqrt().unsqueeze(-1)
                factor = (max_grad_norm / norm).clamp(max=1.0)
                g_loc, g_log_scale = g_loc * factor, g_log_scale * factor
            loc, log_scale = loc + lr * g_loc, log_scale + lr * g_log_scale
    return loc, log_scale


@METHODS.register(
    "sa", doc="semi-amortized VAE (Kim et al. 2018): K unrolled SGD steps refine q(z|x), trained end to end"
)
class SemiAmortizedStepper(Stepper):
    """SA-VAE's loss: -ELBO at the encoder's output refined by ``sa_steps`` SGD steps (see the module).

    Options (``train.method_options``, ``--method-option sa_steps=10``), declared here once:
    ``sa_steps`` K, the number of inner steps; ``sa_lr`` their step size alpha;
    ``sa_max_grad_norm`` the per-datapoint gradient clip (null: none). One optimizer over every
    parameter; the KL warm-up settings apply.
    """

    label = "method 'sa'"
    loss_meaning = "the negative ELBO, with its KL weight, at the encoder's output refined by sa_steps SGD steps"
    # DDP's gradient hooks are not made for the double backward through the unrolled steps: untried
    data_parallel = False
    # the loss calls torch.autograd.grad with create_graph=True; torch.compile cannot trace double backward
    compilable = False
    uses = KL_FIELDS

    def __init__(
        self,
        vae: VAE,
        config: TrainConfig,
        *,
        sa_steps: PositiveInt = 10,
        sa_lr: PositiveFloat = 0.1,
        sa_max_grad_norm: Optional[Annotated[float, Range(0.0, low_open=True)]] = 5.0,
    ):
        check_keyword_options(  # the same declaration train.method_options is checked against
            "method 'sa'",
            SemiAmortizedStepper.__init__,
            dict(sa_steps=sa_steps, sa_lr=sa_lr, sa_max_grad_norm=sa_max_grad_norm),
        )
        self.sa_steps = sa_steps
        self.sa_lr = float(sa_lr)
        self.sa_max_grad_norm = None if sa_max_grad_norm is None else float(sa_max_grad_norm)
        super().__init__(vae, config)

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        # it refines the encoder's one Gaussian (mu, log sigma) per datapoint and scores it with the
        # model's per-datapoint log densities, differentiating through the draws
        return frozenset({"fast_path", "encoder_guide", "reparameterized", "one_kl_weight"})

    def loss(self, x: Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> Tensor:
        """-ELBO at the refined (mu, log sigma), summed over the minibatch and scaled to ``num_data``."""
        kwargs.pop("y", None)  # labels: the base VAE's model ignores them
        if kwargs:
            raise ValueError(f"method 'sa' takes no model arguments, got {', '.join(kwargs)}")
        loc, scale = self.vae.encoder(x)
        loc_k, log_scale_k = refine_unrolled(
            self.vae,
            x,
            loc,
            scale.log(),
            num_steps=self.sa_steps,
            lr=self.sa_lr,
            max_grad_norm=self.sa_max_grad_norm,
            kl_weight=kl_weight,
        )
        elbo = gaussian_elbo(self.vae, x, loc_k, log_scale_k, kl_weight)
        return -elbo.sum() * (num_data / x.shape[0])


__all__ = ["SemiAmortizedStepper", "gaussian_elbo", "refine_unrolled"]
