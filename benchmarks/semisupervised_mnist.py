"""M2's test error with few labels and the GMVAE's cluster accuracy on MNIST, at a CPU-sized budget.

Each row is a run of ``ppl_vae.pipeline.fit`` (what ``ppl-vae fit`` does) on MNIST with dynamic
binarization, then: M2's test classification error of argmax q(y | x) on the whole test set,
the ELBO U(x) and IW log p̂(x) with y summed out (per class, K draws of z per class) on a fixed
test subset; the GMVAE's cluster accuracy (argmax q(c | x), each cluster mapped to the majority
label of the training points it holds) on the test set, and its ELBO and IW log p̂(x) with c
summed out; the relaxed GMVAE's IW log p̂(x) on the relaxed (Concrete) model at its final
temperature, beside the exact discrete marginal of the same parameters (``exact_discrete()``). Prints one line per row and the exact settings; writes nothing but the run folders
(under --out, default a temporary folder).

    python benchmarks/semisupervised_mnist.py --data-dir ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=None, help="first N training points (default: all 60,000)")
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--hidden-dim", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-size", type=int, default=500, help="test points for the ELBO and IW")
    parser.add_argument("--num-samples", type=int, default=100, help="IW draws of z per class")
    parser.add_argument(
        "--rows", nargs="+", default=["m2", "gmvae", "relaxed_gmvae"], choices=["m2", "gmvae", "relaxed_gmvae"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ppl_vae import pipeline
    from ppl_vae.analysis.semisupervised import classification_error, cluster_accuracy, majority_mapping
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.inference.enumerated import enumerated_estimate
    from ppl_vae.inference.importance import importance_estimate

    out = Path(args.out or tempfile.mkdtemp(prefix="ssvae-"))
    print(f"settings: {json.dumps(vars(args))}")
    jobs = [("m2", n) for n in args.labels] if "m2" in args.rows else []
    jobs += [(name, None) for name in ("gmvae", "relaxed_gmvae") if name in args.rows]
    for model, labels in jobs:
        config = RunConfig(
            model=ModelConfig(model=model, hidden_dim=args.hidden_dim),
            data=DataConfig(
                dataset="mnist", data_dir=args.data_dir, binarize="dynamic", train_size=args.train_size, labels=labels
            ),
            train=TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                device="cpu",
                train_eval_size=1000,
            ),
        )
        start = time.perf_counter()
        run = pipeline.fit(config, out / f"{model}-{labels}", progress=False)
        train_s = time.perf_counter() - start
        data = pipeline.load_data(config)
        vae = run.vae.eval()
        x_eval = data.test[: args.eval_size]
        row = {}
        if model == "relaxed_gmvae":  # IW on the relaxed model itself, K = num_samples * components draws
            relaxed = importance_estimate(
                vae.model, vae.guide, x_eval, num_samples=args.num_samples * vae.num_values, seed=args.seed
            )
            n = len(x_eval)
            row.update(
                temperature=round(vae.temperature, 4),
                relaxed_iw_logp=round(float(relaxed.log_px.mean()), 3),
                relaxed_iw_se=round(float(relaxed.log_px.std() / n**0.5), 3),
                relaxed_khat_mean=round(float(relaxed.khat.mean()), 3),
            )
        with vae.exact_discrete() if model == "relaxed_gmvae" else contextlib.nullcontext():
            est = enumerated_estimate(
                vae.model,
                vae.guide,
                x_eval,
                site=vae.site,
                num_values=vae.num_values,
                num_samples=args.num_samples,
                seed=args.seed,
            )
        n = len(x_eval)
        iw, iw_se = float(est.log_px.mean()), float(est.log_px.std() / n**0.5)
        elbo, elbo_se = float(est.elbo.mean()), float(est.elbo.std() / n**0.5)
        row = {
            **row,
            "model": model,
            "labels": labels,
            "epochs": run.epochs_done,
            "train_s": round(train_s, 1),
            "test_elbo_history": round(run.final["test_elbo"], 3),
            f"iw_logp_K{args.num_samples}_per_value": round(iw, 3),
            "iw_se": round(iw_se, 3),
            "elbo_summed": round(elbo, 3),
            "elbo_se": round(elbo_se, 3),
            "eval_points": n,
        }
        if model == "m2":
            error, se = classification_error(vae, data.test, data.test_labels)
            row.update(test_error=round(error, 4), test_error_se=round(se, 4))
        else:
            with torch.no_grad():
                train_clusters = torch.cat(
                    [vae.cluster(data.train[i : i + 1000]) for i in range(0, data.train.shape[0], 1000)]
                )
                test_clusters = vae.cluster(data.test)
            mapping = majority_mapping(train_clusters, data.train_labels, vae.num_values)
            acc = cluster_accuracy(test_clusters, data.test_labels, vae.num_values, mapping=mapping)
            row.update(cluster_accuracy=round(acc, 4), clusters_used=int(len(set(test_clusters.tolist()))))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
