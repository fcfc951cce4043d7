"""Peak memory of the IW evaluation as K grows (each K in a fresh process, so peaks don't mix).

CPU: peak resident set size above the process's size before the evaluation. CUDA: peak bytes
allocated by torch. Chunking over particles should keep the peak flat in K.

    python benchmarks/bench_memory.py --num-samples 100 1000 5000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def child(k: int, device: str, num_data: int, batch_size: int) -> dict:
    from ppl_vae.inference.importance import importance_estimate
    from ppl_vae.models import build_vae

    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((num_data, 1, 28, 28), 0.13)).to(dev)
    vae = build_vae("bernoulli_mlp", x.shape[1:], latent_dim=20, hidden_dim=500).to(dev).eval()
    importance_estimate(vae.model, vae.guide, x[:2], num_samples=2)  # load lazily-imported code first
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    est = importance_estimate(vae.model, vae.guide, x, num_samples=k, batch_size=batch_size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"K": k, "peak_rss_increase_mib": (after - before) / 1024, "mean_log_px": float(est.log_px.mean())}
    if dev.type == "cuda":
        out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--num-data", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.device, args.num_data, args.batch_size)))
        return
    print(f"IW peak memory, {args.num_data} datapoints, bernoulli_mlp 784-500-20, device {args.device}")
    for k in args.num_samples:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(k),
            "--device",
            args.device,
            "--num-data",
            str(args.num_data),
            "--batch-size",
            str(args.batch_size),
        ]
        result = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        line = f"K={k:>5}: peak RSS +{result['peak_rss_increase_mib']:.1f} MiB"
        if "peak_cuda_mib" in result:
            line += f", peak CUDA {result['peak_cuda_mib']:.1f} MiB"
        print(line + f"  (mean log p(x) {result['mean_log_px']:.2f})")


if __name__ == "__main__":
    main()
