"""The GMVAE's clustering on MNIST: ppl_vae's ``gmvae`` against an independent plain-PyTorch GMVAE
at equal settings, seed by seed (issue 26, item 3; docs/semisupervised.md, "The GMVAE clusters").

Both sides: MNIST (all 60,000 training images, dynamic binarization: each training batch is
x ~ Bernoulli(grey levels)), the library's test set (binarized once, seeded), batch --batch-size,
Adam at --lr (torch defaults otherwise), --epochs epochs, one reparameterized z per component,
the component summed out exactly, 10 components, p(c) uniform, seed s for everything.

- ``library``: ``ppl_vae.pipeline.fit`` (what ``ppl-vae fit --model gmvae`` runs), its history's
  final test ELBO, cluster accuracy and clusters used.
- ``plain``: ``plain_structured.PlainGMVAE`` built fresh from ``torch.manual_seed(s)`` (its own
  initialisation: torch's default for the linear maps, N(0, I) component means, unit scales), its
  own training loop (randperm batches, ``torch.bernoulli`` per batch, ``loss.backward``,
  ``torch.optim.Adam``), and its own evaluation (the one-sample enumerated ELBO per test image
  in eval mode; argmax q(c | x) on the test images, each cluster mapped to the majority label of
  the test images it holds, computed here with NumPy).
- ``plain_library_init``: the plain side started from the weights ``pipeline.fit`` starts from at
  that seed (its own data order and noise afterwards): tells the initialisation from the training.
- ``shu``: the library with Rui Shu's configuration (ReLU 512-512 networks, z = 64:
  ``--model-option hidden_dims=[512,512] --latent-dim 64``).

    cd benchmarks
    ../.venv/bin/python gmvae_clustering.py --data-dir ../../shared/datasets/mnist --sides library plain --seeds 0 1 2 3 4

Prints one JSON line per (side, seed) and a summary per side (mean, standard deviation, range).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import loadavg
from plain_structured import PlainGMVAE


def library_run(args, seed: int, out: Path, shu: bool) -> dict:
    from ppl_vae import pipeline
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    # the mixture's component means start at N(0, init_scale^2) (--init-scale; None: the model's default)
    prior = (
        {}
        if args.init_scale is None
        else dict(prior="mixture_of_gaussians", prior_options={"num_components": 10, "init_scale": args.init_scale})
    )
    model = (
        ModelConfig(model="gmvae", latent_dim=64, model_options={"hidden_dims": [512, 512]}, **prior)
        if shu
        else ModelConfig(model="gmvae", **prior)
    )
    config = RunConfig(
        model=model,
        data=DataConfig(dataset="mnist", data_dir=args.data_dir, binarize="dynamic", train_size=args.train_size),
        train=TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, device="cpu", train_eval_size=1000
        ),
    )
    run = pipeline.fit(config, out / f"{'shu' if shu else 'library'}-{seed}", progress=False)
    final = run.final
    return {
        "test_elbo": final["test_elbo"],
        "cluster_accuracy": final["cluster_accuracy"],
        "clusters_used": final["clusters_used"],
    }


def majority_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Each cluster mapped to the majority label of its points; the share of points whose mapped label is theirs."""
    hits = 0
    for c in np.unique(clusters):
        hits += np.bincount(labels[clusters == c]).max()
    return float(hits / len(labels))


def plain_run(args, seed: int, library_init: bool = False) -> dict:
    from ppl_vae import pipeline  # the data only: the same arrays the library side reads
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    config = RunConfig(
        model=ModelConfig(model="gmvae"),
        data=DataConfig(dataset="mnist", data_dir=args.data_dir, binarize="dynamic", train_size=args.train_size),
        train=TrainConfig(seed=seed, device="cpu"),
    )
    data = pipeline.load_data(config)
    x_train = torch.as_tensor(np.asarray(data.train)).flatten(1)
    x_test = torch.as_tensor(np.asarray(data.test)).flatten(1)
    test_labels = np.asarray(data.test_labels)
    if library_init:  # the weights pipeline.fit starts from at this seed, then the plain loop's own RNG
        from plain_structured import from_library

        vae, _, _ = pipeline.prepare(config)
        model = from_library("gmvae", vae)
        torch.manual_seed(10_000 + seed)
    else:
        torch.manual_seed(seed)
        model = PlainGMVAE(x_train.shape[1], 10, 10, 500)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    n = x_train.shape[0]
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(n)
        for b in range(math.ceil(n / args.batch_size)):
            x = torch.bernoulli(x_train[order[b * args.batch_size : (b + 1) * args.batch_size]])
            loss = model.loss(x, num_data=n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        elbo = sum(-float(model.loss(x_test[i : i + 1000])) for i in range(0, x_test.shape[0], 1000))
        clusters = torch.cat([model.classifier(x_test[i : i + 1000]).argmax(-1) for i in range(0, len(x_test), 1000)])
    clusters = clusters.numpy()
    return {
        "test_elbo": elbo / x_test.shape[0],
        "cluster_accuracy": majority_accuracy(clusters, test_labels),
        "clusters_used": int(len(np.unique(clusters))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument(
        "--sides", nargs="+", default=["library", "plain"], choices=["library", "plain", "plain_library_init", "shu"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument(
        "--init-scale",
        type=float,
        default=None,
        help="library sides: the component means' initial scale (prior option)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="run folders of the library side (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="gmvae-"))
    print(f"settings: {json.dumps(vars(args))}; load average {loadavg()}", flush=True)
    rows: dict = {side: [] for side in args.sides}
    for seed in args.seeds:
        for side in args.sides:
            start = time.perf_counter()
            if side.startswith("plain"):
                row = plain_run(args, seed, library_init=side == "plain_library_init")
            else:
                row = library_run(args, seed, out, shu=side == "shu")
            row = {"side": side, "seed": seed, **row, "seconds": round(time.perf_counter() - start, 1)}
            row["load_average"] = loadavg()
            rows[side].append(row)
            print(json.dumps(row), flush=True)
    for side, side_rows in rows.items():
        parts = []
        for key in ("cluster_accuracy", "clusters_used", "test_elbo"):
            values = [r[key] for r in side_rows]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            parts.append(
                f"{key} mean {statistics.mean(values):.4g} sd {sd:.3g} range {min(values):.4g}-{max(values):.4g}"
            )
        print(f"{side} over {len(side_rows)} seeds: " + "; ".join(parts))


if __name__ == "__main__":
    main()
