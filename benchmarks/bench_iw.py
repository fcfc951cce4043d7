"""IW evaluation speed: ppl_vae's importance_estimate against a hand-written vectorized estimator.

Both compute log (1/K) sum_k p(x, z_k) / q(z_k|x) for the same trained-shape network
(bernoulli_mlp 784-500-20) with the same chunking over particles; calls alternate in one
process and the script prints the time ratio ppl_vae / hand-written (median and range).

    python benchmarks/bench_iw.py --num-samples 1000 --repeats 5
"""

from __future__ import annotations

import math
import statistics

import torch
from common import base_parser, interleave, setup, summarize
from torch.distributions import Normal

from ppl_vae.inference.importance import default_particle_batch_size, importance_estimate
from ppl_vae.models import build_vae


@torch.no_grad()
def handwritten_iw(vae, x: torch.Tensor, num_samples: int, batch_size: int, particle_batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        loc, scale = vae.encoder(xb)
        chunks = []
        for k0 in range(0, num_samples, particle_batch_size):
            k = min(particle_batch_size, num_samples - k0)
            z = loc + scale * torch.randn((k, *loc.shape), device=x.device)
            (logits,) = vae.decoder(z)
            log_px = (
                -torch.nn.functional.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none")
                .flatten(2)
                .sum(-1)
            )
            log_w = log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(loc, scale).log_prob(z).sum(-1)
            chunks.append(torch.logsumexp(log_w, 0))
        out.append(torch.logsumexp(torch.stack(chunks), 0) - math.log(num_samples))
    return torch.cat(out)


def main() -> None:
    parser = base_parser(__doc__, num_data=200, repeats=5)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    device, x = setup(args)
    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", x.shape[1:], latent_dim=20, hidden_dim=500).to(device).eval()
    pbs = default_particle_batch_size(args.batch_size)
    print(
        f"data {tuple(x.shape)} on {device}, K={args.num_samples}, {args.batch_size} datapoints x {pbs} particles per chunk"
    )

    def ours():
        return importance_estimate(
            vae.model, vae.guide, x, num_samples=args.num_samples, batch_size=args.batch_size, particle_batch_size=pbs
        ).log_px

    def theirs():
        return handwritten_iw(vae, x, args.num_samples, args.batch_size, pbs)

    a, b = ours(), theirs()  # warm-up, and a check that both estimate the same thing
    print(f"mean log p(x): ppl_vae {a.mean():.3f}, hand-written {b.mean():.3f} (independent draws)")
    ratios, t_ours, t_theirs = interleave(ours, theirs, args.repeats, device)
    print(f"ppl_vae {statistics.median(t_ours):.3f} s, hand-written {statistics.median(t_theirs):.3f} s per evaluation")
    print(summarize(f"IW K={args.num_samples} ratio ppl_vae/hand-written", ratios))


if __name__ == "__main__":
    main()
