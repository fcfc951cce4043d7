"""Monte Carlo EM with HMC (Kingma & Welling 2013, appendix E): the paper's non-amortized baseline.

Per minibatch, the E-step draws z ~ p(z|x) for each datapoint by Pyro's HMC with the
generative model frozen (10 leapfrog steps, step size adapted to about 90% acceptance); the
M-step then takes 5 optimizer steps up the complete-data log-likelihood log p(x, z) at those
samples (the Monte Carlo estimate of EM's Q function). Its cost grows with the latent
dimension and the data, so it is meant for small latent dimensions, as in the paper's figure 3.

The encoder plays no part in the paper's MCEM. Here it is fitted to the HMC samples (a step up
log q(z|x)), which starts each E-step's chain near the posterior and gives the training
history a meaningful ELBO; the decoder's updates are the paper's.
"""

from __future__ import annotations

from typing import Optional

import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference.fused import supports_fused_elbo
from ppl_vae.inference.marginal import hmc_posterior
from ppl_vae.inference.training import METHODS, OPTIMIZERS, NonFiniteLoss, Stepper
from ppl_vae.inference.wake_sleep import generative_parameters
from ppl_vae.models.vae import VAE

MAX_LATENT_DIM = 20


@METHODS.register("mcem", doc="Monte Carlo EM, HMC E-step (AEVB appendix E); small latent dims")
class MCEMStepper(Stepper):
    """E-step by HMC on z, then ``num_weight_updates`` steps on log p(x, z) per minibatch.

    ``optimizers``: "mcem" (decoder, prior and likelihood parameters) and "encoder" (fitted
    to the HMC samples). ``num_steps``: leapfrog steps per HMC proposal; ``warmup_steps``:
    HMC iterations that adapt the step size toward ``target_accept_prob`` (the adapted step
    size carries over to the next E-step); ``num_hmc_samples``: HMC iterations after warm-up,
    of which the last is the E-step's sample.
    """

    def __init__(
        self,
        vae: VAE,
        config: TrainConfig,
        *,
        num_steps: int = 10,
        warmup_steps: int = 10,
        num_hmc_samples: int = 1,
        target_accept_prob: float = 0.9,
        num_weight_updates: int = 5,
    ):
        if not (supports_fused_elbo(vae) and getattr(vae, "encoder_is_guide", False)):
            raise ValueError(
                f"method 'mcem' needs a VAE built from parts with the base class's model and "
                f"guide (it calls the encoder and decoder directly); {type(vae).__name__} declares has_fast_path=False or a guide "
                f"that is not its encoder's Gaussian (encoder_is_guide=False)"
            )
        if config.kl_warmup_epochs:
            raise ValueError("kl_warmup_epochs must be 0 for method 'mcem' (it optimizes no KL term)")
        if vae.latent_dim > MAX_LATENT_DIM:
            raise ValueError(
                f"method 'mcem' is for small latent dimensions (<= {MAX_LATENT_DIM}), got {vae.latent_dim}"
            )
        if num_weight_updates < 1:
            raise ValueError(f"num_weight_updates must be >= 1, got {num_weight_updates}")
        self.vae = vae
        self.num_steps = num_steps
        self.warmup_steps = warmup_steps
        self.num_hmc_samples = num_hmc_samples
        self.target_accept_prob = target_accept_prob
        self.num_weight_updates = num_weight_updates
        self.step_size: Optional[float] = None
        self.accept_rate = float("nan")
        make = OPTIMIZERS.get(config.optimizer)
        self._generative = generative_parameters(vae)
        self.optimizers = {
            "mcem": make(self._generative, lr=config.lr),
            "encoder": make(vae.encoder.parameters(), lr=config.lr),
        }

    def e_step(self, x: torch.Tensor) -> torch.Tensor:
        """One HMC sample of z ~ p(z|x) per datapoint, ``(N, latent_dim)``, with the model frozen."""
        vae = self.vae
        with torch.no_grad():
            z0 = vae.encoder(x)[0]
        flags = [p.requires_grad for p in self._generative]
        for p in self._generative:
            p.requires_grad_(False)  # gradients w.r.t. z only during HMC
        try:
            result = hmc_posterior(
                vae.model,
                x,
                vae.latent_dim,
                num_samples=self.num_hmc_samples,
                warmup_steps=self.warmup_steps,
                num_steps=self.num_steps,
                target_accept_prob=self.target_accept_prob,
                step_size=self.step_size,
                initial_z=z0,
            )
        finally:
            for p, flag in zip(self._generative, flags):
                p.requires_grad_(flag)
        self.step_size = result.step_size
        self.accept_rate = result.accept_rate
        return result.samples[-1]

    def step(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        kwargs.pop("y", None)  # labels: the base VAE's model ignores them
        if kwargs:
            raise ValueError(f"method 'mcem' takes no model arguments, got {', '.join(kwargs)}")
        z = self.e_step(x)
        scale = num_data / x.shape[0]
        optimizer = self.optimizers["mcem"]
        first = None
        for _ in range(self.num_weight_updates):
            loss = -scale * self.vae.log_joint(x, {"z": z}).sum()  # the fast-path protocol (checked in __init__)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(float(loss))
            first = loss.detach() if first is None else first
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loc, q_scale = self.vae.encoder(x)
        enc_loss = -scale * torch.distributions.Normal(loc, q_scale).log_prob(z).sum()
        if torch.isfinite(enc_loss):
            enc_opt = self.optimizers["encoder"]
            enc_opt.zero_grad(set_to_none=True)
            enc_loss.backward()
            enc_opt.step()
        assert first is not None  # num_weight_updates >= 1 (checked in __init__)
        return first
