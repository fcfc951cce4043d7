"""Training speed: ppl_vae's SVI training against a hand-written PyTorch VAE loop.

Both train the same network (bernoulli_mlp: 784-500-z tanh MLP encoder and decoder, AEVB C.1)
with Adam at the same batch size; epochs alternate between the two in one process, and the
script prints the per-epoch time ratio ppl_vae / hand-written (median and range).

    python benchmarks/bench_train.py --batch-size 128 --repeats 5 [--data-dir ../shared/datasets/mnist]
"""

from __future__ import annotations

import copy
import statistics

import torch
from common import add_tanh_option, base_parser, handwritten_epoch, setup, summarize, users_tanh

from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.inference.training import METHODS, TrainState, train
from ppl_vae.models import build_vae


def training_flops(batch_size: int, num_data: int, hidden: int, latent: int, pixels: int = 784) -> float:
    """Matrix-multiply FLOPs of one epoch of the 784-H-z MLP VAE: forward 2·B·(weights), backward
    twice that (gradients for inputs and weights), over ceil(N/B) steps (element-wise work not counted)."""
    weights = pixels * hidden + hidden * 2 * latent + latent * hidden + hidden * pixels
    return 3 * 2 * weights * num_data


def matmul_gflops(shapes, device, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of torch.matmul, best over the (m, k, n) ``shapes`` (each run for ``seconds``)."""
    import time

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = base_parser(__doc__, num_data=10000, repeats=5)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128])
    parser.add_argument("--hidden-dim", type=int, default=500)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--elbo", default="trace")
    parser.add_argument("--no-fused", action="store_true", help="train through Pyro's traced ELBO (no fused path)")
    parser.add_argument("--compile", default=None, help="torch.compile backend for the fused loss (e.g. inductor)")
    add_tanh_option(parser)
    args = parser.parse_args()
    device, x = setup(args)
    print(
        f"data: {tuple(x.shape)} on {device}; network 784-{args.hidden_dim}-{args.latent_dim}; elbo {args.elbo}"
        f"{' through Pyro tracing (no fused path)' if args.no_fused else ''}"
        f"{f'; loss compiled with torch.compile backend {args.compile}' if args.compile else ''}"
        f"; hand-written tanh: {args.hand_tanh}"
    )
    for batch_size in args.batch_size:
        torch.manual_seed(0)
        vae = build_vae("bernoulli_mlp", x.shape[1:], latent_dim=args.latent_dim, hidden_dim=args.hidden_dim).to(device)
        hand = users_tanh(copy.deepcopy(vae), args.hand_tanh)
        hand_opt = torch.optim.Adam(hand.parameters(), lr=1e-3)
        config = TrainConfig(
            epochs=0,
            batch_size=batch_size,
            elbo=args.elbo,
            device=args.device,
            fused_elbo=not args.no_fused,
            compile=args.compile,
        )
        data = Dataset("bench", x, x[:2])  # a tiny test set: evaluation is not timed anyway
        stepper = METHODS.get("svi")(vae, config)
        state = TrainState()
        # warm-up epoch for each (allocator, JIT)
        handwritten_epoch(hand, hand_opt, x, batch_size)
        config.epochs += 1
        train(vae, data, config, stepper=stepper, state=state, progress=False)
        ratios, ours, theirs = [], [], []
        for _ in range(args.repeats):
            t_hand = handwritten_epoch(hand, hand_opt, x, batch_size)
            config.epochs += 1
            history = train(vae, data, config, stepper=stepper, state=state, progress=False)
            t_ours = float(history.wall_time[-1] - history.wall_time[-2])
            ratios.append(t_ours / t_hand)
            ours.append(t_ours)
            theirs.append(t_hand)
        print(
            f"batch {batch_size}: ppl_vae {statistics.median(ours):.3f} s/epoch, hand-written "
            f"{statistics.median(theirs):.3f} s/epoch ({x.shape[0] / statistics.median(ours):.0f} vs "
            f"{x.shape[0] / statistics.median(theirs):.0f} images/s)"
        )
        print(summarize(f"batch {batch_size} ratio ppl_vae/hand-written", ratios))
        flops = training_flops(batch_size, x.shape[0], args.hidden_dim, args.latent_dim)
        peak = matmul_gflops([(2048, 2048, 2048)], device)
        shaped = matmul_gflops([(batch_size, 784, args.hidden_dim), (batch_size, args.hidden_dim, 784)], device)
        print(
            f"FLOP limit: torch.matmul sustains {peak:.1f} GFLOP/s on 2048x2048 and {shaped:.1f} GFLOP/s at this "
            f"batch's layer shapes; an epoch is {flops / 1e9:.1f} GFLOP of matrix products, so ppl_vae reaches "
            f"{flops / statistics.median(ours) / 1e9:.1f} GFLOP/s ({flops / statistics.median(ours) / 1e9 / peak:.0%}"
            f" of the 2048² rate, {flops / statistics.median(ours) / 1e9 / shaped:.0%} of the layer-shape rate), "
            f"hand-written {flops / statistics.median(theirs) / 1e9:.1f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
