"""``ppl-vae calibrate``'s driver: is a run's encoder calibrated, and does its model fit the data?

:func:`calibrate_run` loads a run directory and runs two checks of
:mod:`ppl_vae.analysis.calibration` and :mod:`ppl_vae.analysis.predictive` on it:

- simulation-based calibration (SBC; Talts et al. 2018) of the guide q(z|x) against the run's
  own model: ranks of z* ~ p(z) among guide draws for x ~ p(x|z*), their uniformity (chi-square
  and ECDF with a simultaneous band, Säilynoja et al. 2022) and the coverage of central intervals;
- posterior predictive checks (PPC; Gelman, Meng & Stern 1996) of the selected datapoints of a
  split (:func:`ppl_vae.reports.common.select_datapoints`, the rule of ``evaluate``).

It writes only files of its own names (:data:`FILES`) into ``out_dir`` (default: the run
directory, as ``evaluate``), checked before any work; never the run's ``config.json``,
checkpoint or history, and never through a symlink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import xarray as xr

from ppl_vae import io
from ppl_vae.reports.common import check_out_dir

FILES = {
    "sbc": "calibration_sbc.nc",
    "ppc": "calibration_ppc.nc",
    "sbc_figure": "calibration_sbc.png",
    "ppc_figure": "calibration_ppc.png",
    "worst_figure": "calibration_worst.png",
}
COVERAGE_LEVEL = 0.9
"""The central-interval level the summary reports."""
EXTREME = 0.05
"""A predictive p-value is called extreme when min(p, 1 - p) is below this."""
MAX_LISTED_DIMENSIONS = 8
"""The summary lists at most this many latent dimensions one per line (all norms and log p(x|z) always)."""


def check_targets(out_dir: Path, name: str = "out_dir") -> Dict[str, Path]:
    """The paths of :data:`FILES` in ``out_dir`` (created when missing); a one-line ValueError
    naming ``name`` when the folder cannot hold them or a target is a symlink or a folder."""
    out = check_out_dir(Path(out_dir), name)
    paths = {key: out / file for key, file in FILES.items()}
    for path in paths.values():
        io.check_target(path)
        if path.is_symlink():
            raise ValueError(f"{name}: {path} is a symbolic link; refusing to write through it (remove it)")
        if path.is_dir():
            raise ValueError(f"{name}: {path} is a folder; choose another {name}")
    return paths


def check_simulable(model: Any, guide: Any, x: torch.Tensor, kwargs: Dict[str, Any], name: str, seed: int) -> None:
    """Refuse, before any work, a model that SBC and predictive checks cannot use, with one
    line naming it: a latent site that is not continuous in the data plate (or none at all),
    a guide that does not sample the model's sites, or a p(x|z) that reads the observed x
    itself (a teacher-forced autoregressive decoder, e.g. ``text_hybrid``): running its program
    with ``"x"`` unconditioned then draws each element given the *data's* previous elements,
    not a draw from p(x|z), so neither SBC nor predictive replicates would come from the model.

    Verified, not declared: the model is traced on some datapoints, then replayed with the same
    latents on other datapoints, and the observed site's log-density of the first datapoints
    must not change."""
    from pyro import poutine

    from ppl_vae.inference.latents import guide_layout, model_layout
    from ppl_vae.inference.modes import eval_mode, seeded

    k = min(8, x.shape[0])
    xa = x[:k]
    xb = x.roll(1, 0)[:k] if x.shape[0] > 1 else torch.zeros_like(xa)
    if torch.equal(xa, xb):
        xb = torch.zeros_like(xa) if bool(xa.any()) else torch.ones_like(xa)
    kw: Dict[str, Any] = {
        key: v[:k] if torch.is_tensor(v) and v.dim() and v.shape[0] == x.shape[0] else v for key, v in kwargs.items()
    }
    program = poutine.block(model, hide_types=["param"])
    with torch.no_grad(), eval_mode(model, guide), seeded(seed, x.device):
        try:
            layout = model_layout(model, xa, **kw)
            if not layout.sites:
                raise ValueError("it has no continuous latent site in the 'data' plate to rank")
            guide_layout(guide, xa, layout, **kw)
        except ValueError as exc:
            raise ValueError(f"model {name!r} cannot be calibrated: {exc}") from None
        trace_a = poutine.trace(program).get_trace(xa, **kw)
        trace_b = poutine.trace(poutine.replay(program, trace=trace_a)).get_trace(xb, **kw)
    if "x" not in trace_a.nodes or "x" not in trace_b.nodes:
        raise ValueError(f"model {name!r} has no sample site 'x' (the observed site): it cannot be calibrated")
    log_a = trace_a.nodes["x"]["fn"].log_prob(xa)
    log_b = trace_b.nodes["x"]["fn"].log_prob(xa)
    if not torch.allclose(log_a, log_b, rtol=1e-4, atol=1e-4, equal_nan=True):
        raise ValueError(
            f"model {name!r} cannot be calibrated: its likelihood p(x|z) reads the observed x itself "
            "(a teacher-forced decoder), so x cannot be drawn from its program for SBC or predictive checks"
        )


def _fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


@dataclass
class Calibration:
    """SBC results (``sbc``: ranks, uniformity and coverage merged over ``quantity``), posterior
    predictive checks (``ppc``), and the files written."""

    sbc: xr.Dataset
    ppc: xr.Dataset
    files: Dict[str, Path] = field(default_factory=dict)

    @property
    def outside_band(self) -> List[str]:
        """The SBC quantities whose rank ECDF leaves the simultaneous band."""
        q = self.sbc["quantity"].values
        return [str(v) for v in q[np.asarray(self.sbc["outside_band"].values, dtype=bool)]]

    def summary(self) -> str:
        """Per SBC quantity the chi-square p-value and the 90%-interval coverage ± se, a verdict,
        and per PPC statistic the mean p-value and the share of extreme p-values."""
        s, p = self.sbc, self.ppc
        n, L = int(s.attrs["num_simulations"]), int(s.attrs["num_posterior_samples"])
        cov = s.sel(level=COVERAGE_LEVEL)
        nominal = float(cov["nominal"])
        level = float(s.attrs.get("band_level", 0.95))
        lines = [
            f"SBC of the guide q(z|x) (Talts et al. 2018): {n} simulations (z* ~ p(z), x ~ p(x|z*)), "
            f"L = {L} guide draws each; a calibrated guide gives uniform ranks",
            f"{'quantity':<14} {'chi2 p-value':>12} {'ECDF p-value':>12}  "
            f"coverage of central {COVERAGE_LEVEL:.0%} intervals ± se (nominal {nominal:.3f})",
        ]
        kinds = np.asarray(s["kind"].values).astype(str)
        dims = np.flatnonzero(kinds == "dimension")
        shown = set(dims[:MAX_LISTED_DIMENSIONS].tolist()) | set(np.flatnonzero(kinds != "dimension").tolist())
        for j, quantity in enumerate(s["quantity"].values):
            if j not in shown:
                continue
            lines.append(
                f"{str(quantity):<14} {_fmt_p(float(s['chi2_p_value'][j])):>12} "
                f"{_fmt_p(float(s['ecdf_p_value'][j])):>12}  "
                f"{float(cov['coverage'][j]):.3f} ± {float(cov['coverage_se'][j]):.3f}"
            )
        if len(dims) > MAX_LISTED_DIMENSIONS:
            rest = dims[MAX_LISTED_DIMENSIONS:]
            lines.append(
                f"... {len(rest)} more latent dimensions: smallest chi2 p-value "
                f"{_fmt_p(float(s['chi2_p_value'][rest].min()))}, coverage "
                f"{float(cov['coverage'][rest].min()):.3f} to {float(cov['coverage'][rest].max()):.3f} "
                "(all in calibration_sbc.nc)"
            )
        outside = self.outside_band
        if outside:
            lines.append(
                f"verdict: {len(outside)} of {s.sizes['quantity']} quantities leave the {level:.0%} simultaneous "
                f"ECDF band (not uniform; the guide is miscalibrated for them): {', '.join(outside)}"
            )
        else:
            lines.append(
                f"verdict: no quantity leaves the {level:.0%} simultaneous ECDF band: no evidence of "
                f"miscalibration at {n} simulations"
            )
        m = p.sizes["datapoint"]
        lines.append(
            f"posterior predictive checks (Gelman et al. 1996): {m} {p.attrs.get('split', '')} datapoints, "
            f"R = {p.attrs['num_replicates']} replicates x_rep ~ p(x|z), z ~ q(z|x); p-values near 0.5 "
            "are expected even for a correct model (Meng 1994)"
        )
        for stat in p["statistic"].values:
            pv = p["p_value"].sel(statistic=stat).values
            extreme = float(np.mean(np.minimum(pv, 1.0 - pv) < EXTREME))
            lines.append(
                f"{str(stat):<14} mean p-value {float(pv.mean()):.3f}; share of extreme p-values "
                f"(p < {EXTREME} or p > {1 - EXTREME}) {extreme:.3f}"
            )
        return "\n".join(lines)


def _labels_for_simulations(kwargs: Dict[str, Any], n_data: int, num_simulations: int) -> Dict[str, Any]:
    """Per-datapoint kwargs (labels) for the simulations: the selected datapoints' rows, cycled."""
    index = torch.arange(num_simulations) % n_data
    return {
        k: v[index.to(v.device)] if torch.is_tensor(v) and v.dim() and v.shape[0] == n_data else v
        for k, v in kwargs.items()
    }


def _is_images(run: Any, x: torch.Tensor) -> bool:
    return bool(getattr(run.vae, "generates_images", True)) and (
        x.dim() == 3 or (x.dim() == 4 and x.shape[1] in (1, 3))
    )


def calibrate_run(
    run_dir: Path,
    *,
    num_simulations: int = 200,
    num_posterior_samples: int = 99,
    num_replicates: int = 100,
    num_datapoints: Optional[int] = 500,
    split: str = "test",
    seed: int = 0,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    device: str = "cpu",
) -> Calibration:
    """SBC of the run's guide and posterior predictive checks of ``split``; write :data:`FILES`.

    ``num_simulations`` SBC draws (z*, x) from the run's model, each ranked among
    ``num_posterior_samples`` (L) guide draws (L + 1 = 100 rank values by default);
    ``num_replicates`` replicates per datapoint for the predictive checks of ``num_datapoints``
    datapoints of ``split`` (None or 0: all; else the seeded subset ``evaluate`` uses).
    Conditional models simulate with the selected datapoints' labels, cycled. Files go to
    ``out_dir`` (default: the run directory), checked before any work is done; the image of
    the worst-fitting datapoints is drawn for image data only. Everything draws from ``seed``;
    the caller's RNG state is left as it was.
    """
    from ppl_vae.analysis import results
    from ppl_vae.analysis.calibration import coverage, plot_sbc_ecdf, sbc_ranks, sbc_uniformity
    from ppl_vae.analysis.predictive import plot_p_values, plot_worst_fitting, posterior_predictive_check
    from ppl_vae.pipeline import load_run
    from ppl_vae.reports.common import select_datapoints

    for arg, value in (
        ("num_simulations", num_simulations),
        ("num_posterior_samples", num_posterior_samples),
        ("num_replicates", num_replicates),
    ):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value}")
    if num_simulations < 2:
        raise ValueError(f"num_simulations must be >= 2 (uniformity needs several ranks), got {num_simulations}")
    if num_datapoints is not None and num_datapoints < 0:
        raise ValueError(f"num_datapoints must be >= 0 (0: all), got {num_datapoints}")
    run = load_run(run_dir, device)
    sel = select_datapoints(run, split, num_datapoints or None, seed)
    vae, name = run.vae, run.config.model.model
    kwargs = sel.model_kwargs(run)
    check_simulable(vae.model, vae.guide, sel.x, kwargs, name, seed)  # a few datapoints: cheap
    paths = check_targets(Path(run.run_dir) if out_dir is None else Path(out_dir))

    from tqdm.auto import tqdm

    bar = tqdm(total=2, desc="calibrate", disable=not progress, leave=False)
    try:
        bar.set_postfix_str("SBC")
        ranks = sbc_ranks(
            vae.model,
            vae.guide,
            num_simulations=num_simulations,
            num_posterior_samples=num_posterior_samples,
            seed=seed,
            x_like=sel.x[:1],
            **_labels_for_simulations(kwargs, sel.x.shape[0], num_simulations),
        )
        uniformity = sbc_uniformity(ranks)
        covered = coverage(ranks, levels=sorted({0.5, 0.8, COVERAGE_LEVEL, 0.95}))
        bar.update()
        bar.set_postfix_str("predictive checks")
        ppc = posterior_predictive_check(
            vae.model, vae.guide, sel.x, num_replicates=num_replicates, seed=seed, **kwargs
        )
        bar.update()
    finally:
        bar.close()

    common = {
        "run_dir": str(run.run_dir),
        "model": name,
        "dataset": run.config.data.dataset,
        "seed": int(seed),
    }
    sbc = xr.merge([ranks, uniformity, covered], combine_attrs="drop_conflicts")
    sbc["outside_band"] = sbc["outside_band"].astype(np.int8)
    sbc["outside_band"].attrs["description"] = "1 when the rank ECDF leaves the simultaneous band"
    sbc.attrs.update(ranks.attrs)
    sbc.attrs.update(
        {
            **common,
            "band_level": float(uniformity.attrs["level"]),
            "chi2_df": int(uniformity.attrs["chi2_df"]),
            "num_bins": int(uniformity.attrs["num_bins"]),
            "reference": str(uniformity.attrs["reference"]),
            "data": "simulated from the run's model: z* ~ p(z), x ~ p(x|z*)",
        }
    )
    ppc = ppc.assign_coords(datapoint=sel.index)
    ppc.attrs.update(
        {**common, "split": split, "num_datapoints": int(len(sel.index)), "preprocessing": str(sel.preprocessing)}
    )
    result = Calibration(sbc, ppc)
    result.files["sbc"] = results.save_netcdf(sbc, paths["sbc"])
    result.files["ppc"] = results.save_netcdf(ppc, paths["ppc"])
    import matplotlib.pyplot as plt

    figures = [("sbc_figure", plot_sbc_ecdf(uniformity)), ("ppc_figure", plot_p_values(ppc))]
    if _is_images(run, sel.x):
        statistic = str(ppc["statistic"].values[0])
        worst = plot_worst_fitting(sel.x.cpu(), ppc.assign_coords(datapoint=np.arange(len(sel.index))), statistic)
        figures.append(("worst_figure", worst))
    for key, fig in figures:
        result.files[key] = io.write_figure(fig, paths[key], dpi=120)
        plt.close(fig)
    return result


__all__ = ["FILES", "Calibration", "calibrate_run", "check_simulable", "check_targets"]
