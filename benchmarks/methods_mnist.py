"""Inference methods on dynamically binarized MNIST at a CPU-sized budget: the numbers in docs/methods.md.

Trains the same bernoulli_mlp (tanh MLP, one hidden layer) with five variants -- ELBO (svi),
IWAE k=5, IWAE k=50, an IAF guide trained on the ELBO, and a VampPrior trained on the ELBO --
for the same epochs on the same training subset, then scores the same test datapoints with the
importance-weighted estimate log p̂_K(x) (Burda et al. 2015; a stochastic lower bound on log p(x)),
with each model's own guide as proposal, and its ELBO.

    python benchmarks/methods_mnist.py --data-dir /work/shared/datasets/mnist --out /tmp/methods
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ppl_vae import pipeline
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.inference.importance import importance_estimate

VARIANTS = {
    "elbo": dict(method="svi", num_particles=1),
    "iwae_k5": dict(method="iwae", num_particles=5),
    "iwae_k50": dict(method="iwae", num_particles=50),
    "iaf_guide": dict(method="svi", num_particles=1, guide="iaf", guide_options={"num_flows": 2}),
    "vamp_prior": dict(method="svi", num_particles=1, prior="vamp", prior_options={"num_components": 100}),
    # extras, not in the default set
    "dreg_k50": dict(method="dreg", num_particles=50),
    "vamp_prior_warmup": dict(
        method="svi",
        num_particles=1,
        prior="vamp",
        prior_options={"num_components": 100},
        train={"kl_warmup_epochs": 3},
    ),
}
DEFAULT_VARIANTS = ["elbo", "iwae_k5", "iwae_k50", "iaf_guide", "vamp_prior"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--hidden-dim", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=2000, help="K of the test log p̂_K(x)")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--baseline", type=Path, help="an earlier run of the 'elbo' variant to pair against")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results, per_datapoint = {}, {}
    if args.baseline is not None:
        base = pipeline.load_run(args.baseline)
        x = pipeline.load_data(base.config).test[: args.num_test]
        torch.manual_seed(0)
        with torch.no_grad():
            per_datapoint["elbo"] = importance_estimate(
                base.vae.model, base.vae.guide, x, num_samples=args.num_samples, batch_size=100
            ).log_px
    for name in args.variants:
        v = dict(VARIANTS[name])
        method, k, train_extra = v.pop("method"), v.pop("num_particles"), v.pop("train", {})
        config = RunConfig(
            model=ModelConfig(model="bernoulli_mlp", latent_dim=args.latent_dim, hidden_dim=args.hidden_dim, **v),
            data=DataConfig(dataset="mnist", data_dir=args.data_dir, binarize="dynamic", train_size=args.train_size),
            train=TrainConfig(
                method=method,
                num_particles=k,
                epochs=args.epochs,
                batch_size=100,
                lr=1e-3,
                device="cpu",
                train_eval_size=1000,
                **train_extra,
            ),
        )
        start = time.perf_counter()
        run = pipeline.fit(config, args.out / name, progress=False)
        train_s = time.perf_counter() - start
        data = pipeline.load_data(config)
        x = data.test[: args.num_test]
        run.vae.eval()
        start = time.perf_counter()
        torch.manual_seed(0)
        with torch.no_grad():
            est = importance_estimate(run.vae.model, run.vae.guide, x, num_samples=args.num_samples, batch_size=100)
        eval_s = time.perf_counter() - start
        results[name] = {
            "test_log_p_hat": float(est.log_px.mean()),
            "test_log_p_hat_stderr_mean": float(est.log_px_stderr.mean()),
            "test_log_p_hat_sem_over_datapoints": float(est.log_px.std() / len(x) ** 0.5),
            "test_elbo": float(est.elbo.mean()),
            "train_s": train_s,
            "eval_s": eval_s,
            "last_epoch": run.final,
        }
        per_datapoint[name] = est.log_px
        if "elbo" in per_datapoint and name != "elbo":  # paired: the same test datapoints
            diff = est.log_px - per_datapoint["elbo"]
            results[name]["paired_gain_over_elbo"] = float(diff.mean())
            results[name]["paired_gain_over_elbo_sem"] = float(diff.std() / len(diff) ** 0.5)
        print(name, json.dumps(results[name]), flush=True)
        (args.out / "results.json").write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
