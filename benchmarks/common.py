"""Shared pieces of the benchmarks: data, a hand-written PyTorch VAE loop, timing helpers."""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, List

import torch
from torch.distributions import Normal

from ppl_vae.models import VAE


def machine_description() -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {cuda}, Python {platform.python_version()}"
    )


def base_parser(doc: str, *, num_data: int, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark shares: data size, repeats, device, threads, data folder."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=num_data)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: synthetic images)")
    return parser


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.Tensor]:
    """Apply --threads, print the machine, and return (device, data on it)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine_description()}")
    return device, benchmark_data(args, device)


def benchmark_data(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """MNIST training images from --data-dir if given, else seeded synthetic binary 28x28 images."""
    if args.data_dir:
        from ppl_vae.data import load_dataset

        x = load_dataset("mnist", args.data_dir, binarize="threshold").train[: args.num_data]
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.bernoulli(torch.full((args.num_data, 1, 28, 28), 0.13), generator=g)
    return x.to(device)


def users_tanh(module: torch.nn.Module, tanh: str = "torch") -> torch.nn.Module:
    """``module`` (changed in place) with its tanh layers as a user writes them: ``tanh="torch"``
    makes each an ``nn.Tanh`` (the library's :class:`~ppl_vae.models.networks.Tanh` computes
    2 sigmoid(2x) - 1 on CPU float32, about four times faster than torch's tanh there);
    ``tanh="sigmoid"`` makes each the library's, for a hand-written side that knows the trick too."""
    from ppl_vae.models.networks import Tanh

    if tanh not in ("torch", "sigmoid"):
        raise ValueError(f"tanh must be 'torch' or 'sigmoid', got {tanh!r}")
    make = torch.nn.Tanh if tanh == "torch" else Tanh
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Tanh):
                setattr(parent, name, make())
    return module


def add_tanh_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hand-tanh",
        choices=["torch", "sigmoid"],
        default="torch",
        help="the hand-written side's tanh: nn.Tanh (default) or the library's 2 sigmoid(2x) - 1",
    )


def handwritten_loss(vae: VAE, x: torch.Tensor, num_data: int) -> torch.Tensor:
    """-ELBO of a minibatch, scaled to the full data, written directly in PyTorch.

    The same estimator as Pyro's Trace_ELBO (AEVB's estimator A): one reparameterized draw
    z ~ q(z|x), log p(x|z) + log p(z) - log q(z|x), Bernoulli likelihood via logits.
    """
    loc, scale = vae.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    (logits,) = vae.decoder(z)
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(loc, scale).log_prob(z).sum(-1)
    return -(log_px + log_pz - log_qz).sum() * (num_data / x.shape[0])


def handwritten_epoch(vae: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, batch_size: int) -> float:
    """One epoch of a plain PyTorch training loop; returns seconds."""
    sync(x.device)
    start = time.perf_counter()
    n = x.shape[0]
    order = torch.randperm(n, device=x.device)
    for b in range(math.ceil(n / batch_size)):
        batch = x[order[b * batch_size : (b + 1) * batch_size]]
        loss = handwritten_loss(vae, batch, n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(x.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(
    ours: Callable[[], object], theirs: Callable[[], object], repeats: int, device: torch.device
) -> tuple[List[float], List[float], List[float]]:
    """Time the two alternately ``repeats`` times, after one untimed call of each (one-time costs:
    torch.optim.Adam's first construction imports torch._dynamo, about 1.4 s here, which fell on
    the hand-written side's first timed call): (ratios ours/theirs, our times, their times)."""
    theirs()
    ours()
    ratios, t_ours, t_theirs = [], [], []
    for _ in range(repeats):
        t1 = timed(theirs, device)
        t0 = timed(ours, device)
        ratios.append(t0 / t1)
        t_ours.append(t0)
        t_theirs.append(t1)
    return ratios, t_ours, t_theirs


def loadavg() -> str:
    """The machine's 1, 5 and 15 minute load averages (``/proc/loadavg``), or "n/a"."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of an ``n`` x ``n`` fp32 matrix product on ``device`` with the current threads
    (the best of ``repeats``): the machine's practical limit for matrix-product-bound work."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def summarize(name: str, ratios: List[float]) -> str:
    return (
        f"{name}: median {statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x "
        f"over {len(ratios)} interleaved runs (load average {loadavg()})"
    )


def run_command(cmd: List[str], log: Path) -> dict:
    """Run ``cmd`` (one torch thread) with its output in ``log``; returns its wall and CPU seconds
    and the load average before and after. A failing command prints its log's tail and exits."""
    import json
    import os
    import resource
    import shlex
    import subprocess

    start, load = time.perf_counter(), loadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    info = dict(wall_s=time.perf_counter() - start, cpu_s=cpu, load_before=load, load_after=loadavg())
    print(f"  rc {proc.returncode}; {json.dumps(info)}; log {log}", flush=True)
    if proc.returncode:
        print(Path(log).read_text()[-2000:])
        raise SystemExit(proc.returncode)
    return info
