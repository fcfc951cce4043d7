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
  same simulations, beside the guide's;
- with ``refine`` K: SBC of the refined q_K(z|x) (each simulated x's encoder Gaussian refined by
  K Adam steps on its own ELBO, semi-amortized inference) on the same simulations, and the
  amortization gap the K steps close on the selected datapoints of the split;
- with ``mean_field``: SBC of the mean-field q*(z) fitted to each simulated x alone (the best
  diagonal Gaussian per datapoint, Cremer et al. 2018) on the same simulations, and the ELBO
  q* gains over the encoder on each of them.

Besides the netCDF files and PNG figures it writes ``calibration.html``, one self-contained page
(figures embedded) with every number of the summary and what each one is.

It writes only files of its own names (:data:`FILES`) into ``out_dir`` (default: the run
directory, as ``evaluate``), checked before any work; never the run's ``config.json``,
checkpoint or history, and never through a symlink.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np
import torch
import xarray as xr

from ppl_vae import io
from ppl_vae.reports.common import CSS, check_out_dir, figure_to_data_uri, weights_scored

FILES = {
    "sbc": "calibration_sbc.nc",
    "sir": "calibration_sbc_sir.nc",
    "refined": "calibration_sbc_refined.nc",
    "meanfield": "calibration_sbc_meanfield.nc",
    "refine": "calibration_refine.nc",
    "ppc": "calibration_ppc.nc",
    "discrete": "calibration_discrete.nc",
    "sbc_figure": "calibration_sbc.png",
    "ppc_figure": "calibration_ppc.png",
    "worst_figure": "calibration_worst.png",
    "discrete_figure": "calibration_discrete.png",
    "report": "calibration.html",
}
COVERAGE_LEVEL = 0.9
"""The central-interval level the summary reports."""
DISPERSION_LEVELS = (0.5, 0.9)
COVERAGE_LEVELS = (0.5, 0.8, COVERAGE_LEVEL, 0.95)
"""The levels of central intervals whose coverage is reported, where L draws can form them."""


def _left_out(level: float, num_posterior_samples: int) -> int:
    """Draws a central interval at ``level`` leaves out on each side (as :func:`coverage` forms it)."""
    return int(math.floor(round((1.0 - level) * (num_posterior_samples + 1) / 2.0, 9)))


def coverage_levels(num_posterior_samples: int) -> List[float]:
    """The levels of :data:`COVERAGE_LEVELS` whose central interval of L draws leaves out at least
    one draw on each side: with none left out every rank lies inside, and the 'coverage' is 1 by
    construction (at L = 9 the 90% interval was all ten ranks, printed as coverage 1.000)."""
    return [a for a in COVERAGE_LEVELS if _left_out(a, num_posterior_samples) >= 1]


#: the fewest draws L for which the headline and dispersion levels' intervals leave a draw out
MIN_POSTERIOR_SAMPLES = next(
    n for n in range(1, 10_000) if all(_left_out(a, n) >= 1 for a in {COVERAGE_LEVEL, *DISPERSION_LEVELS})
)
"""The levels of the coverage pooled over latent dimensions (:func:`~ppl_vae.analysis.calibration.dispersion`)."""
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
    from ppl_vae.analysis.calibration import format_p_value

    return format_p_value(p)


def _merged_sbc(ranks: xr.Dataset, common: Dict[str, Any]) -> Tuple[xr.Dataset, xr.Dataset]:
    """(ranks, uniformity and coverage merged over ``quantity``; the uniformity alone)."""
    from ppl_vae.analysis.calibration import coverage, sbc_uniformity

    uniformity = sbc_uniformity(ranks)
    covered = coverage(ranks, levels=coverage_levels(int(ranks.attrs["num_posterior_samples"])))
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
    refined: Optional[xr.Dataset] = None
    refine: Optional[xr.Dataset] = None
    meanfield: Optional[xr.Dataset] = None

    def posteriors(self) -> List[Tuple[str, xr.Dataset]]:
        """(label, SBC dataset) of each posterior checked on the simulations: the guide, then the
        refined q, the mean-field q* and SIR when they were asked for."""
        out = [] if self.sbc is None else [("encoder q(z|x)", self.sbc)]
        if self.refined is not None:
            out.append((f"refined q, K={self.refined.attrs['refine_steps']}", self.refined))
        if self.meanfield is not None:
            out.append((MEAN_FIELD_LABEL, self.meanfield))
        if self.sir is not None:
            out.append((f"SIR, K={self.sir.attrs['sir_num_samples']}", self.sir))
        return out

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
        if self.refined is not None:
            lines += self._sbc_lines(
                self.refined, f"the refined q ({_refine_words(self.refined)}) on the same simulations"
            )
        if self.meanfield is not None:
            lines += self._sbc_lines(
                self.meanfield, f"the mean-field q* ({_mean_field_words(self.meanfield)}) on the same simulations"
            )
            lines.append(_mean_field_gap_words(self.meanfield))
        if len(self.posteriors()) > 1:
            lines += self._dispersion_lines(self.posteriors())
        if self.refine is not None:
            lines += self._gap_lines(self.refine)
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
                f"{_ecdf_p(s, j):>12}  "
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
    def _dispersion_lines(posteriors: List[Tuple[str, xr.Dataset]]) -> List[str]:
        lines = [
            "coverage of central intervals pooled over the latent dimensions (se over simulations); "
            "below nominal: too narrow (under-dispersed) or biased, above: too wide (over-dispersed)"
        ]
        for label, s in posteriors:
            d = dispersion_of(s)
            parts = [
                f"{float(d['coverage'].sel(level=a)):.3f} ± {float(d['coverage_se'].sel(level=a)):.3f} "
                f"(nominal {float(d['nominal'].sel(level=a)):.2f})"
                for a in DISPERSION_LEVELS
            ]
            lines.append(
                f"{label:<22} 50%: {parts[0]}; 90%: {parts[1]}; "
                f"{d.attrs['num_outside']} of {d.attrs['num_quantities']} dimensions leave the band; "
                f"{_verdict_words(d)}"
            )
        return lines

    @staticmethod
    def _gap_lines(r: xr.Dataset) -> List[str]:
        g = gap_summary(r)
        q0, closed = _refine_start(r)
        lines = [
            f"refinement on {r.sizes['datapoint']} {r.attrs.get('split', '')} datapoints ({_refine_words(r)}): "
            f"ELBO of {q0} {g['elbo_before']:.3f}, of the refined q {g['elbo_after']:.3f} nats "
            f"(means; se over datapoints {g['elbo_before_se']:.3f}, {g['elbo_after_se']:.3f})",
            f"{closed}: {g['gap']:.3f} ± {g['gap_se']:.3f} nats per datapoint "
            f"(se over datapoints; Monte Carlo se of the mean {g['gap_mc_se']:.4f}, paired draws)",
        ]
        if q0 != "the encoder's q":
            lines.append(f"q_0 is {r.attrs['start']}: the refinement starts from it, and its ELBO is not the guide's")
        return lines

    @staticmethod
    def _ppc_lines(p: xr.Dataset) -> List[str]:
        lines = [
            f"posterior predictive checks (Gelman et al. 1996): {p.sizes['datapoint']} {p.attrs.get('split', '')} "
            f"datapoints, R = {p.attrs['num_replicates']} replicates x_rep ~ p(x|z), z ~ q(z|x); p-values near "
            "0.5 are expected even for a correct model (Meng 1994)"
        ]
        for stat in p["statistic"].values:
            mean, share = ppc_summary(p["p_value"].sel(statistic=stat).values)
            lines.append(
                f"{str(stat):<14} mean p-value {mean}; share of extreme p-values "
                f"(p < {EXTREME} or p > {1 - EXTREME}) {share} (± se over datapoints)"
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


def dispersion_of(sbc: xr.Dataset) -> xr.Dataset:
    """:func:`~ppl_vae.analysis.calibration.dispersion` of an SBC result over its latent
    dimensions at :data:`DISPERSION_LEVELS`, with ``num_outside`` (dimensions whose ECDF leaves
    the band) in its attrs."""
    from ppl_vae.analysis.calibration import dispersion

    d = dispersion(sbc[["rank"]].assign_attrs(sbc.attrs), DISPERSION_LEVELS)
    dims = np.asarray(sbc["kind"].values).astype(str) == "dimension"
    d.attrs["num_outside"] = int(np.asarray(sbc["outside_band"].values, dtype=bool)[dims].sum())
    d.attrs["min_chi2_p_value"] = float(np.min(sbc["chi2_p_value"].values[dims]))
    return d


def _verdict_words(d: xr.Dataset) -> str:
    verdict = str(d["verdict"].sel(level=COVERAGE_LEVEL).values)
    excess = float(d["excess"].sel(level=COVERAGE_LEVEL))
    se = float(d["coverage_se"].sel(level=COVERAGE_LEVEL))
    if verdict == "consistent":
        return f"90% coverage within {d.attrs['significance_se']:.0f} se of nominal"
    what = "under-dispersed (too narrow) or biased" if verdict == "too narrow" else "over-dispersed (too wide)"
    return f"{what}: 90% coverage {excess:+.3f} from nominal ({_in_se(excess, se)})"


def _in_se(excess: float, se: float) -> str:
    """How many standard errors ``excess`` is; a coverage of 0 or 1 over the simulations has a
    standard error of 0, said as such (not a division by it)."""
    return f"{abs(excess) / se:.0f} se" if se > 0 else "its se is 0: every simulation gave the same coverage"


MEAN_FIELD_LABEL = "mean-field q*"
"""The mean-field q*'s name in the tables and the figure's legend."""


def _mean_field_words(ds: xr.Dataset) -> str:
    a = ds.attrs
    polish = (
        f", then at most {a['meanfield_polish_steps']} L-BFGS iterations to gradient {a['meanfield_gtol']:g}"
        if int(a.get("meanfield_polish", 0))
        else ""
    )
    return (
        f"a diagonal Gaussian fitted to each x alone from the {a['meanfield_init']}'s: at most "
        f"{a['meanfield_max_steps']} Adam steps, lr {a['meanfield_lr']:g}{polish}"
    )


def mean_field_gain(ds: xr.Dataset) -> Dict[str, float]:
    """Mean over simulations of the ELBO q* gains over the encoder, its se over simulations, its
    Monte Carlo se of the mean, and the number of fits that met their gradient tolerance."""
    gap = np.asarray(ds["meanfield_gap"].values, dtype=np.float64)
    n = len(gap)
    return {
        "gap": float(gap.mean()),
        "gap_se": float(gap.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "gap_mc_se": float(np.sqrt(np.sum(np.asarray(ds["meanfield_gap_se"].values) ** 2)) / n),
        "converged": int(np.asarray(ds["meanfield_converged"].values).sum()),
        "num_simulations": n,
    }


def _mean_field_gap_words(ds: xr.Dataset) -> str:
    g = mean_field_gain(ds)
    return (
        f"ELBO gained by q* over the encoder on the simulated x (the amortization gap): {g['gap']:.3f} ± "
        f"{g['gap_se']:.3f} nats (mean ± se over simulations; Monte Carlo se of the mean {g['gap_mc_se']:.4f}); "
        f"{g['converged']} of {g['num_simulations']} fits met their gradient tolerance"
    )


def check_mean_field(mean_field: bool, options: Optional[Dict[str, Any]]) -> None:
    """One-line ValueErrors: ``mean_field`` a bool, ``options`` only with it, naming options of
    :func:`~ppl_vae.inference.meanfield.fit_mean_field`, ``max_steps`` a positive integer."""
    from ppl_vae.inference.meanfield import check_mean_field_options

    if not isinstance(mean_field, bool):
        raise ValueError(f"mean_field must be True or False, got {mean_field!r}")
    if not options:
        return
    if not mean_field:
        raise ValueError("mean_field_options apply to the mean-field q* only: give mean_field=True too")
    check_mean_field_options(options, without=("seed",))  # each simulation's fit is seeded here


def _refine_start(r: xr.Dataset) -> Tuple[str, str]:
    """(what the refinement's start q_0 is called, what its gain is called): the encoder's q and
    the amortization gap closed where q_0 is the guide itself; q_0 and the ELBO gained from it
    where the guide is richer than a diagonal Gaussian (a flow: q_0 matches its moments only)."""
    from ppl_vae.inference.refine import GUIDE_ITSELF

    if str(r.attrs.get("start", GUIDE_ITSELF)) == GUIDE_ITSELF:
        return "the encoder's q", "amortization gap closed by the K steps"
    return "q_0 (a diagonal Gaussian with the guide's moments)", "ELBO gained over q_0 by the K steps"


def _refine_words(ds: xr.Dataset) -> str:
    a = ds.attrs
    return f"K = {a['refine_steps']} Adam steps, lr {a['refine_lr']:g}, {a['refine_num_samples']} draws per step" + (
        ", mean iterate of the last window" if int(a.get("refine_average", 0)) else ""
    )


def gap_summary(refine: xr.Dataset) -> Dict[str, float]:
    """Means over datapoints of the encoder's and the refined q's ELBO and of the gap closed, with
    their se over datapoints, and the gap's Monte Carlo se of the mean (from the paired draws)."""
    n = refine.sizes["datapoint"]
    out: Dict[str, float] = {}
    for name in ("elbo_before", "elbo_after", "gap"):
        v = np.asarray(refine[name].values, dtype=np.float64)
        out[name] = float(v.mean())
        out[f"{name}_se"] = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    out["gap_mc_se"] = float(np.sqrt(np.sum(np.asarray(refine["gap_stderr"].values) ** 2)) / n)
    return out


def check_refine(refine: Optional[int], refine_lr: float, refine_num_samples: int) -> None:
    """One-line ValueErrors for the refinement's options: K (``refine``) None or a positive
    integer, a positive finite learning rate, a positive number of draws per step."""
    import math

    if refine is not None and (isinstance(refine, bool) or int(refine) != refine or refine < 1):
        raise ValueError(f"refine (steps K) must be None (off) or an integer >= 1, got {refine}")
    if (
        isinstance(refine_lr, bool)
        or not (isinstance(refine_lr, (int, float)) and math.isfinite(refine_lr))
        or refine_lr <= 0
    ):
        raise ValueError(f"refine_lr must be a positive number, got {refine_lr}")
    if isinstance(refine_num_samples, bool) or int(refine_num_samples) != refine_num_samples or refine_num_samples < 1:
        raise ValueError(f"refine_num_samples must be a positive integer, got {refine_num_samples}")


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


DISCRETE_DEFAULTS: Dict[str, Any] = {"discrete_num_samples": 100, "num_bins": 10, "binning": "equal_width"}
"""The settings of a discrete site's calibration (:func:`calibrate_run`) when not given; given for a
model without a discrete site, they are refused."""


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
    discrete_num_samples: Optional[int] = None,
    num_bins: Optional[int] = None,
    binning: Optional[str] = None,
    num_bootstrap: int = 1000,
    refine: Optional[int] = None,
    refine_lr: float = 0.02,
    refine_num_samples: int = 4,
    mean_field: bool = False,
    mean_field_options: Optional[Dict[str, Any]] = None,
) -> Calibration:
    """SBC of the run's guide and posterior predictive checks of ``split``; write :data:`FILES`.

    ``num_simulations`` SBC draws (z*, x) from the run's model, each ranked among
    ``num_posterior_samples`` (L) guide draws (L + 1 = 100 rank values by default);
    ``num_replicates`` replicates per datapoint for the predictive checks of ``num_datapoints``
    datapoints of ``split`` (None or 0: all; else the seeded subset ``evaluate`` uses).
    Conditional models simulate with the selected datapoints' labels, cycled. Files go to
    ``out_dir`` (default: the run directory), checked before any work is done; the image of
    the worst-fitting datapoints is drawn for image data only. The predictive checks use the
    built-in statistics that apply to the data (their declared ``applies_to``: images with values
    in [0, 1]); the others, or the whole check, are skipped with the reason in ``skipped``. Everything draws from ``seed``;
    the caller's RNG state is left as it was.

    ``sir`` K (default None: off): also SBC of sampling-importance-resampling with K >= L
    proposals from the guide, on the same simulations (:func:`~ppl_vae.analysis.calibration.sir_draws`).

    A model with a discrete site it enumerates (``enumerated_sites``: M2's y, the GMVAE's c) also
    gets the calibration of q(c|x) against its posterior p(c|x) on the selected datapoints, with
    ``discrete_num_samples`` IW draws of z per value, ECE over ``num_bins`` ``binning`` bins
    (:data:`DISCRETE_DEFAULTS` where None; refused for a model without a discrete site)
    (``"equal_width"`` or ``"equal_mass"``) and ``num_bootstrap`` bootstrap resamples for the se;
    and against the split's labels when the site is ``y`` (the labels' site). When such a
    model's program cannot be simulated, SBC and predictive checks are skipped (with the reason)
    and the discrete calibration still runs.

    ``refine`` K (default None: off): also SBC of the refined q on the same simulations (each
    simulated x's encoder Gaussian refined by K Adam steps of rate ``refine_lr`` with
    ``refine_num_samples`` draws per step and the mean iterate of the last 20 steps,
    :func:`~ppl_vae.inference.refine.refine`), and the same refinement of the selected
    datapoints, whose ELBO before and after give the amortization gap the K steps close
    (``calibration_refine.nc``). A model whose guide cannot be refined (no Gaussian moments) has
    this part skipped with the reason.

    ``mean_field`` (default False): also SBC of the mean-field q* on the same simulations: each
    simulated x's own diagonal Gaussian fitted with the model frozen
    (:func:`~ppl_vae.inference.meanfield.fit_mean_field`, started at the encoder's q;
    ``mean_field_options`` go to it, e.g. ``max_steps``), with the ELBO it gains over the
    encoder per simulation (``calibration_sbc_meanfield.nc``). A model q* cannot be fitted to
    has this part skipped with the reason.
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
    from ppl_vae.analysis.predictive import (
        DEFAULT_STATISTICS,
        inapplicable_statistics,
        plot_p_values,
        plot_worst_fitting,
        posterior_predictive_check,
    )
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
        if value is None and arg in DISCRETE_DEFAULTS:
            continue
        if isinstance(value, bool) or int(cast(int, value)) != value or cast(int, value) < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value}")
    if num_simulations < 2:
        raise ValueError(f"num_simulations must be >= 2 (uniformity needs several ranks), got {num_simulations}")
    if num_posterior_samples < MIN_POSTERIOR_SAMPLES:
        raise ValueError(
            f"num_posterior_samples must be >= {MIN_POSTERIOR_SAMPLES}: a central {COVERAGE_LEVEL:.0%} interval "
            f"of L draws leaves a draw out on each side only from L = {MIN_POSTERIOR_SAMPLES} (with fewer it "
            f"holds every rank, and its coverage is 1 by construction), got {num_posterior_samples}"
        )
    if num_datapoints is not None and num_datapoints < 0:
        raise ValueError(f"num_datapoints must be >= 0 (0: all), got {num_datapoints}")
    if binning is not None and binning not in BINNINGS:
        raise ValueError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    check_sir(sir, num_posterior_samples)
    check_refine(refine, refine_lr, refine_num_samples)
    check_mean_field(mean_field, mean_field_options)
    run = load_run(run_dir, device, history=False)  # the calibration reads no training curve
    sel = select_datapoints(run, split, num_datapoints or None, seed)
    vae, name = run.vae, run.config.model.model
    kwargs = sel.model_kwargs(run)
    site = _discrete_site(vae, name)
    discrete_given = {"discrete_num_samples": discrete_num_samples, "num_bins": num_bins, "binning": binning}
    if site is None and any(v is not None for v in discrete_given.values()):
        raise ValueError(
            f"{', '.join(k for k, v in discrete_given.items() if v is not None)} apply to a model with a "
            f"discrete latent site it sums out (M2's y, a GMVAE's c); model {name!r} has none"
        )
    discrete_settings: Dict[str, Any] = {k: DISCRETE_DEFAULTS[k] if v is None else v for k, v in discrete_given.items()}
    if site is not None and sel.x.shape[0] < 2:
        raise ValueError(f"num_datapoints must be >= 2 for the calibration of site {site!r}, got {sel.x.shape[0]}")
    skipped: List[str] = []
    if site is not None:  # up front: the discrete site's calibration comes last
        from ppl_vae.analysis.calibration import check_discrete_calibratable

        try:
            check_discrete_calibratable(vae.model, vae.guide, sel.x, site, **kwargs)
        except ValueError as exc:
            if any(v is not None for v in discrete_given.values()):
                raise
            skipped.append(f"the calibration of the discrete site {site!r} ({exc})")
            site = None
    try:
        check_simulable(vae.model, vae.guide, sel.x, kwargs, name, seed)  # a few datapoints: cheap
        simulable = True
    except ValueError as exc:
        if site is None:
            raise
        simulable = False
        skipped.append(f"SBC and predictive checks of the continuous sites ({exc})")
    data_are_images = bool(getattr(vae, "generates_images", True))
    refused = inapplicable_statistics(DEFAULT_STATISTICS, sel.x, images=data_are_images) if simulable else {}
    statistics = [s for s in DEFAULT_STATISTICS if s not in refused]
    for why in dict.fromkeys(refused.values()):  # one line per reason, naming its statistics
        names = ", ".join(s for s, w in refused.items() if w == why)
        what = "posterior predictive checks" if not statistics else "predictive statistics"
        skipped.append(f"{what} with {names}: they apply to {why}")
    paths = check_targets(Path(run.run_dir) if out_dir is None else Path(out_dir))

    from tqdm.auto import tqdm

    steps = (2 + (sir is not None) + 2 * (refine is not None) + mean_field if simulable else 0) + (site is not None)
    bar = tqdm(total=steps, desc="calibrate", disable=not progress, leave=False)
    common = {
        "run_dir": str(run.run_dir),
        "model": name,
        "dataset": run.config.data.dataset,
        "seed": int(seed),
    }
    # what a result over the selected datapoints (predictive checks, the discrete site) records
    selection = {
        **common,
        "split": split,
        "num_datapoints": int(len(sel.index)),
        "preprocessing": str(sel.preprocessing),
    }
    sbc = sir_sbc = refined_sbc = refined_split = meanfield_sbc = ppc = discrete = None
    refine_options = {"lr": float(refine_lr), "num_samples": int(refine_num_samples), "average": True}
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
            compare: Dict[str, xr.Dataset] = {}
            if sir is not None:
                bar.set_postfix_str(f"SBC of SIR, K={sir}")
                sir_sbc, sir_uniformity = _merged_sbc(
                    sbc_ranks(vae.model, vae.guide, sir_num_samples=int(sir), **sim), common
                )
                compare[f"SIR K={sir}"] = sir_uniformity
                bar.update()
            if refine is not None:
                bar.set_postfix_str(f"SBC of the refined q, K={refine}")
                try:
                    ranks = sbc_ranks(
                        vae.model, vae.guide, refine_steps=int(refine), refine_options=refine_options, **sim
                    )
                except ValueError as exc:
                    skipped.append(f"refinement of q(z|x) (model {name!r}: {exc})")
                else:
                    refined_sbc, refined_uniformity = _merged_sbc(ranks, common)
                    compare = {f"refined K={refine}": refined_uniformity, **compare}
                    bar.update()
                    bar.set_postfix_str(f"refining {split} datapoints, K={refine}")
                    refined_split = _refine_split(vae, sel, kwargs, int(refine), refine_options, seed, common, split)
                bar.update()
            if mean_field:
                bar.set_postfix_str("SBC of the mean-field q*")
                try:
                    ranks = sbc_ranks(
                        vae.model, vae.guide, mean_field=True, mean_field_options=dict(mean_field_options or {}), **sim
                    )
                except ValueError as exc:
                    skipped.append(f"mean-field q* (model {name!r}: {exc})")
                else:
                    meanfield_sbc, meanfield_uniformity = _merged_sbc(ranks, common)
                    refined_first = {k: v for k, v in compare.items() if k.startswith("refined")}
                    compare = {**refined_first, MEAN_FIELD_LABEL: meanfield_uniformity, **compare}  # the table's order
                bar.update()
            figures.append(("sbc_figure", plot_sbc_ecdf(uniformity, compare=compare)))
            if statistics:
                bar.set_postfix_str("predictive checks")
                ppc = posterior_predictive_check(
                    vae.model,
                    vae.guide,
                    sel.x,
                    statistics=statistics,
                    num_replicates=num_replicates,
                    seed=seed,
                    images=data_are_images,
                    **kwargs,
                )
                ppc = ppc.assign_coords(datapoint=sel.index)
                ppc.attrs.update(selection)
                figures.append(("ppc_figure", plot_p_values(ppc)))
                if _is_images(run, sel.x):  # the statistics applied: images in [0, 1]; and image-shaped
                    statistic = str(ppc["statistic"].values[0])
                    worst = plot_worst_fitting(sel.x.cpu(), ppc, statistic)  # labelled with sel.index
                    figures.append(("worst_figure", worst))
            bar.update()
        if site is not None:
            bar.set_postfix_str(f"discrete site {site}")
            posterior = discrete_posterior(
                vae.model,
                vae.guide,
                sel.x,
                site=site,
                seed=seed,
                num_samples=discrete_settings["discrete_num_samples"],
                **kwargs,
            )
            labels = None
            if site == "y" and sel.labels is not None and bool((sel.labels >= 0).all()):
                labels = sel.labels.cpu().numpy()  # the site is the labels' own: compare with them
            elif site == "y" and sel.labels is not None:  # a semi-supervised run's training split
                given = int((sel.labels >= 0).sum())
                skipped.append(
                    f"the comparisons of q({site}|x) and p({site}|x) with the labels: {given} of the "
                    f"{sel.x.shape[0]} {sel.split} datapoints have a label this run was given (it hid the "
                    "others'); --split test compares with all the labels"
                )
            discrete = discrete_calibration(
                posterior,
                labels,
                num_bins=discrete_settings["num_bins"],
                binning=discrete_settings["binning"],
                num_bootstrap=num_bootstrap,
                seed=seed,
            )
            discrete = discrete.assign_coords(datapoint=sel.index)
            discrete.attrs.update(selection)
            figures.append(("discrete_figure", plot_reliability(discrete)))
            bar.update()
    finally:
        bar.close()

    result = Calibration(
        sbc,
        ppc,
        discrete=discrete,
        sir=sir_sbc,
        skipped=skipped,
        refined=refined_sbc,
        refine=refined_split,
        meanfield=meanfield_sbc,
    )
    import matplotlib.pyplot as plt

    # one set: it replaces an earlier calibration as a whole, whose files this one does not
    # write (its predictive checks, SIR, refinement ...) are removed, not left beside the page
    with io.file_set():
        io.supersedes(paths.values())
        for key, ds in (
            ("sbc", sbc),
            ("sir", sir_sbc),
            ("refined", refined_sbc),
            ("meanfield", meanfield_sbc),
            ("refine", refined_split),
            ("ppc", ppc),
            ("discrete", discrete),
        ):
            if ds is not None:
                ds.attrs["made_from"] = run.made_from  # which weights: a resume moves the run on, not this file
                result.files[key] = results.save_netcdf(ds, paths[key])
        images: Dict[str, str] = {}
        for key, fig in figures:
            result.files[key] = io.write_figure(fig, paths[key], dpi=120)
            images[key] = figure_to_data_uri(fig, dpi=100)  # closes the figure
            plt.close(fig)
        result.files["report"] = io.write_text(paths["report"], render_html(run, result, images))
    return result


def _refine_split(
    vae: Any,
    sel: Any,
    kwargs: Dict[str, Any],
    num_steps: int,
    options: Dict[str, Any],
    seed: int,
    common: Dict[str, Any],
    split: str,
) -> xr.Dataset:
    """The selected datapoints' q(z|x) refined by K steps: ELBOs before and after and the gap
    closed per datapoint (:meth:`~ppl_vae.inference.refine.RefineResult.to_dataset`)."""
    from ppl_vae.inference.refine import refine

    result = refine(vae.model, vae.guide, sel.x, seed=seed, num_steps=num_steps, **options, **kwargs)
    ds = result.to_dataset().assign_coords(datapoint=sel.index)
    ds.attrs.update(
        {
            **common,
            "split": split,
            "num_datapoints": int(len(sel.index)),
            "preprocessing": str(sel.preprocessing),
            "refine_steps": int(num_steps),
            **{f"refine_{k}": int(v) if isinstance(v, bool) else v for k, v in options.items()},
        }
    )
    return ds


# ---------------------------------------------------------------------------------------------
# calibration.html: one self-contained page


LEAD = (
    "<p><b>What is checked.</b> <i>Simulation-based calibration</i> (SBC; Talts et al. 2018) asks whether "
    "the amortized posterior q(z|x) puts its mass where the run's own model puts the posterior p(z|x). It "
    "draws z* from the prior p(z) and x from the likelihood p(x|z*), then L draws from q(z|x), and records "
    "the <i>rank</i> of z* among them (how many draws lie below it) for each latent dimension, each site's "
    "norm |z| and log p(x|z). If q(z|x) were the exact posterior every rank would be uniform on 0..L. "
    "Ranks piled at both ends (U-shape) say q is too narrow (<i>under-dispersed</i>, over-confident); "
    "ranks piled in the middle say it is too wide (<i>over-dispersed</i>); ranks piled at one end say it "
    "is biased. The same is shown for the posteriors the library can compute from the encoder's: the "
    "<i>refined</i> q (the encoder's Gaussian improved by K gradient steps on each x's own ELBO, "
    "semi-amortized inference, Kim et al. 2018), the <i>mean-field q*</i> (a diagonal Gaussian fitted to "
    "each x alone, the best the encoder's family can do per datapoint, Cremer et al. 2018) and <i>SIR</i> (K proposals from q resampled by their "
    "importance weights, Rubin 1988), on the same simulations, so the encoder's miscalibration is seen "
    "next to how much of it is fixable.</p>"
    "<p><b>Reading the numbers.</b> <i>Coverage</i> is the share of simulations whose z* falls inside the "
    "central interval of the L draws; a calibrated posterior covers the nominal share. Below nominal: too "
    "narrow or biased; above: too wide. A <i>p-value</i> tests uniformity of the ranks (small: not "
    "uniform). The figure's grey band holds a uniform ECDF everywhere at once with 95% probability "
    "(Säilynoja et al. 2022); a curve leaving it rejects calibration for that quantity.</p>"
)


PAGE_CSS = (
    "td { white-space: nowrap; } td.text { white-space: normal; } th { vertical-align: bottom; } "
    "div.wide { overflow-x: auto; } div.wide table { font-size: 0.85em; }"
)


def _ecdf_p(s: xr.Dataset, j: int) -> str:
    """The ECDF p-value, written as a bound when it is the smallest the band's simulations can give."""
    from ppl_vae.analysis.calibration import format_ecdf_p_value

    return format_ecdf_p_value(float(s["ecdf_p_value"][j]), int(s.attrs["num_band_simulations"]))


def _short_verdict(d: xr.Dataset) -> str:
    verdict = str(d["verdict"].sel(level=COVERAGE_LEVEL).values)
    if verdict == "consistent":
        return "consistent with calibrated"
    excess = float(d["excess"].sel(level=COVERAGE_LEVEL))
    se = float(d["coverage_se"].sel(level=COVERAGE_LEVEL))
    what = "too narrow or biased" if verdict == "too narrow" else "too wide"
    return f"{what} ({excess:+.3f}, {_in_se(excess, se)})"


def _dispersion_table(result: Calibration) -> str:
    esc = html.escape
    first = dispersion_of(result.posteriors()[0][1])
    nominal = {a: float(first["nominal"].sel(level=a)) for a in DISPERSION_LEVELS}
    head = (
        "<tr><th>posterior</th><th>dimensions outside the band</th><th>smallest χ² p</th>"
        + "".join(f"<th>coverage {a:.0%} ± se (nominal {nominal[a]:.2f})</th>" for a in DISPERSION_LEVELS)
        + "<th>mean rank / L</th><th>rank sd ratio</th><th>verdict at 90%</th></tr>"
    )
    rows = [head]
    for label, s in result.posteriors():
        d = dispersion_of(s)
        cells = "".join(
            f"<td>{float(d['coverage'].sel(level=a)):.3f} ± {float(d['coverage_se'].sel(level=a)):.3f}</td>"
            for a in DISPERSION_LEVELS
        )
        rows.append(
            f"<tr><td class='text'>{esc(label)}</td><td>{d.attrs['num_outside']} of {d.attrs['num_quantities']}</td>"
            f"<td>{_fmt_p(d.attrs['min_chi2_p_value'])}</td>{cells}"
            f"<td>{float(d['mean_fractional_rank']):.3f}</td><td>{float(d['rank_sd_ratio']):.3f}</td>"
            f"<td class='text'>{esc(_short_verdict(d))}</td></tr>"
        )
    note = (
        "<p class='note'><i>Dimensions outside the band</i>: latent dimensions whose rank ECDF leaves the 95% "
        "simultaneous band (each alone would leave it 5% of the time under calibration). <i>Smallest χ² p</i>: "
        "the smallest p-value of the χ² test of uniform ranks over the latent dimensions. <i>Coverage</i>: the "
        "share of (simulation, dimension) pairs whose z* lies inside the central interval of the L draws, pooled "
        "over the latent dimensions, ± its se over simulations. <i>Mean rank / L</i>: 0.5 without bias; below, "
        "the posterior's draws sit above z*. <i>Rank sd ratio</i>: the standard deviation of rank / L over that "
        "of uniform ranks: 1 when calibrated, above 1 for the U-shaped ranks of a too narrow posterior, below 1 "
        "for a too wide one. <i>Verdict</i>: 90% coverage minus nominal, called when beyond "
        f"{first.attrs['significance_se']:.0f} se.</p>"
    )
    return "<table>" + "".join(rows) + "</table>" + note


def _quantity_table(result: Calibration) -> str:
    esc = html.escape
    posts = result.posteriors()
    first = posts[0][1]
    kinds = np.asarray(first["kind"].values).astype(str)
    dims = np.flatnonzero(kinds == "dimension")
    shown = sorted(set(dims[:MAX_LISTED_DIMENSIONS].tolist()) | set(np.flatnonzero(kinds != "dimension").tolist()))
    head = (
        "<tr><th rowspan='2'>quantity</th>"
        + "".join(f"<th colspan='3'>{esc(label)}</th>" for label, _ in posts)
        + "</tr><tr>"
        + "<th>χ² p-value</th><th>ECDF p-value</th><th>90% coverage ± se</th>" * len(posts)
        + "</tr>"
    )
    rows = [head]
    for j in shown:
        cells = []
        for _, s in posts:
            cov = s.sel(level=COVERAGE_LEVEL)
            flag = " style='color:#c0392b'" if bool(s["outside_band"].values[j]) else ""
            cells.append(
                f"<td>{_fmt_p(float(s['chi2_p_value'][j]))}</td><td{flag}>{_ecdf_p(s, j)}</td>"
                f"<td>{float(cov['coverage'][j]):.3f} ± {float(cov['coverage_se'][j]):.3f}</td>"
            )
        rows.append(f"<tr><td class='text'>{esc(str(first['quantity'].values[j]))}</td>{''.join(cells)}</tr>")
    note = (
        f"<p class='note'>Per quantity: the χ² test of uniformity over {first.attrs['num_bins']} bins of ranks "
        f"({first.attrs['chi2_df']} degrees of freedom), the p-value of the ECDF's band test (red: the ECDF "
        f"leaves the band), and the coverage of the central 90% interval of the L draws (nominal "
        f"{float(first.sel(level=COVERAGE_LEVEL)['nominal']):.3f}) with its binomial se."
    )
    if len(dims) > MAX_LISTED_DIMENSIONS:
        note += (
            f" The first {MAX_LISTED_DIMENSIONS} of {len(dims)} latent dimensions are listed; all are in the netCDF."
        )
    return "<div class='wide'><table>" + "".join(rows) + "</table></div>" + note + "</p>"


def _gap_table(result: Calibration) -> str:
    r = result.refine
    assert r is not None
    g = gap_summary(r)
    rows = [
        "<tr><th>quantity</th><th>mean over datapoints (nats)</th><th>se over datapoints</th><th>what it is</th></tr>",
        f"<tr><td class='text'>ELBO, {html.escape(_refine_start(r)[0])}</td><td>{g['elbo_before']:.3f}</td>"
        f"<td>{g['elbo_before_se']:.3f}</td>"
        "<td class='text note'>lower bound on log p(x); Monte Carlo estimate from "
        f"{r.attrs['num_eval_samples']} draws per datapoint</td></tr>",
        f"<tr><td class='text'>ELBO, refined q</td><td>{g['elbo_after']:.3f}</td><td>{g['elbo_after_se']:.3f}</td>"
        "<td class='text note'>lower bound on log p(x), from the same standard-normal draws</td></tr>",
        f"<tr><td class='text'>{html.escape(_refine_start(r)[1])}</td><td>{g['gap']:.3f}</td><td>{g['gap_se']:.3f}</td>"
        f"<td class='text note'>refined minus starting ELBO: the part of the amortization gap the K steps close "
        f"(Monte Carlo se of the mean {g['gap_mc_se']:.4f}, from paired draws)</td></tr>",
    ]
    if _refine_start(r)[0] != "the encoder's q":
        rows.append(
            f"<tr><td class='text' colspan='4'>q_0 is {html.escape(str(r.attrs['start']))}: the refinement starts "
            "from it, and its ELBO is not the guide's.</td></tr>"
        )
    text = (
        f"<p>{r.sizes['datapoint']} {html.escape(str(r.attrs.get('split', '')))} datapoints "
        f"(preprocessing: {html.escape(str(r.attrs.get('preprocessing', 'none')))}); "
        f"{html.escape(_refine_words(r))}. The same refinement of each simulated x gives the refined "
        "posterior of the SBC above"
    )
    if result.refined is not None and "refine_gap" in result.refined:
        sim_gap = np.asarray(result.refined["refine_gap"].values)
        text += (
            f"; on those {len(sim_gap)} simulated x the K steps gained {sim_gap.mean():.3f} ± "
            f"{sim_gap.std(ddof=1) / np.sqrt(len(sim_gap)):.3f} nats of ELBO (mean ± se over simulations)"
        )
    return text + ".</p><table>" + "".join(rows) + "</table>"


def ppc_summary(p_values: np.ndarray) -> Tuple[str, str]:
    """The mean predictive p-value and the share of extreme ones over datapoints, each as
    "mean ± se" (the share's se: the binomial sqrt(s (1 - s) / n)); "n/a" for a se of one datapoint."""
    pv = np.asarray(p_values, dtype=float)
    n = pv.size
    share = float(np.mean(np.minimum(pv, 1.0 - pv) < EXTREME))
    if n < 2:
        return f"{pv.mean():.3f} ± n/a", f"{share:.3f} ± n/a"
    return (
        f"{pv.mean():.3f} ± {pv.std(ddof=1) / np.sqrt(n):.3f}",
        f"{share:.3f} ± {np.sqrt(share * (1 - share) / n):.3f}",
    )


def _ppc_table(p: xr.Dataset) -> str:
    rows = [
        "<tr><th>statistic T</th><th>mean predictive p-value ± se</th>"
        f"<th>share of extreme p-values (p &lt; {EXTREME} or p &gt; {1 - EXTREME}) ± se</th></tr>"
    ]
    for stat in p["statistic"].values:
        mean, share = ppc_summary(p["p_value"].sel(statistic=stat).values)
        rows.append(f"<tr><td class='text'>{html.escape(str(stat))}</td><td>{mean}</td><td>{share}</td></tr>")
    return (
        f"<p>{p.sizes['datapoint']} {html.escape(str(p.attrs.get('split', '')))} datapoints, "
        f"R = {p.attrs['num_replicates']} replicates x<sub>rep</sub> ~ p(x|z) with z ~ q(z|x) each "
        "(Gelman, Meng &amp; Stern 1996). The p-value, "
        f"{html.escape(str(p['p_value'].attrs['description']))} (ties counted as half), near 0 or 1 says the model "
        "rarely makes data like x in what T measures; posterior predictive p-values gather toward 0.5 even "
        "for a correct model (Meng 1994), so extremes count, not the mean.</p><table>" + "".join(rows) + "</table>"
    )


def _discrete_table(d: xr.Dataset) -> str:
    esc = html.escape
    site = str(d.attrs["site"])
    rows = [
        "<tr><th>comparison</th><th>accuracy</th><th>mean confidence</th><th>ECE ± se</th>"
        "<th>debiased CE² ± se</th><th>flag</th></tr>"
    ]
    for name in d["comparison"].values:
        r = d.sel(comparison=name)
        rows.append(
            f"<tr><td class='text'>{esc(str(name))}</td><td>{float(r['accuracy']):.3f}</td>"
            f"<td>{float(r['confidence']):.3f}</td><td>{float(r['ece']):.4f} ± {float(r['ece_se']):.4f}</td>"
            f"<td>{float(r['ce2']):.2e} ± {float(r['ce2_se']):.1e}</td>"
            f"<td class='text'>{'miscalibrated (CE² &gt; 3 se)' if int(r['miscalibrated']) else 'no evidence'}</td></tr>"
        )
    return (
        f"<p>q({esc(site)}|x), the guide's distribution over the discrete site, against the model's own posterior "
        f"p({esc(site)}|x) computed by enumeration over {d.sizes['value']} values with importance-weighted "
        f"p(x, {esc(site)}) (K = {d.attrs['num_samples']} draws of z each), on {d.sizes['datapoint']} "
        f"{esc(str(d.attrs.get('split', '')))} datapoints; and against the split's labels where the site is "
        f"the labels' own. <i>Accuracy</i>: the reference's probability of q's top value (or the share of "
        f"correct labels); <i>confidence</i>: q's top probability; <i>ECE</i>: expected calibration error "
        f"(mean |accuracy − confidence| over {d.attrs['num_bins']} {esc(str(d.attrs['binning']).replace('_', '-'))} "
        "bins, above 0 by noise alone); <i>debiased CE²</i> (Kumar et al. 2019): 0 in expectation for a "
        "calibrated q. Bootstrap se.</p><table>"
        + "".join(rows)
        + f"</table><p>Distance of q({esc(site)}|x) to p({esc(site)}|x): mean total variation "
        f"{float(d['mean_tv']):.4f} ± {float(d['mean_tv_se']):.4f}; mean KL(p ‖ q) {float(d['mean_kl']):.4f} ± "
        f"{float(d['mean_kl_se']):.4f} nats (± se over datapoints).</p>"
    )


def _img(images: Dict[str, str], key: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{images[key]}'>" if key in images else ""


def render_html(run: Any, result: Calibration, images: Dict[str, str]) -> str:
    """``calibration.html`` as one string: the summary of every check that ran, each number with
    what it is, and the figures as embedded PNGs (``images``: :data:`FILES` key -> data URI)."""
    import datetime as _dt

    esc = html.escape
    cfg = run.config
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>ppl-vae calibrate: {esc(str(run.run_dir))}</title><style>{CSS}{PAGE_CSS}</style></head><body>",
        f"<h1>Is the amortized posterior calibrated? {esc(cfg.model.model)} on {esc(cfg.data.dataset)}</h1>",
        f"<div class='lead'>{LEAD}</div>",
        f"<p>Run <code>{esc(str(run.run_dir))}</code>{esc(weights_scored(run))} (guide {esc(str(cfg.model.guide))}, method "
        f"{esc(str(cfg.train.method))}). Generated {_dt.datetime.now():%Y-%m-%d %H:%M}.</p>",
    ]
    for reason in result.skipped:
        parts.append(f"<p class='warning'><b>Skipped:</b> {esc(reason)}</p>")
    if result.sbc is not None:
        s = result.sbc
        parts += [
            "<h2>Simulation-based calibration</h2>",
            f"<p>{s.attrs['num_simulations']} simulations (z* ~ p(z), x ~ p(x|z*)), each ranked among "
            f"L = {s.attrs['num_posterior_samples']} draws of each posterior (ranks 0..L); seed {s.attrs['seed']}. "
            "Coverage pooled over the latent dimensions: the share of (simulation, dimension) pairs whose z* "
            "lies in the central interval, with its se over simulations (the dimensions share simulations).</p>",
            _dispersion_table(result),
        ]
        if result.meanfield is not None:
            parts.append(
                f"<p class='note'>Mean-field q*: {esc(_mean_field_words(result.meanfield))}. "
                f"{esc(_mean_field_gap_words(result.meanfield))}.</p>"
            )
        if result.sir is not None:
            parts.append(
                f"<p class='note'>SIR: median effective sample size of the {result.sir.attrs['sir_num_samples']} "
                f"proposals' weights {float(result.sir['sir_ess'].median()):.1f} (near 1: the L draws repeat one "
                "proposal and inherit the encoder's errors).</p>"
            )
        parts += [
            _quantity_table(result),
            "<h3>Rank ECDFs minus the uniform CDF, with the simultaneous 95% band</h3>",
            _img(images, "sbc_figure", "SBC rank ECDF differences"),
        ]
    if result.refine is not None:
        parts += ["<h2>Amortization gap closed by refinement</h2>", _gap_table(result)]
    if result.ppc is not None:
        parts += [
            "<h2>Posterior predictive checks</h2>",
            _ppc_table(result.ppc),
            _img(images, "ppc_figure", "posterior predictive p-values"),
        ]
        if "worst_figure" in images:
            parts += [
                "<h3>The datapoints that fit worst</h3>",
                _img(images, "worst_figure", "worst-fitting datapoints"),
            ]
    if result.discrete is not None:
        parts += [
            f"<h2>Discrete site {esc(str(result.discrete.attrs['site']))}: calibration of q against p</h2>",
            _discrete_table(result.discrete),
            _img(images, "discrete_figure", "reliability diagram"),
        ]
    files = ", ".join(f"<code>{esc(p.name)}</code>" for k, p in result.files.items() if k != "report")
    parts.append(
        f"<p class='note'>Files beside this page: {files}. Summary also printed by "
        "<code>ppl-vae calibrate</code>.</p></body></html>"
    )
    return "\n".join(parts)


__all__ = [
    "DISPERSION_LEVELS",
    "FILES",
    "Calibration",
    "calibrate_run",
    "check_mean_field",
    "check_refine",
    "check_simulable",
    "check_sir",
    "check_targets",
    "dispersion_of",
    "gap_summary",
    "mean_field_gain",
    "render_html",
]
