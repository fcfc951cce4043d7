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

from typing import Dict, FrozenSet, Iterator

import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference.training import METHODS, Stepper, Update, make_optimizer
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
    the minibatch size. It optimizes no KL term, so the KL schedule's settings are refused.
    """

    label = "method 'wake-sleep'"
    loss_meaning = "the negative one-draw ELBO of the wake phase (the sleep phase's loss not included)"

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        # it calls the encoder and decoder directly; a prior that evaluates the encoder
        # (the VampPrior) would have its wake phase train the encoder
        return frozenset({"fast_path", "encoder_guide", "prior_apart_from_encoder"})

    def make_optimizers(self, vae: VAE, config: TrainConfig) -> Dict[str, torch.optim.Optimizer]:
        return {
            "wake": make_optimizer(generative_parameters(vae), config),
            "sleep": make_optimizer(vae.encoder, config),
        }

    def updates(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> Iterator[Update]:
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
        elbo_loss = (wake_loss + scale * log_q.sum()).detach()  # negative ELBO, one sample per datapoint
        # Sleep phase: dreams from the model (before the wake update, as one joint step).
        with torch.no_grad():
            z_dream = vae.prior().sample((x.shape[0],))
            x_dream = vae.likelihood(*vae.decoder(z_dream)).sample()
        d_loc, d_scale = vae.encoder(x_dream)
        sleep_loss = -scale * torch.distributions.Normal(d_loc, d_scale).log_prob(z_dream).sum()
        # disjoint parameters: each phase's optimizer gets its own gradient from the one backward
        yield Update(wake_loss + sleep_loss, value=elbo_loss)
