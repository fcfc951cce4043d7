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

    python benchmarks/bench_structured.py --data-dir ../shared/datasets/mnist --repeats 3 --threads 1
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Optional

import torch
from common import add_tanh_option, base_parser, loadavg, setup, summarize, sync, users_tanh
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
