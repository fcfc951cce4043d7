"""Does torch.compile pay for IW scoring? The library's eager log p(x | z) against the same chunk
compiled with inductor.

Three ways to compute log p(x | z) for K draws of z per image (from the encoder's q(z|x)), one
block of the library's size at a time (``VAE.score_block_samples`` draws, the size it chose for
the cache):

- ``ppl_vae``: ``VAE.log_likelihood`` of all K draws in eval mode without autograd, which
  blocks them itself (the Bernoulli scorer's matrix-vector x term, the grouped softplus sum,
  tanh as 2 sigmoid(2x) - 1);
- ``plain``: the chunk as a careful user writes it, ``tanh``, the logits and
  ``(x * l - softplus(l)).sum(-1)``;
- ``compiled``: ``torch.compile(plain)`` (inductor, static shapes), whose compile time is
  printed, with the number of evaluations of this size it takes to earn it back, if any.

Calls alternate ``--repeats`` times in one process; prints the medians, the ratios and the
load average. Needs a C++ compiler for inductor on CPU.

    python benchmarks/bench_compile_scorer.py --run RUN --threads 1
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import base_parser, loadavg, machine_description, setup


def main() -> None:
    parser = base_parser(__doc__, num_data=100, repeats=7)
    parser.add_argument("--run", default=None, help="a run directory (bernoulli_mlp): its weights and test images")
    parser.add_argument("--num-samples", type=int, default=1000, help="draws of z per image (K)")
    args = parser.parse_args()
    if args.run:  # the run's own test images: no other data is loaded
        from ppl_vae.pipeline import load_run
        from ppl_vae.reports.common import select_datapoints

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        print(f"machine: {machine_description()}")
        run = load_run(args.run, str(device))
        vae, x = run.vae, select_datapoints(run, "test", args.num_data, seed=0).x
    else:
        from ppl_vae.models import build_vae

        device, x = setup(args)
        torch.manual_seed(0)
        vae = build_vae("bernoulli_mlp", x.shape[1:], latent_dim=20, hidden_dim=500).to(device)
    vae.eval()
    net = vae.decoder.net
    if len(net) != 3 or not isinstance(net[1], torch.nn.Tanh):
        raise SystemExit("needs a one-hidden-layer tanh decoder (bernoulli_mlp)")
    w1, b1, w2, b2 = (t.detach() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    flat = x.reshape(x.shape[0], -1)
    n, d = x.shape[0], w1.shape[1]
    block = max(1, int(vae.score_block_samples) * torch.get_num_threads())
    per_block = max(1, block // n)
    steps = max(1, args.num_samples // per_block)
    with torch.no_grad():  # draws from the amortized posterior, as IW makes them
        loc, scale = vae.encoder(x)
        z_all = loc + scale * torch.randn(steps * per_block, n, d, device=device)
    z = z_all[:per_block]

    def plain(zb: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(zb @ w1.t() + b1) @ w2.t() + b2
        return (flat * logits - F.softplus(logits)).sum(-1)

    def ours(zb: torch.Tensor) -> torch.Tensor:  # the library blocks the draws itself
        return vae.log_likelihood(x, {"z": zb})

    def blocked(fn):
        def run() -> None:
            for k0 in range(0, z_all.shape[0], per_block):
                fn(z_all[k0 : k0 + per_block])

        return run

    with torch.no_grad():
        start = time.perf_counter()
        compiled = torch.compile(plain, dynamic=False)
        compiled(z)
        compile_s = time.perf_counter() - start
        a, b, c = ours(z), plain(z), compiled(z)
        scale = b.abs().max().item()
        print(
            f"load average {loadavg()}; {torch.get_num_threads()} thread(s); block: {per_block} draws x {n} images "
            f"(score_block_samples {vae.score_block_samples}); latent {d}, hidden {w1.shape[0]}, pixels {flat.shape[1]}"
        )
        print(
            f"max |difference| from plain: ppl_vae {(a - b).abs().max().item():.2e}, compiled "
            f"{(c - b).abs().max().item():.2e} (|log p(x|z)| up to {scale:.1f})"
        )
        times = {"ppl_vae": [], "plain": [], "compiled": []}
        for _ in range(args.repeats):
            for name, fn in (
                ("plain", blocked(plain)),
                ("ppl_vae", lambda: ours(z_all)),
                ("compiled", blocked(compiled)),
            ):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"seconds for K = {z_all.shape[0]} draws of {n} images (median):")
    for name, t in med.items():
        print(f"  {name:9s} {t:.3f} s   plain / {name} = {med['plain'] / t:.3f}x")
    saved = med["plain"] - med["compiled"]
    earn = f"{compile_s / saved:.0f} such evaluations" if saved > 0 else "never (compiled is not faster than plain)"
    print(f"compile time {compile_s:.1f} s; earned back against plain after {earn}")
    print(f"ppl_vae / compiled = {med['ppl_vae'] / med['compiled']:.3f} (below 1: the eager library is faster)")
    print(f"load average {loadavg()}")


if __name__ == "__main__":
    main()
