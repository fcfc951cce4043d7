"""Figures of merit and qualitative checks of a character-level text VAE (Semeniuta et al. 2017).

- bits per character: -log2 p(x) per scored symbol (the characters and the end-of-text token),
  over a whole corpus, bounded with the ELBO and estimated with the importance-weighted bound
  of Burda et al. (2015);
- KL(q(z|x) || p(z)) per sentence (nats): well above zero means z carries information about
  the sentence (no posterior collapse);
- sentences decoded from prior samples, and from points on the line between the posterior
  means of two sentences (interpolation).
"""

from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from ppl_vae.data.text import END_INDEX, decode_indices, encode_text, normalize_text
from ppl_vae.inference.importance import elbo_per_datapoint, iw_log_px
from ppl_vae.inference.modes import eval_mode


def num_scored_characters(x: Tensor) -> Tensor:
    """Symbols each sentence is scored on: its characters and its end token, ``(N,)``."""
    x = x.long()
    is_end = (x == END_INDEX).long()
    after = (is_end.cumsum(-1) - is_end) > 0
    return (~after).sum(-1)


@torch.no_grad()
def kl_per_datapoint(vae, x: Tensor, num_samples: int = 16) -> Tensor:
    """Monte Carlo KL(q(z|x) || p(z)) of each sentence in nats, ``(N,)`` (any prior)."""
    loc, scale = vae.encode(x)
    q = torch.distributions.Normal(loc, scale)
    z = q.sample((num_samples,))
    return (q.log_prob(z).sum(-1) - vae.prior().log_prob(z)).mean(0)


def ratio_se(numerator: Tensor, denominator: Tensor) -> float:
    """Standard error over sentences of the ratio estimator sum(numerator) / sum(denominator)
    (bits per character: nats of each sentence over its symbols), by the delta method:
    sqrt(n / (n - 1) * sum((a_i - r c_i)^2)) / sum(c_i); NaN for one sentence."""
    a, c = numerator.double().reshape(-1), denominator.double().reshape(-1)
    n = a.numel()
    if n < 2:
        return math.nan
    r = a.sum() / c.sum()
    return float(torch.sqrt(n / (n - 1) * ((a - r * c) ** 2).sum()) / c.sum())


@torch.no_grad()
def text_metrics(vae, x: Tensor, *, num_samples: int = 10, batch_size: int = 200) -> xr.Dataset:
    """Corpus bits per character (ELBO bound and IW estimate with ``num_samples``) and mean KL,
    each with its standard error over sentences (``*_se``; :func:`ratio_se` for the ratios).

    ``vae`` is put in eval mode, so an auxiliary training term is not counted.
    """
    with eval_mode(vae):
        elbo = elbo_per_datapoint(vae.model, vae.guide, x, num_particles=num_samples, batch_size=batch_size)
        iw = iw_log_px(vae.model, vae.guide, x, num_samples=num_samples, batch_size=batch_size)
        kl = kl_per_datapoint(vae, x, num_samples)
    symbols = num_scored_characters(x).to(elbo.device)
    chars = float(symbols.sum())
    to_bits = 1.0 / (chars * math.log(2.0))
    bits = 1.0 / math.log(2.0)
    n = kl.numel()
    over = "standard error over sentences"
    return xr.Dataset(
        {
            "bits_per_character_elbo_se": ((), ratio_se(-elbo * bits, symbols), {"description": over}),
            "bits_per_character_iw_se": ((), ratio_se(-iw * bits, symbols), {"description": over}),
            "kl_se": ((), float(kl.std()) / math.sqrt(n) if n > 1 else math.nan, {"description": over}),
            "bits_per_character_elbo": (
                (),
                -float(elbo.sum()) * to_bits,
                {"description": "-ELBO in bits per scored symbol (an upper bound)"},
            ),
            "bits_per_character_iw": (
                (),
                -float(iw.sum()) * to_bits,
                {"description": f"-IW bound (K={num_samples}) in bits per scored symbol (a stochastic upper bound)"},
            ),
            "kl": (
                (),
                float(kl.mean()),
                {"description": "mean KL(q(z|x) || p(z)) per sentence, nats (a Monte Carlo estimate)"},
            ),
            "kl_bits_per_character": (
                (),
                float(kl.sum()) * to_bits,
                {"description": "KL share of the bits per character"},
            ),
        },
        attrs={"num_sentences": int(len(x)), "num_scored_characters": int(chars), "num_samples": num_samples},
    )


@torch.no_grad()
def sample_sentences(vae, num_samples: int, temperature: float = 0.0) -> List[str]:
    """Sentences decoded from z ~ p(z) (greedy at ``temperature=0``)."""
    vae.eval()
    return [decode_indices(row) for row in vae.sample(num_samples, temperature=temperature)]


@torch.no_grad()
def check_endpoints(vae, first: str, second: str) -> None:
    """Refuse an interpolation endpoint the model never read: the corpus loaders keep sentences
    of 1 to length - 1 characters (room for the end token); a longer one would be cut without
    its end token, an empty one is padding alone."""
    length = vae.event_shape[0]
    for which, sentence in (("first", first), ("second", second)):
        n = len(normalize_text(sentence))
        if not 0 < n < length:
            raise ValueError(
                f"the {which} sentence has {n} characters; the model reads sentences of 1 to {length - 1} "
                "(with their end token), as it was trained"
            )


def interpolate_sentences(vae, first: str, second: str, num_steps: int = 5) -> List[str]:
    """Greedy decodings of ``num_steps`` points evenly spaced from E_q[z|first] to E_q[z|second]."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    check_endpoints(vae, first, second)
    length = vae.event_shape[0]
    vae.eval()
    device = next(vae.parameters()).device
    x = torch.from_numpy(np.stack([encode_text(first, length), encode_text(second, length)])).float().to(device)
    loc, _ = vae.encode(x)
    w = torch.linspace(0.0, 1.0, num_steps, device=device)[:, None]
    z = (1 - w) * loc[0] + w * loc[1]
    return [decode_indices(row) for row in vae.decode(z)]
