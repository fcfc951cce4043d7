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

import math
from typing import Annotated, Any, Dict, FrozenSet, Iterator, Optional

import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference.marginal import hmc_posterior
from ppl_vae.inference.training import METHODS, Stepper, Update, make_optimizer
from ppl_vae.inference.wake_sleep import generative_parameters
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import PositiveInt, Range, check_keyword_options


@METHODS.register("mcem", doc="Monte Carlo EM, HMC E-step (AEVB appendix E); small latent dims")
class MCEMStepper(Stepper):
    """E-step by HMC on z, then ``num_weight_updates`` steps on log p(x, z) per minibatch.

    ``optimizers``: "mcem" (decoder, prior and likelihood parameters) and "encoder" (fitted
    to the HMC samples). ``num_leapfrog_steps``: leapfrog steps per HMC proposal; ``warmup_steps``:
    HMC iterations that adapt the step size toward ``target_accept_prob`` (the adapted step
    size carries over to the next E-step); ``num_hmc_samples``: HMC iterations after warm-up,
    of which the last is the E-step's sample. These are the method's options
    (``train.method_options``, ``--method-option num_leapfrog_steps=20``), declared here once.
    """

    label = "method 'mcem'"
    loss_meaning = "-log p(x, z) at the E-step's HMC draw of z (the M-step's first loss): not a bound on log p(x)"

    def __init__(
        self,
        vae: VAE,
        config: TrainConfig,
        *,
        num_leapfrog_steps: PositiveInt = 10,
        warmup_steps: Annotated[int, Range(0)] = 10,
        num_hmc_samples: PositiveInt = 1,
        target_accept_prob: Annotated[float, Range(0.0, 1.0, low_open=True, high_open=True)] = 0.9,
        num_weight_updates: PositiveInt = 5,
    ):
        check_keyword_options(  # the same declaration train.method_options is checked against
            "method 'mcem'",
            MCEMStepper.__init__,
            dict(
                num_leapfrog_steps=num_leapfrog_steps,
                warmup_steps=warmup_steps,
                num_hmc_samples=num_hmc_samples,
                target_accept_prob=target_accept_prob,
                num_weight_updates=num_weight_updates,
            ),
        )
        self.vae = vae
        self.num_leapfrog_steps = num_leapfrog_steps
        self.warmup_steps = warmup_steps
        self.num_hmc_samples = num_hmc_samples
        self.target_accept_prob = target_accept_prob
        self.num_weight_updates = num_weight_updates
        self.step_size: Optional[float] = None
        self.accept_rate = float("nan")
        self._generative = generative_parameters(vae)
        super().__init__(vae, config)

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        # it calls the encoder and decoder directly, and its HMC runs over z of a small dimension
        return frozenset({"fast_path", "encoder_guide", "small_latent"})

    def make_optimizers(self, vae: VAE, config: TrainConfig) -> Dict[str, torch.optim.Optimizer]:
        return {
            "mcem": make_optimizer(self._generative, config),
            "encoder": make_optimizer(vae.encoder, config),
        }

    def method_state(self) -> Dict[str, Any]:
        return {"step_size": self.step_size}  # adapted over the E-steps so far: a resume goes on from it

    def load_method_state(self, state: Dict[str, Any]) -> None:
        step_size = state.get("step_size")
        number = isinstance(step_size, (int, float)) and not isinstance(step_size, bool)
        if set(state) - {"step_size"} or not (step_size is None or (number and 0 < step_size < math.inf)):
            raise ValueError(
                f"{self.describe()}: a checkpoint's method state must be {{'step_size': a finite number > 0}}, got {state}"
            )
        self.step_size = None if step_size is None else float(step_size)

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
                num_leapfrog_steps=self.num_leapfrog_steps,
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

    def updates(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> Iterator[Update]:
        kwargs.pop("y", None)  # labels: the base VAE's model ignores them
        if kwargs:
            raise ValueError(f"method 'mcem' takes no model arguments, got {', '.join(kwargs)}")
        z = self.e_step(x)
        scale = num_data / x.shape[0]
        for _ in range(self.num_weight_updates):
            loss = -scale * self.vae.log_joint(x, {"z": z}).sum()  # the fast-path protocol (a declared need)
            yield Update(loss, optimizers=("mcem",))
        loc, q_scale = self.vae.encoder(x)
        yield Update(-scale * torch.distributions.Normal(loc, q_scale).log_prob(z).sum(), optimizers=("encoder",))
