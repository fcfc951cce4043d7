"""Training speed of the structured models (two_layer, ladder, m2, gmvae): ppl_vae's epoch against
a plain PyTorch epoch of the same model (benchmarks/plain_structured.py), interleaved.

For each model the library model is built with ``build_vae`` (its registry defaults: two_layer and
ladder 784-200-200-z1(100)-100-100-z2(50), tanh, the ladder batch-normalised; m2 500 hidden ReLU
units, z 50, 10 classes, ``--labels`` labelled points and the rest unlabelled; gmvae 500 hidden,
z 10, 10 components), its weights are copied into the plain twin, and then epochs alternate:
the plain one (randperm minibatches, -ELBO scaled to the data, Adam at lr 1e-3) and the
library's (``train`` with the "svi" method's stepper, timed by the history's ``wall_time``, as
benchmarks/bench_train.py times it), after one warm-up epoch of each. Prints per model the
median seconds per epoch of each side, the median and range of the ratio library / plain over
``--repeats`` interleaved pairs, the torch threads and the load average before and after.

``--bound`` measures instead how far below the plain epoch any implementation of the same model
could go with the same arithmetic: the plain epoch's matrix-product FLOPs (counted by
``torch.utils.flop_counter``), the time its matrix products take (``torch.profiler``, self CPU of
mm/addmm/bmm) and the rest. A library that did every matrix product at the plain side's rate and
nothing else would take ``matmul / total`` of the plain epoch; 0.85x needs the rest cut to
``0.85 - matmul / total`` of the epoch, which the line prints as the share of the plain side's
non-matrix work that would have to go.

    python benchmarks/bench_structured.py --data-dir ../shared/datasets/mnist --repeats 3 --threads 1
    python benchmarks/bench_structured.py --data-dir ../shared/datasets/mnist --num-data 5000 --threads 1 --bound
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Optional

import torch
from common import add_tanh_option, base_parser, loadavg, matmul_gflops, setup, summarize, sync, users_tanh
from plain_structured import from_library

from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.data.labels import keep_labels
from ppl_vae.inference.training import METHODS, TrainState, train
from ppl_vae.models import build_vae

MODELS = ("two_layer", "ladder", "m2", "gmvae")


def plain_epoch(
    plain: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    batch_size: int,
) -> float:
    """One epoch of a plain PyTorch training loop; returns seconds."""
    sync(x.device)
    start = time.perf_counter()
    n = x.shape[0]
    order = torch.randperm(n, device=x.device)
    for b in range(math.ceil(n / batch_size)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        loss = plain.loss(x[idx], None if y is None else y[idx], num_data=n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(x.device)
    return time.perf_counter() - start


MATMUL_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_bound(
    plain: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    batch_size: int,
) -> str:
    """One profiled plain epoch: its matrix-product FLOPs, their time and share, what 0.85x would need."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        plain_epoch(plain, optimizer, x, y, batch_size)
    flops = counter.get_total_flops()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        plain_epoch(plain, optimizer, x, y, batch_size)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_KERNELS) / 1e6
    share = matmul / total
    rest = 1 - share
    needed = (1 - 0.85) / rest if rest > 0 else float("inf")
    return (
        f"plain epoch {total:.3f} s of CPU (profiled), {flops / 1e9:.1f} GFLOP in matrix products taking "
        f"{matmul:.3f} s ({flops / matmul / 1e9:.1f} GFLOP/s; a 2048^2 product: {matmul_gflops(x.device):.1f} "
        f"GFLOP/s): matrix products {share:.1%} of the epoch, so with the same products the floor is "
        f"{share:.3f}x, and 0.85x would need {min(needed, 1):.0%} of the other {rest:.1%} removed"
    )


def mnist_labels(args, n: int) -> torch.Tensor:
    """The first ``n`` training labels of MNIST (--data-dir), or seeded random ones for the synthetic images."""
    if args.data_dir:
        from ppl_vae.data import load_dataset

        labels = load_dataset("mnist", args.data_dir, binarize="threshold").train_labels
        assert labels is not None
        return labels[:n]
    return torch.randint(10, (n,), generator=torch.Generator().manual_seed(0))


def main() -> None:
    parser = base_parser(__doc__, num_data=10000, repeats=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--compile",
        default=None,
        help="torch.compile backend for the library's loss (e.g. inductor); the plain side is not compiled",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--labels", type=int, default=100, help="labelled training points for m2 (the rest: -1)")
    parser.add_argument(
        "--plain-adam",
        choices=("default", "fused"),
        default="default",
        help="the plain side's torch.optim.Adam: default (foreach) or fused=True (the library's trains with fused)",
    )
    parser.add_argument(
        "--bound",
        action="store_true",
        help="profile the plain side's epoch instead of timing pairs: its matrix products' share and the floor it sets",
    )
    add_tanh_option(parser)
    args = parser.parse_args()
    device, x = setup(args)
    n = x.shape[0]
    adam_options = {"fused": True} if args.plain_adam == "fused" else {}
    print(
        f"data: {tuple(x.shape)} on {device}; batch {args.batch_size}; plain Adam: torch.optim.Adam "
        f"{'fused=True' if adam_options else 'default (foreach)'}, lr 1e-3; plain tanh: {args.hand_tanh}"
    )
    labels = mnist_labels(args, n).to(device) if "m2" in args.models else None
    for name in args.models:
        before = loadavg()
        data = Dataset("bench", x, x[:2])  # a tiny test set: evaluation is not timed anyway
        data_info = None
        if name == "m2":
            assert labels is not None
            data = keep_labels(Dataset("bench", x, x[:2], train_labels=labels, test_labels=labels[:2]), args.labels)
            data_info = {"num_classes": 10, "num_train": n, "num_labelled": args.labels}
        torch.manual_seed(0)
        vae = build_vae(name, x.shape[1:], data_info=data_info).to(device)
        plain = users_tanh(from_library(name, vae), args.hand_tanh)
        plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3, **adam_options)
        y = data.train_labels
        if args.bound:
            plain_epoch(plain, plain_opt, x, y, args.batch_size)  # warm-up
            print(f"{name}: {matmul_bound(plain, plain_opt, x, y, args.batch_size)}; load average {loadavg()}")
            continue
        # train_eval_size 2: the per-epoch train ELBO, outside the timed span, on 2 points (not 1000)
        config = TrainConfig(
            epochs=0, batch_size=args.batch_size, device=args.device, train_eval_size=2, compile=args.compile
        )
        stepper = METHODS.get("svi")(vae, config)
        path = "fused (no Pyro tracing)" if getattr(stepper, "fused", False) else f"Pyro {type(stepper.elbo).__name__}"
        state = TrainState()
        # warm-up epoch for each (allocator, caches)
        plain_epoch(plain, plain_opt, x, y, args.batch_size)
        config.epochs += 1
        train(vae, data, config, stepper=stepper, state=state, progress=False)
        ratios, ours, theirs = [], [], []
        for _ in range(args.repeats):
            t_plain = plain_epoch(plain, plain_opt, x, y, args.batch_size)
            config.epochs += 1
            history = train(vae, data, config, stepper=stepper, state=state, progress=False)
            t_lib = float(history.wall_time[-1] - history.wall_time[-2])
            ratios.append(t_lib / t_plain)
            ours.append(t_lib)
            theirs.append(t_plain)
        params = sum(p.numel() for p in plain.parameters())
        print(
            f"{name} ({type(vae).__name__}, {params} parameters; library trains through {path}): library "
            f"{statistics.median(ours):.3f} s/epoch, plain {statistics.median(theirs):.3f} s/epoch; "
            f"{torch.get_num_threads()} threads; load average before {before}, after {loadavg()}"
        )
        print(summarize(f"{name} ratio library/plain", ratios))


if __name__ == "__main__":
    main()
