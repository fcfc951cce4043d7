"""Semi-amortized training (``--method sa``, Kim et al. 2018) against SVI at equal wall time, and
the amortization gap that refinement closes on each trained model.

Each method trains the same model from the same seed for ``--seconds`` of training time (one
torch thread; evaluation excluded), then on the first ``--num-test`` test points: the encoder's
ELBO and the ELBO after :func:`ppl_vae.inference.refine.refine` (``--refine-steps`` Adam steps,
common draws, so the gap's se is that of paired differences), and log p̂_K(x) by importance
weighting with the encoder and with the refined q as proposals. Prints one JSON object with every number and the load
average at start and end (the machine is shared).

    python benchmarks/sa_vs_svi.py --data-dir /work/shared/datasets/mnist --seconds 60
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict

import torch

from ppl_vae import pipeline
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.refine import refine
from ppl_vae.inference.semi_amortized import gaussian_elbo, refine_unrolled
from ppl_vae.inference.training import Callback, TrainContext, train


class TimeLimit(Callback):
    """Stop after ``seconds`` of training steps (the epoch in progress is not recorded)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = math.nan
        self.steps = 0

    def on_train_start(self, ctx: TrainContext) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, ctx: TrainContext) -> bool:
        self.steps += 1
        return time.perf_counter() - self.start > self.seconds


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()


def mean_se(values: torch.Tensor) -> Dict[str, float]:
    """Mean over datapoints and its standard error (the spread over datapoints)."""
    return {"mean": float(values.mean()), "se": float(values.std() / math.sqrt(values.shape[0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--model", default="bernoulli_mlp")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden-dim", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sa-steps", type=int, default=10)
    parser.add_argument("--sa-lr", type=float, default=0.1)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--refine-steps", type=int, default=300)
    parser.add_argument("--refine-lr", type=float, default=0.02)
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--methods", default="svi,sa")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: Dict[str, Any] = {"settings": vars(args), "loadavg_start": loadavg()}
    for method in args.methods.split(","):
        options = {"sa_steps": args.sa_steps, "sa_lr": args.sa_lr} if method == "sa" else {}
        config = RunConfig(
            model=ModelConfig(model=args.model, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim),
            data=DataConfig(
                dataset=args.dataset,
                data_dir=args.data_dir,
                train_size=args.train_size,
                binarize="dynamic" if args.dataset != "digits" else "none",
            ),
            train=TrainConfig(
                method=method,
                epochs=10**6,
                batch_size=args.batch_size,
                lr=args.lr,
                device="cpu",
                method_options=options,
            ),
        )
        vae, data, stepper = pipeline.prepare(config)
        limit = TimeLimit(args.seconds)
        start = time.perf_counter()
        history = train(vae, data, config.train, stepper=stepper, callbacks=[limit], progress=False, evaluate=False)
        seconds = time.perf_counter() - start
        vae.eval()
        x = data.test[: args.num_test]
        if data.dynamic_binarization:
            gen = torch.Generator().manual_seed(0)
            x = (torch.rand(x.shape, generator=gen) < x).to(x.dtype)
        t0 = time.perf_counter()
        refined = refine(
            vae.model,
            vae.guide,
            x,
            seed=1,
            num_steps=args.refine_steps,
            lr=args.refine_lr,
            num_samples=4,
            average=True,
            num_eval_samples=200,
        )
        refine_seconds = time.perf_counter() - t0
        # the ELBO after the training-time refinement (sa_steps SGD steps of sa_lr, clipped), as SA-VAE
        # reports its test ELBO: each datapoint's own K steps, then 100 draws of the ELBO there
        torch.manual_seed(3)
        loc, scale = vae.encoder(x)
        loc_k, log_scale_k = refine_unrolled(
            vae,
            x,
            loc.detach(),
            scale.log().detach(),
            num_steps=args.sa_steps,
            lr=args.sa_lr,
            max_grad_norm=5.0,
            create_graph=False,
        )
        with torch.no_grad():
            sa_elbo = torch.stack([gaussian_elbo(vae, x, loc_k, log_scale_k) for _ in range(100)]).mean(0)
        iw = importance_estimate(vae.model, vae.guide, x, num_samples=args.iw_samples, seed=2)
        # the refined q holds one row per datapoint of x: one batch of all of them
        iw_refined = importance_estimate(
            vae.model, refined.guide(), x, num_samples=args.iw_samples, batch_size=x.shape[0], seed=2
        )
        # importance_estimate's field was log_likelihood until the estimators' one result type
        log_px, log_px_refined = (e.log_px if hasattr(e, "log_px") else e.log_likelihood for e in (iw, iw_refined))
        out[method] = {
            "train_seconds": seconds,
            "steps": limit.steps,
            "epochs_completed": int(history.sizes.get("epoch", 0)),
            "test_elbo_encoder": mean_se(refined.elbo_before),
            "test_elbo_refined": mean_se(refined.elbo_after),
            "amortization_gap_closed": mean_se(refined.gap),
            "gap_mc_se_of_mean": float(refined.gap_stderr.pow(2).sum().sqrt() / x.shape[0]),
            "test_iw_log_px": mean_se(log_px),
            "test_iw_log_px_refined_proposal": mean_se(log_px_refined),
            "test_elbo_after_sa_steps": mean_se(sa_elbo),
            "refine_seconds": refine_seconds,
            "loadavg_after": loadavg(),
        }
        print(json.dumps({method: out[method]}), flush=True)
    out["loadavg_end"] = loadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
