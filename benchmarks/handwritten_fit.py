"""The hand-written side of bench_whole_process.py: what ``ppl-vae fit`` does by default on an
IDX dataset, written as a plain PyTorch script with no ppl_vae import.

Same data (IDX gzip images / 255), same model as ``gaussian_mlp`` with its defaults (tanh MLP
784-200-(10+10) encoder with log-variance head, 10-200-(784+784) decoder, Gaussian likelihood
with mean sigmoid(.) and scale softplus(.) + 0.01, N(0, I) prior), same estimator (one
reparameterized draw, -(log p(x|z) + log p(z) - log q(z|x)) summed and scaled to the data),
Adam 1e-3, batches of 100 in a fresh random order per epoch, and after every epoch the ELBO on
the same fixed subset of 1,000 training points and on the whole test set, then a checkpoint
and the history written to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_images(path: Path) -> torch.Tensor:
    raw = gzip.decompress(path.read_bytes())
    n, rows, cols = (int(v) for v in np.frombuffer(raw, ">u4", count=3, offset=4))
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows * cols)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


class Encoder(nn.Module):
    def __init__(self, d: int, h: int, z: int):
        super().__init__()
        self.body, self.head = nn.Linear(d, h), nn.Linear(h, 2 * z)

    def forward(self, x):
        loc, log_var = self.head(torch.tanh(self.body(x))).chunk(2, -1)
        return loc, torch.exp(0.5 * log_var.clamp(-30.0, 20.0))


HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def normal_log_prob(x, loc, scale):
    """log N(x; loc, scale) element-wise, as torch.distributions.Normal computes it, without
    the argument validation a Distribution object runs on every construction."""
    return -((x - loc) ** 2) / (2 * scale**2) - torch.log(scale) - HALF_LOG_2PI


def log_weight(enc, dec, x):
    """log p(x, z) - log q(z|x) for one z ~ q(z|x) per row: the ELBO's Monte Carlo term."""
    loc, scale = enc(x)
    z = loc + scale * torch.randn_like(loc)
    raw_loc, raw_scale = dec(z).chunk(2, -1)
    log_px = normal_log_prob(x, torch.sigmoid(raw_loc), nn.functional.softplus(raw_scale) + 0.01).sum(-1)
    log_pz = (-0.5 * z**2 - HALF_LOG_2PI).sum(-1)
    return log_px + log_pz - normal_log_prob(z, loc, scale).sum(-1)


@torch.no_grad()
def mean_elbo(enc, dec, x, batch=1000):
    return float(torch.cat([log_weight(enc, dec, x[i : i + batch]) for i in range(0, len(x), batch)]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    data_dir, out = Path(args.data_dir), Path(args.out)
    train = read_images(data_dir / "train-images-idx3-ubyte.gz")
    test = read_images(data_dir / "t10k-images-idx3-ubyte.gz")
    n, d = train.shape
    eval_idx = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:1000].sort().values
    enc = Encoder(d, 200, 10)
    dec = nn.Sequential(nn.Linear(10, 200), nn.Tanh(), nn.Linear(200, 2 * d))
    params = [*enc.parameters(), *dec.parameters()]
    # fused, as ppl_vae builds Adam: the same implementation, so both sides can print the same ELBOs
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    out.mkdir(parents=True, exist_ok=True)
    history, wall = [], 0.0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n)
        for b in range(math.ceil(n / args.batch_size)):
            x = train[order[b * args.batch_size : (b + 1) * args.batch_size]]
            loss = -log_weight(enc, dec, x).sum() * (n / len(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        wall += time.perf_counter() - start
        history.append(
            {
                "epoch": epoch,
                "train_elbo": mean_elbo(enc, dec, train[eval_idx]),
                "test_elbo": mean_elbo(enc, dec, test),
                "wall_time": wall,
            }
        )
        tmp = out / "checkpoint.pt.tmp"
        torch.save(
            {"encoder": enc.state_dict(), "decoder": dec.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
            tmp,
        )
        os.replace(tmp, out / "checkpoint.pt")
        (out / "history.json").write_text(json.dumps(history))
    last = history[-1]
    print(
        f"epoch {last['epoch']}: train ELBO {last['train_elbo']:.3f}, test ELBO {last['test_elbo']:.3f} "
        f"nats per datapoint ({wall:.1f} s training)"
    )


if __name__ == "__main__":
    main()
