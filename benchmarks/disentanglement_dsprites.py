"""MIG and test ELBO of the VAE, beta-VAE, beta-TC-VAE and capacity-controlled beta-VAE on the
re-rendered dSprites, at a CPU-sized budget (docs/disentanglement.md reports its output).

    .venv/bin/python benchmarks/disentanglement_dsprites.py [--out benchmarks/out/disentanglement]
        [--seeds 0 1 2] [--epochs 10] [--num-images 15000]

The published architectures on the full 737,280 images (rendered once by ``ppl-vae data dsprites
--out DIR``), e.g. Chen et al.'s MLP at batch 256 for one epoch:

    .venv/bin/python benchmarks/disentanglement_dsprites.py --model chen_mlp --data-dir DIR \
        --num-images 737280 --epochs 1 --batch-size 256 --objectives vae beta_vae_4 beta_tc_6

Same architecture, data, optimizer and epochs for every objective; only ``train.objective`` and
its weights differ. Runs that already exist in --out are reused (delete them to retrain). One
torch thread. Metrics: MIG and DCI (25 trees per forest) on 10,000 training / 3,000 test points,
seeded by the run's seed. Prints a table (with the CPU time of each fit and the load average
beside it) and writes ``results.nc`` (dims objective, seed) in --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

import ppl_vae
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

OBJECTIVES = {
    "vae": dict(objective="elbo"),
    "beta_vae_4": dict(objective="beta_vae", beta=4.0),
    "beta_tc_6": dict(objective="beta_tc", tc_beta=6.0),
    "capacity": dict(objective="capacity", gamma=1000.0, capacity_max=25.0),
}


def config(objective: dict, seed: int, args: argparse.Namespace) -> RunConfig:
    train = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        device="cpu",
        train_eval_size=1000,
        **objective,
    )
    if objective["objective"] == "capacity":
        train.update(capacity_start_epoch=0.0, capacity_end_epoch=0.75 * args.epochs)
    sizes = dict(latent_dim=args.latent_dim, hidden_dim=args.hidden_dim)
    if args.model == "bernoulli_mlp":  # the sizes of the CPU-sized table in docs/disentanglement.md
        sizes = {k: v if v is not None else dict(latent_dim=8, hidden_dim=256)[k] for k, v in sizes.items()}
    return RunConfig(
        model=ModelConfig(model=args.model, **sizes),
        data=DataConfig(dataset="dsprites", num_images=args.num_images, split_seed=0, data_dir=args.data_dir),
        train=TrainConfig(**train),
    )


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/disentanglement"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=15_000)
    parser.add_argument("--model", default="bernoulli_mlp", help="bernoulli_mlp, chen_mlp or conv64")
    parser.add_argument("--data-dir", default=None, help="folder of `ppl-vae data dsprites --out` (default: render)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    parser.add_argument("--latent-dim", type=int, default=None, help="default: the model's (bernoulli_mlp: 8)")
    parser.add_argument("--hidden-dim", type=int, default=None, help="default: the model's (bernoulli_mlp: 256)")
    parser.add_argument("--train-only", action="store_true", help="train the runs, compute no metric")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    data = None
    for name in args.objectives:
        objective = OBJECTIVES[name]
        for seed in args.seeds:
            run_dir = args.out / f"{name}-seed{seed}"
            cfg = config(objective, seed, args)
            start, cpu, load = time.perf_counter(), time.process_time(), _load()
            if (run_dir / "checkpoint.safetensors").is_file():
                run = ppl_vae.resume(run_dir, progress=False)
            else:
                run = ppl_vae.fit(cfg, run_dir, progress=False)
            print(
                f"{name} seed {seed}: test ELBO {run.final['test_elbo']:.2f} ({time.perf_counter() - start:.0f} s wall, "
                f"{time.process_time() - cpu:.0f} s CPU, load average {load} -> {_load()})",
                flush=True,
            )
            if args.train_only:
                continue
            from ppl_vae.analysis.disentanglement import disentanglement_metrics
            from ppl_vae.pipeline import load_data

            if data is None:  # every run has the same data (same subset and split)
                data = load_data(run.config)
            start = time.perf_counter()
            metrics = disentanglement_metrics(run.vae, data, seed=seed, num_trees=25)
            print(f"  MIG {float(metrics['mig']):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append((name, seed, run.final["test_elbo"], metrics))
    if args.train_only:
        return
    names = list(args.objectives)
    shape = (len(names), len(args.seeds))
    out = {
        "test_elbo": np.full(shape, np.nan),
        "mig": np.full(shape, np.nan),
        "dci_disentanglement": np.full(shape, np.nan),
        "active_units": np.full(shape, np.nan),
    }
    for name, seed, elbo, m in rows:
        i, j = names.index(name), args.seeds.index(seed)
        out["test_elbo"][i, j] = elbo
        out["mig"][i, j] = float(m["mig"])
        out["dci_disentanglement"][i, j] = float(m["dci_disentanglement"])
        out["active_units"][i, j] = float(m["active_units"])
    ds = xr.Dataset(
        {k: (("objective", "seed"), v) for k, v in out.items()},
        coords={"objective": names, "seed": args.seeds},
        attrs={
            "epochs": args.epochs,
            "num_images": args.num_images,
            "model": args.model,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "data": "dsprites re-rendered (ppl_vae.data.dsprites)",
        },
    )
    args.out.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(args.out / "results.nc", engine="h5netcdf")
    print(f"{'objective':<12} {'test ELBO':>18} {'MIG':>16} {'DCI dis.':>16} {'active':>8}")
    for i, name in enumerate(names):
        cell = lambda v: f"{np.mean(v):8.3f} ± {np.std(v, ddof=1) if len(v) > 1 else float('nan'):.3f}"  # noqa: E731
        print(
            f"{name:<12} {cell(out['test_elbo'][i]):>18} {cell(out['mig'][i]):>16} "
            f"{cell(out['dci_disentanglement'][i]):>16} {np.mean(out['active_units'][i]):8.1f}"
        )
        print(
            f"{'':<12} per seed: ELBO {np.round(out['test_elbo'][i], 2).tolist()} MIG "
            f"{np.round(out['mig'][i], 3).tolist()}"
        )


if __name__ == "__main__":
    main()
