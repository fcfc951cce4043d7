"""IW evaluation speed: ppl_vae's importance_estimate against a careful hand-written eager loop.

Both compute log p̂_K(x) = log (1/K) sum_k p(x, z_k) / q(z_k|x) for bernoulli_mlp 784-500-20
(synthetic weights, or a run's with --run). The hand-written side is the loop a careful user
writes: the encoder once per block of images, z = loc + scale * eps, the decoder's tanh MLP,
the Bernoulli log-density as ``x*l - softplus(l)``, a streaming logsumexp, and chunks of
``--hand-images`` images x ``--hand-particles`` particles chosen for the cache (``--tune``
sweeps them and prints the table). The library runs with its defaults (it also computes the
ELBO, standard errors, ESS and PSIS k-hat of the same weights). Calls alternate in one process
with a 2048 x 2048 fp32 matrix product between them; the script prints the speed-up
hand-written / ppl_vae (median and range) and each side's fraction of the matmul limit: the
FLOPs of the networks' matrix products over the time that matrix product's GFLOP/s would need.

    python benchmarks/bench_iw.py --num-samples 1000 --threads 1 --repeats 5
    python benchmarks/bench_iw.py --check            # same draws: equal numbers to float tolerance
    python benchmarks/bench_iw.py --run RUN --num-data 300 --only hand   # one side, whole process
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from common import add_tanh_option, base_parser, loadavg, matmul_gflops, setup, summarize, timed, users_tanh
from torch import nn

from ppl_vae.inference.importance import default_particle_batch_size, importance_estimate
from ppl_vae.inference.modes import block_seed
from ppl_vae.models import build_vae

#: the hand-written loop's chunk, from --tune on a 2-core AMD EPYC (1 MiB L2 per core, 1 thread,
#: K = 1000, load 2-3): 10 images x 100 particles (1,000 samples: a 3 MB logits block), within
#: 1% of the best (50 x 20: 1.255 s against 1.269 s); chunks of 2,000-5,000 samples were 10-20%
#: slower (this script used the library's draw chunk, 100 x 655, and BCE-with-logits before)
HAND_IMAGES = 10
HAND_PARTICLES = 100


def users_networks(vae, tanh: str = "torch"):
    """Copies of the run's encoder and decoder MLP (``nn.Sequential``: z -> logits), with
    tanh layers as :func:`common.users_tanh` makes them."""
    return users_tanh(copy.deepcopy(vae.encoder), tanh), users_tanh(copy.deepcopy(vae.decoder.net), tanh)


@torch.no_grad()
def handwritten_iw(networks, x: torch.Tensor, num_samples: int, images: int, particles: int, seed=None) -> torch.Tensor:
    """log p̂_K(x) per datapoint, the way a careful user writes it in eager PyTorch.

    ``networks``: (encoder, decoder) from :func:`users_networks`. ``seed``: a function of a
    block's first index giving the seed its draws start from (the check reproduces the
    library's draws with it); None draws from the current stream."""
    encoder, decoder = networks
    out = []
    for start in range(0, x.shape[0], images):
        xb = x[start : start + images].flatten(1)
        if seed is not None:
            torch.manual_seed(seed(start))
        loc, scale = encoder(xb)
        log_scale = scale.log().sum(-1)
        parts = []
        for k0 in range(0, num_samples, particles):
            eps = torch.randn((min(particles, num_samples - k0), *loc.shape), device=x.device)
            z = loc + scale * eps
            logits = decoder(z)
            log_px = (xb * logits - F.softplus(logits)).sum(-1)
            # log N(z; 0, 1) - log N(z; loc, scale): the 2 pi terms cancel
            log_w = log_px - 0.5 * (z * z).sum(-1) + 0.5 * (eps * eps).sum(-1) + log_scale
            parts.append(torch.logsumexp(log_w, 0))
        out.append(torch.logsumexp(torch.stack(parts), 0) - math.log(num_samples))
    return torch.cat(out)


def matmul_flops(vae, num_data: int, num_samples: int) -> float:
    """FLOPs of the matrix products one evaluation cannot avoid: the decoder for every sample,
    the encoder once per datapoint."""

    def linear(module: nn.Module) -> int:
        return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    return float(num_data * num_samples * linear(vae.decoder) + num_data * linear(vae.encoder))


def load_model_and_data(args, device):
    if args.run:
        from ppl_vae.pipeline import load_run
        from ppl_vae.reports.common import select_datapoints

        run = load_run(args.run, str(device))
        return run.vae, select_datapoints(run, "test", args.num_data or None, seed=0).x
    _, x = setup(args)
    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", x.shape[1:], latent_dim=20, hidden_dim=500).to(device).eval()
    return vae, x


def main() -> None:
    start_process = time.perf_counter()
    parser = base_parser(__doc__, num_data=200, repeats=5)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100, help="the library's datapoints per batch")
    parser.add_argument("--hand-images", type=int, default=HAND_IMAGES)
    parser.add_argument("--hand-particles", type=int, default=HAND_PARTICLES)
    parser.add_argument("--tune", action="store_true", help="sweep the hand-written chunk first and use the best")
    parser.add_argument("--check", action="store_true", help="both sides on the same draws: equal numbers?")
    parser.add_argument("--run", default=None, help="a run directory: its weights and test points")
    parser.add_argument("--only", choices=["hand", "lib"], default=None, help="time one side once and exit")
    add_tanh_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae, x = load_model_and_data(args, device)
    vae.eval()
    networks = users_networks(vae, args.hand_tanh)
    k = args.num_samples
    print(f"load average {loadavg()}; {torch.get_num_threads()} thread(s); data {tuple(x.shape)}, K={k}")

    def ours():
        return importance_estimate(vae.model, vae.guide, x, num_samples=k, batch_size=args.batch_size, seed=0).log_px

    def theirs(images=None, particles=None):
        return handwritten_iw(networks, x, k, images or args.hand_images, particles or args.hand_particles)

    if args.only:
        t = timed(ours if args.only == "lib" else theirs, device)
        print(f"{args.only}: scoring {t:.3f} s, whole process so far {time.perf_counter() - start_process:.3f} s")
        return

    if args.check:
        pbs = default_particle_batch_size(args.batch_size)
        a = ours()
        b = handwritten_iw(networks, x, k, args.batch_size, pbs, seed=lambda start: block_seed(0, start))
        rel = ((a - b).abs() / b.abs()).max().item()
        print(f"same draws: max |ppl_vae - hand-written| / |hand-written| = {rel:.2e} (mean log p(x) {a.mean():.4f})")

    if args.tune:
        print("hand-written chunk (images x particles): seconds per evaluation")
        table = {}
        for images in (10, 20, 50, 100):
            for samples in (500, 1000, 2000, 5000):
                particles = max(1, samples // images)
                theirs(images, particles)
                table[images, particles] = min(
                    timed(lambda i=images, p=particles: theirs(i, p), device) for _ in range(2)
                )
                print(f"  {images:4d} x {particles:4d}: {table[images, particles]:.3f} s   (load {loadavg()})")
        args.hand_images, args.hand_particles = min(table, key=table.__getitem__)

    print(f"hand-written chunk {args.hand_images} images x {args.hand_particles} particles, tanh: {args.hand_tanh}")
    a, b = ours(), theirs()  # warm-up, and a check that both estimate the same thing
    print(f"mean log p(x): ppl_vae {a.mean():.3f}, hand-written {b.mean():.3f} (independent draws)")
    flops = matmul_flops(vae, x.shape[0], k)
    speedups, t_ours, t_theirs, rates = [], [], [], []
    for _ in range(args.repeats):
        rates.append(matmul_gflops(device))
        t1 = timed(theirs, device)
        t0 = timed(ours, device)
        speedups.append(t1 / t0)
        t_ours.append(t0)
        t_theirs.append(t1)
    rate = statistics.median(rates)
    limit = flops / (rate * 1e9)
    print(
        f"matrix products {flops / 1e9:.1f} GFLOP per evaluation; 2048x2048 fp32 matmul {rate:.1f} GFLOP/s "
        f"(median, range {min(rates):.1f}-{max(rates):.1f}): limit {limit:.3f} s"
    )
    for name, times in (("ppl_vae", t_ours), ("hand-written", t_theirs)):
        t = statistics.median(times)
        print(f"{name}: {t:.3f} s per evaluation, {limit / t:.0%} of the matmul limit ({flops / t / 1e9:.1f} GFLOP/s)")
    print(summarize(f"IW K={k} speed-up hand-written/ppl_vae", speedups) + f"; load average {loadavg()}")


if __name__ == "__main__":
    main()
