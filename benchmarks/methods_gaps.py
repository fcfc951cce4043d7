"""Inference gaps (Cremer et al. 2018) of the runs benchmarks/methods_mnist.py trained.

For the first ``--num-test`` test datapoints of each run: the encoder's ELBO L[q(z|x)], the
per-datapoint mean-field optimum L[q*_mf] (fit_mean_field), the per-datapoint flow optimum
L[q*_flow] (fit_local_flow, started at q*_mf), and log p̂_K(x) with the encoder and with q*_flow
as proposals (the reference log p̂ is the larger of the two per datapoint). Every L is a Monte
Carlo estimate of a lower bound on log p(x); log p̂_K is one too, so the "approximation gap"
log p̂ - L[q*] is itself a lower estimate of the true gap.

    python benchmarks/methods_gaps.py --runs /tmp/methods --data-dir /work/shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ppl_vae import pipeline
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.local_flows import fit_local_flow
from ppl_vae.inference.meanfield import fit_mean_field
from ppl_vae.models.guides import IAFGuideVAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--flow-steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {}
    for run_dir in sorted(p for p in args.runs.iterdir() if (p / "checkpoint.safetensors").is_file()):
        run = pipeline.load_run(run_dir)
        data = pipeline.load_data(run.config, data_dir=args.data_dir)
        x = data.test[: args.num_test]
        vae = run.vae
        start = time.perf_counter()
        torch.manual_seed(0)
        with torch.no_grad():
            est = importance_estimate(vae.model, vae.guide, x, num_samples=args.num_samples, batch_size=100)
        init = "prior" if isinstance(vae, IAFGuideVAE) else "encoder"  # a flow guide has no closed-form moments
        mf = fit_mean_field(vae.model, vae.guide, x, init=init, progress=False, num_eval_samples=1000)
        flow = fit_local_flow(
            vae.model,
            None,
            x,
            init_loc=mf.loc,
            init_scale=mf.scale,
            num_flows=2,
            max_steps=args.flow_steps,
            num_eval_samples=args.num_samples,
        )
        # Both IW estimates are stochastic lower bounds on log p(x); the reference is the larger.
        best = torch.maximum(est.log_px, flow.estimate.log_px)
        row = {
            "log_p_hat_encoder": float(est.log_px.mean()),
            "log_p_hat_flow_q_star": float(flow.estimate.log_px.mean()),
            "log_p_hat": float(best.mean()),
            "elbo_encoder": float(est.elbo.mean()),
            "elbo_mean_field_q_star": float(mf.elbo.mean()),
            "elbo_flow_q_star": float(flow.elbo.mean()),
            "flow_converged_fraction": float(flow.converged.float().mean()),
            "mean_field_converged_fraction": float(mf.converged.float().mean()),
            "seconds": time.perf_counter() - start,
        }
        row["amortization_gap_mf"] = row["elbo_mean_field_q_star"] - row["elbo_encoder"]
        row["approximation_gap_mf"] = row["log_p_hat"] - row["elbo_mean_field_q_star"]
        row["approximation_gap_flow"] = row["log_p_hat"] - row["elbo_flow_q_star"]
        out[run_dir.name] = row
        print(run_dir.name, json.dumps(row), flush=True)
        (args.runs / "gaps.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
