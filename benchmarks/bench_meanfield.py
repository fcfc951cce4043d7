"""Mean-field VI speed: ppl_vae's fit_mean_field against a hand-written vectorized loop.

Both fit a diagonal Gaussian q_i(z) to each of N datapoints at once (Adam, analytic KL,
one sample per step, the decoder frozen) for the same number of steps; calls alternate in one
process and the script prints the time ratio ppl_vae / hand-written (median and range).

    python benchmarks/bench_meanfield.py --num-data 1000 --steps 200 --repeats 3
"""

from __future__ import annotations

import statistics

import torch
from common import base_parser, interleave, setup, summarize
from torch.distributions import Normal, kl_divergence

from ppl_vae.inference.meanfield import fit_mean_field
from ppl_vae.models import build_vae


def handwritten_mean_field(vae, x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    with torch.no_grad():
        loc0, scale0 = vae.encoder(x)
    loc = loc0.clone().requires_grad_(True)
    log_scale = scale0.log().clone().requires_grad_(True)
    optim = torch.optim.Adam([loc, log_scale], lr=lr)
    prior = Normal(torch.zeros_like(loc0), torch.ones_like(loc0))
    for _ in range(steps):
        q = Normal(loc, log_scale.exp())
        z = q.rsample()
        (logits,) = vae.decoder(z)
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
        loss = -(log_px - kl_divergence(q, prior).sum(-1)).sum()
        grads = torch.autograd.grad(loss, [loc, log_scale])
        optim.zero_grad(set_to_none=True)
        loc.grad, log_scale.grad = grads
        optim.step()
    return loc.detach()


def main() -> None:
    parser = base_parser(__doc__, num_data=1000, repeats=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device, x = setup(args)
    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", x.shape[1:], latent_dim=20, hidden_dim=500).to(device).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    print(f"{args.num_data} datapoints on {device}, {args.steps} steps each, all datapoints in one batch")

    def ours():
        # a window longer than the run: no plateau check stops it, so both sides take args.steps Adam steps
        result = fit_mean_field(
            vae.model,
            vae.guide,
            x,
            max_steps=args.steps,
            tol=0.0,
            num_lr_decays=0,
            window=args.steps + 1,
            batch_size=args.num_data,
            num_eval_samples=1,
            polish=False,
            progress=False,
        )
        assert int(result.num_steps[0]) == args.steps, int(result.num_steps[0])

    def theirs():
        handwritten_mean_field(vae, x, args.steps, lr=1e-2)

    ratios, t_ours, t_theirs = interleave(ours, theirs, args.repeats, device)
    print(f"ppl_vae {statistics.median(t_ours):.3f} s, hand-written {statistics.median(t_theirs):.3f} s per fit")
    print(summarize("mean-field VI ratio ppl_vae/hand-written", ratios))


if __name__ == "__main__":
    main()
