"""``ppl-vae calibrate``'s driver: is a run's encoder calibrated, and does its model fit the data?

:func:`calibrate_run` loads a run directory and runs two checks of
:mod:`ppl_vae.analysis.calibration` and :mod:`ppl_vae.analysis.predictive` on it:

- simulation-based calibration (SBC; Talts et al. 2018) of the guide q(z|x) against the run's
  own model: ranks of z* ~ p(z) among guide draws for x ~ p(x|z*), their uniformity (chi-square
  and ECDF with a simultaneous band, Säilynoja et al. 2022) and the coverage of central intervals;
- posterior predictive checks (PPC; Gelman, Meng & Stern 1996) of the selected datapoints of a
  split (:func:`ppl_vae.reports.common.select_datapoints`, the rule of ``evaluate``);
- for a model with a discrete site it sums out by enumeration (M2's y, the GMVAE's c): the
  calibration of the guide's q(c|x) against the model's own posterior p(c|x) on those
  datapoints (ECE and its debiased square with bootstrap se, reliability diagram, mean total
  variation and KL), and against the split's labels when the site is the labels' ``y``;
- with ``sir`` K: SBC of sampling-importance-resampling from the guide (K proposals) on the
  same simulations, beside the guide's.

It writes only files of its own names (:data:`FILES`) into ``out_dir`` (default: the run
directory, as ``evaluate``), checked before any work; never the run's ``config.json``,
checkpoint or history, and never through a symlink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import xarray as xr

from ppl_vae import io
from ppl_vae.reports.common import check_out_dir

FILES = {
    "sbc": "calibration_sbc.nc",
    "sir": "calibration_sbc_sir.nc",
    "ppc": "calibration_ppc.nc",
    "discrete": "calibration_discrete.nc",
    "sbc_figure": "calibration_sbc.png",
    "ppc_figure": "calibration_ppc.png",
    "worst_figure": "calibration_worst.png",
    "discrete_figure": "calibration_discrete.png",
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


def _merged_sbc(ranks: xr.Dataset, common: Dict[str, Any]) -> Tuple[xr.Dataset, xr.Dataset]:
    """(ranks, uniformity and coverage merged over ``quantity``; the uniformity alone)."""
    from ppl_vae.analysis.calibration import coverage, sbc_uniformity

    uniformity = sbc_uniformity(ranks)
    covered = coverage(ranks, levels=sorted({0.5, 0.8, COVERAGE_LEVEL, 0.95}))
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
    return sbc, uniformity


def _outside(sbc: xr.Dataset) -> List[str]:
    q = sbc["quantity"].values
    return [str(v) for v in q[np.asarray(sbc["outside_band"].values, dtype=bool)]]


@dataclass
class Calibration:
    """SBC results (``sbc``: ranks, uniformity and coverage merged over ``quantity``; ``sir``: the
    same for SIR draws, or None), posterior predictive checks (``ppc``), the calibration of a
    discrete site (``discrete``, or None), what was ``skipped`` and why, and the files written."""

    sbc: Optional[xr.Dataset]
    ppc: Optional[xr.Dataset]
    files: Dict[str, Path] = field(default_factory=dict)
    discrete: Optional[xr.Dataset] = None
    sir: Optional[xr.Dataset] = None
    skipped: List[str] = field(default_factory=list)

    @property
    def outside_band(self) -> List[str]:
        """The SBC quantities whose rank ECDF leaves the simultaneous band."""
        return [] if self.sbc is None else _outside(self.sbc)

    def summary(self) -> str:
        """Per SBC quantity the chi-square p-value and the 90%-interval coverage ± se, a verdict
        (and the same for SIR), per PPC statistic the mean p-value and the share of extreme
        p-values, and for a discrete site its calibration errors and distance to p(c|x)."""
        lines = [f"skipped: {reason}" for reason in self.skipped]
        if self.sbc is not None:
            lines += self._sbc_lines(self.sbc, "the guide q(z|x)")
        if self.sir is not None:
            lines += self._sbc_lines(
                self.sir,
                f"SIR from the guide (K = {self.sir.attrs['sir_num_samples']} proposals, resampled by "
                f"p(x,z)/q(z|x); median ESS {float(self.sir['sir_ess'].median()):.1f}) on the same simulations",
            )
        if self.ppc is not None:
            lines += self._ppc_lines(self.ppc)
        if self.discrete is not None:
            lines += self._discrete_lines(self.discrete)
        return "\n".join(lines)

    @staticmethod
    def _sbc_lines(s: xr.Dataset, what: str) -> List[str]:
        n, L = int(s.attrs["num_simulations"]), int(s.attrs["num_posterior_samples"])
        cov = s.sel(level=COVERAGE_LEVEL)
        nominal = float(cov["nominal"])
        level = float(s.attrs.get("band_level", 0.95))
        lines = [
            f"SBC of {what} (Talts et al. 2018): {n} simulations (z* ~ p(z), x ~ p(x|z*)), "
            f"L = {L} draws each; a calibrated posterior gives uniform ranks",
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
                "(all in the netCDF)"
            )
        outside = _outside(s)
        if outside:
            lines.append(
                f"verdict: {len(outside)} of {s.sizes['quantity']} quantities leave the {level:.0%} simultaneous "
                f"ECDF band (not uniform; miscalibrated for them): {', '.join(outside)}"
            )
        else:
            lines.append(
                f"verdict: no quantity leaves the {level:.0%} simultaneous ECDF band: no evidence of "
                f"miscalibration at {n} simulations"
            )
        return lines

    @staticmethod
    def _ppc_lines(p: xr.Dataset) -> List[str]:
        lines = [
            f"posterior predictive checks (Gelman et al. 1996): {p.sizes['datapoint']} {p.attrs.get('split', '')} "
            f"datapoints, R = {p.attrs['num_replicates']} replicates x_rep ~ p(x|z), z ~ q(z|x); p-values near "
            "0.5 are expected even for a correct model (Meng 1994)"
        ]
        for stat in p["statistic"].values:
            pv = p["p_value"].sel(statistic=stat).values
            extreme = float(np.mean(np.minimum(pv, 1.0 - pv) < EXTREME))
            lines.append(
                f"{str(stat):<14} mean p-value {float(pv.mean()):.3f}; share of extreme p-values "
                f"(p < {EXTREME} or p > {1 - EXTREME}) {extreme:.3f}"
            )
        return lines

    @staticmethod
    def _discrete_lines(d: xr.Dataset) -> List[str]:
        site, c = d.attrs["site"], d.sizes["value"]
        bins = f"{d.attrs['num_bins']} {str(d.attrs['binning']).replace('_', '-')} bins"
        lines = [
            f"discrete site {site!r}: q({site}|x) against the model's own posterior p({site}|x) on "
            f"{d.sizes['datapoint']} {d.attrs.get('split', '')} datapoints (enumeration over {c} values, "
            f"p(x, {site}) by IW with K = {d.attrs['num_samples']} draws of z ~ q(z|x, {site}) each; "
            f"mean MC se of p({site}|x) {float(d['posterior_se'].mean()):.4f})",
            f"top-label calibration over {bins}; accuracy: the reference's probability of q's top value, or "
            "the share of correct labels; the L1 ECE exceeds 0 by noise alone, the debiased CE^2 "
            "(Kumar et al. 2019) is 0 in expectation for a calibrated q",
            f"{'comparison':<20} {'accuracy':>8} {'confidence':>10} {'ECE ± se':>17} {'debiased CE^2 ± se':>21}",
        ]
        for name in d["comparison"].values:
            r = d.sel(comparison=name)
            flag = "  miscalibrated (CE^2 > 3 se)" if int(r["miscalibrated"]) else ""
            ece = f"{float(r['ece']):.4f} ± {float(r['ece_se']):.4f}"
            ce2 = f"{float(r['ce2']):.2e} ± {float(r['ce2_se']):.1e}"
            lines.append(
                f"{str(name):<20} {float(r['accuracy']):>8.3f} {float(r['confidence']):>10.3f} {ece:>17} {ce2:>21}{flag}"
            )
        lines.append(
            f"distance of q({site}|x) to p({site}|x): mean total variation {float(d['mean_tv']):.4f} ± "
            f"{float(d['mean_tv_se']):.4f}, mean KL(p || q) {float(d['mean_kl']):.4f} ± {float(d['mean_kl_se']):.4f} nats"
        )
        return lines


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


def check_sir(sir: Optional[int], num_posterior_samples: int, name: str = "sir") -> None:
    """A one-line ValueError unless ``sir`` (K proposals) is None or at least max(2, L): resampling
    L draws from fewer proposals repeats them, and one proposal is the guide itself."""
    if sir is None:
        return
    if isinstance(sir, bool) or int(sir) != sir or sir < max(2, num_posterior_samples):
        raise ValueError(
            f"{name} (SIR proposals K) must be an integer >= max(2, L = {num_posterior_samples}) so that the "
            f"L draws can come from distinct proposals, got {sir}"
        )


def _discrete_site(vae: Any, name: str) -> Optional[str]:
    sites = tuple(getattr(vae, "enumerated_sites", ()))
    if len(sites) > 1:
        raise ValueError(
            f"model {name!r} enumerates several discrete sites ({', '.join(sites)}); calibrate handles one"
        )
    return sites[0] if sites else None


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
    sir: Optional[int] = None,
    discrete_num_samples: int = 100,
    num_bins: int = 10,
    binning: str = "equal_width",
    num_bootstrap: int = 1000,
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

    ``sir`` K (default None: off): also SBC of sampling-importance-resampling with K >= L
    proposals from the guide, on the same simulations (:func:`~ppl_vae.analysis.calibration.sir_draws`).

    A model with a discrete site it enumerates (``enumerated_sites``: M2's y, the GMVAE's c) also
    gets the calibration of q(c|x) against its posterior p(c|x) on the selected datapoints, with
    ``discrete_num_samples`` IW draws of z per value, ECE over ``num_bins`` ``binning`` bins
    (``"equal_width"`` or ``"equal_mass"``) and ``num_bootstrap`` bootstrap resamples for the se;
    and against the split's labels when the site is ``y`` (the labels' site). When such a
    model's program cannot be simulated, SBC and predictive checks are skipped (with the reason)
    and the discrete calibration still runs.
    """
    from ppl_vae.analysis import results
    from ppl_vae.analysis.calibration import (
        BINNINGS,
        discrete_calibration,
        discrete_posterior,
        plot_reliability,
        plot_sbc_ecdf,
        sbc_ranks,
    )
    from ppl_vae.analysis.predictive import plot_p_values, plot_worst_fitting, posterior_predictive_check
    from ppl_vae.pipeline import load_run
    from ppl_vae.reports.common import select_datapoints

    for arg, value in (
        ("num_simulations", num_simulations),
        ("num_posterior_samples", num_posterior_samples),
        ("num_replicates", num_replicates),
        ("discrete_num_samples", discrete_num_samples),
        ("num_bins", num_bins),
        ("num_bootstrap", num_bootstrap),
    ):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value}")
    if num_simulations < 2:
        raise ValueError(f"num_simulations must be >= 2 (uniformity needs several ranks), got {num_simulations}")
    if num_datapoints is not None and num_datapoints < 0:
        raise ValueError(f"num_datapoints must be >= 0 (0: all), got {num_datapoints}")
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    check_sir(sir, num_posterior_samples)
    run = load_run(run_dir, device)
    sel = select_datapoints(run, split, num_datapoints or None, seed)
    vae, name = run.vae, run.config.model.model
    kwargs = sel.model_kwargs(run)
    site = _discrete_site(vae, name)
    if site is not None and sel.x.shape[0] < 2:
        raise ValueError(f"num_datapoints must be >= 2 for the calibration of site {site!r}, got {sel.x.shape[0]}")
    skipped: List[str] = []
    try:
        check_simulable(vae.model, vae.guide, sel.x, kwargs, name, seed)  # a few datapoints: cheap
        simulable = True
    except ValueError as exc:
        if site is None:
            raise
        simulable = False
        skipped.append(f"SBC and predictive checks of the continuous sites ({exc})")
    paths = check_targets(Path(run.run_dir) if out_dir is None else Path(out_dir))

    from tqdm.auto import tqdm

    steps = (2 + (sir is not None) if simulable else 0) + (site is not None)
    bar = tqdm(total=steps, desc="calibrate", disable=not progress, leave=False)
    common = {
        "run_dir": str(run.run_dir),
        "model": name,
        "dataset": run.config.data.dataset,
        "seed": int(seed),
    }
    sbc = sir_sbc = ppc = discrete = None
    figures: List[Tuple[str, Any]] = []
    try:
        if simulable:
            bar.set_postfix_str("SBC")
            sim = dict(
                num_simulations=num_simulations,
                num_posterior_samples=num_posterior_samples,
                seed=seed,
                x_like=sel.x[:1],
                **_labels_for_simulations(kwargs, sel.x.shape[0], num_simulations),
            )
            sbc, uniformity = _merged_sbc(sbc_ranks(vae.model, vae.guide, **sim), common)
            bar.update()
            compare = {}
            if sir is not None:
                bar.set_postfix_str(f"SBC of SIR, K={sir}")
                sir_sbc, sir_uniformity = _merged_sbc(
                    sbc_ranks(vae.model, vae.guide, sir_num_samples=int(sir), **sim), common
                )
                compare = {f"SIR K={sir}": sir_uniformity}
                bar.update()
            figures.append(("sbc_figure", plot_sbc_ecdf(uniformity, compare=compare)))
            bar.set_postfix_str("predictive checks")
            ppc = posterior_predictive_check(
                vae.model, vae.guide, sel.x, num_replicates=num_replicates, seed=seed, **kwargs
            )
            ppc = ppc.assign_coords(datapoint=sel.index)
            ppc.attrs.update(
                {
                    **common,
                    "split": split,
                    "num_datapoints": int(len(sel.index)),
                    "preprocessing": str(sel.preprocessing),
                }
            )
            figures.append(("ppc_figure", plot_p_values(ppc)))
            if _is_images(run, sel.x):
                statistic = str(ppc["statistic"].values[0])
                worst = plot_worst_fitting(
                    sel.x.cpu(), ppc.assign_coords(datapoint=np.arange(len(sel.index))), statistic
                )
                figures.append(("worst_figure", worst))
            bar.update()
        if site is not None:
            bar.set_postfix_str(f"discrete site {site}")
            posterior = discrete_posterior(
                vae.model, vae.guide, sel.x, site=site, seed=seed, num_samples=discrete_num_samples, **kwargs
            )
            labels = None
            if site == "y" and sel.labels is not None and bool((sel.labels >= 0).all()):
                labels = sel.labels.cpu().numpy()  # the site is the labels' own: compare with them
            discrete = discrete_calibration(
                posterior, labels, num_bins=num_bins, binning=binning, num_bootstrap=num_bootstrap, seed=seed
            )
            discrete = discrete.assign_coords(datapoint=sel.index)
            discrete.attrs.update(
                {
                    **common,
                    "split": split,
                    "num_datapoints": int(len(sel.index)),
                    "preprocessing": str(sel.preprocessing),
                }
            )
            figures.append(("discrete_figure", plot_reliability(discrete)))
            bar.update()
    finally:
        bar.close()

    result = Calibration(sbc, ppc, discrete=discrete, sir=sir_sbc, skipped=skipped)
    for key, ds in (("sbc", sbc), ("sir", sir_sbc), ("ppc", ppc), ("discrete", discrete)):
        if ds is not None:
            result.files[key] = results.save_netcdf(ds, paths[key])
    import matplotlib.pyplot as plt

    for key, fig in figures:
        result.files[key] = io.write_figure(fig, paths[key], dpi=120)
        plt.close(fig)
    return result


__all__ = ["FILES", "Calibration", "calibrate_run", "check_simulable", "check_sir", "check_targets"]
