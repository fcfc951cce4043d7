"""The wake-sleep algorithm (Hinton et al. 1995) with AEVB's encoder: the paper's baseline.

Kingma & Welling (2013), section 5 compare AEVB with wake-sleep "using the same encoder
(recognition model)". One minibatch update has two phases:

- wake: z ~ q(z|x) for the data (no gradient through the sample), and the generative model
  (decoder, prior, likelihood parameters) takes a step up log p(x, z);
- sleep: (z, x) are dreamed from the model, z ~ p(z), x ~ p(x|z), and the encoder takes a
  step up log q(z|x) on the dreams.

This is the paper's wake-sleep, not Pyro's ReweightedWakeSleep (one sample per datapoint, no
importance weights). The loss it reports is the negative ELBO of the minibatch (scaled to the
full data), computed from the wake phase's samples, so its history compares with AEVB's.
"""

from __future__ import annotations

import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference.fused import supports_fused_elbo
from ppl_vae.inference.training import METHODS, OPTIMIZERS, NonFiniteLoss, Stepper
from ppl_vae.models.vae import VAE


def generative_parameters(vae: VAE) -> list:
    """Every parameter of ``vae`` outside its encoder (decoder, prior, likelihood)."""
    encoder_ids = {id(p) for p in vae.encoder.parameters()}
    return [p for p in vae.parameters() if id(p) not in encoder_ids]


@METHODS.register("wake-sleep", doc="wake-sleep (Hinton et al. 1995) with AEVB's encoder: the paper's baseline")
class WakeSleepStepper(Stepper):
    """One wake step for the generative model and one sleep step for the encoder per minibatch.

    ``optimizers``: "wake" (decoder, prior and likelihood parameters) and "sleep" (encoder),
    both of ``config.optimizer`` with ``config.lr``. The number of dreams per sleep step is
    the minibatch size. KL warm-up has no meaning here and is refused.
    """

    def __init__(self, vae: VAE, config: TrainConfig):
        if not (supports_fused_elbo(vae) and getattr(vae, "encoder_is_guide", False)):
            raise ValueError(
                f"method 'wake-sleep' needs a VAE built from parts with the base class's model and "
                f"guide (it calls the encoder and decoder directly); {type(vae).__name__} declares has_fast_path=False or a guide "
                f"that is not its encoder's Gaussian (encoder_is_guide=False)"
            )
        if config.kl_warmup_epochs:
            raise ValueError("kl_warmup_epochs must be 0 for method 'wake-sleep' (it optimizes no KL term)")
        if vae.prior.uses_encoder:  # e.g. the VampPrior evaluates the encoder
            raise ValueError(
                f"method 'wake-sleep' needs a prior that does not use the model's other parts "
                f"({type(vae.prior).__name__} does): its wake phase would train the encoder"
            )
        self.vae = vae
        make = OPTIMIZERS.get(config.optimizer)
        self.optimizers = {
            "wake": make(generative_parameters(vae), lr=config.lr),
            "sleep": make(vae.encoder.parameters(), lr=config.lr),
        }

    def step(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        kwargs.pop("y", None)  # labels: the base VAE's model ignores them
        if kwargs:
            raise ValueError(f"method 'wake-sleep' takes no model arguments, got {', '.join(kwargs)}")
        vae = self.vae
        scale = num_data / x.shape[0]
        # Wake phase: the generative model fits the encoder's guesses of z.
        with torch.no_grad():
            loc, q_scale = vae.encoder(x)
            q = torch.distributions.Normal(loc, q_scale)
            z = q.sample()
            log_q = q.log_prob(z).sum(-1)
        log_joint = vae.prior().log_prob(z) + vae.likelihood(*vae.decoder(z)).log_prob(x)
        wake_loss = -scale * log_joint.sum()
        loss = (wake_loss + scale * log_q.sum()).detach()  # negative ELBO, one sample per datapoint
        if not torch.isfinite(loss):
            raise NonFiniteLoss(float(loss))
        # Sleep phase: dreams from the model (before the wake update, as one joint step).
        with torch.no_grad():
            z_dream = vae.prior().sample((x.shape[0],))
            x_dream = vae.likelihood(*vae.decoder(z_dream)).sample()
        d_loc, d_scale = vae.encoder(x_dream)
        sleep_loss = -scale * torch.distributions.Normal(d_loc, d_scale).log_prob(z_dream).sum()
        if not torch.isfinite(sleep_loss):
            raise NonFiniteLoss(float(sleep_loss))
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        (wake_loss + sleep_loss).backward()  # disjoint parameters: each phase gets its own gradient
        for optimizer in self.optimizers.values():
            optimizer.step()
        return loss
