"""``ppl-vae disentanglement``'s driver: MIG and DCI (netCDF), latent traversals and the
objective's terms per epoch (PNG) of a run, all in one HTML page, written to an output folder.

It writes only into ``out_dir`` (default ``RUN/disentanglement``) and only files of its own names
(:data:`FILES`), never the run's ``config.json``, checkpoint or history, and it refuses a target
name that is a symlink or a folder, so nothing is written outside the folder.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import xarray as xr

from ppl_vae import io
from ppl_vae.analysis.disentanglement import disentanglement_metrics, plot_mutual_info, plot_objective_terms
from ppl_vae.analysis.generation import latent_traversal, plot_traversal
from ppl_vae.pipeline import Run, load_run_data
from ppl_vae.reports.common import CSS, check_out_dir, figure_to_data_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILES = {
    "metrics": "disentanglement.nc",
    "traversal": "traversal.png",
    "mutual_info": "mutual_info.png",
    "terms": "objective_terms.png",
    "report": "disentanglement.html",
}


def check_targets(out_dir: Path) -> Dict[str, Path]:
    """The report's paths in ``out_dir``; ValueError if one is a symlink or a folder (the folder is
    created here when missing)."""
    out_dir = check_out_dir(Path(out_dir), "out")
    paths = {k: out_dir / name for k, name in FILES.items()}
    for path in paths.values():
        if path.is_symlink():
            raise ValueError(
                f"out: {path} is a symbolic link; refusing to write through it (remove it or choose another --out)"
            )
        if path.is_dir():
            raise ValueError(f"out: {path} is a folder; choose another --out")
    return paths


def mig_text(value: float) -> str:
    """A MIG to 3 decimals, or "n/a" where it is undefined (NaN: no factor varies among the points)."""
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


@dataclass
class DisentanglementReport:
    metrics: xr.Dataset
    traversal: xr.Dataset
    files: Dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        per_factor = [float(v) for v in m.mig_per_factor.values]
        per = ", ".join(f"{f} {mig_text(v)}" for f, v in zip(m.factor.values, per_factor))
        undefined = sum(1 for v in per_factor if not math.isfinite(v))
        if undefined:  # a factor with one value among the points has no entropy to normalize by
            per += (
                f"; n/a: the factor takes one value among the {m.attrs['num_points']} points, mean over the "
                f"other {len(per_factor) - undefined} factors"
            )
        return (
            f"MIG {mig_text(float(m.mig))} ({per}); DCI disentanglement {float(m.dci_disentanglement):.3f}, "
            f"completeness {float(m.dci_completeness):.3f}, informativeness "
            f"{float(m.dci_informativeness.mean()):.3f} (mean accuracy on {m.attrs['num_test_points']} held-out "
            f"points); active units {int(m.active_units)} of {m.sizes['latent']} (plug-in estimates from "
            f"{m.attrs['num_points']} points of {m.attrs['dataset']}: binned mutual information is biased up on few "
            "points)"
        )


def _row(cells: List[str]) -> str:
    return "<tr>" + "".join(cells) + "</tr>"


def render_html(
    run_name: str,
    config_text: str,
    report: DisentanglementReport,
    figures: List[Tuple[str, Figure]],
    data_note: str = "",
) -> str:
    """The report page; ``data_note``: a sentence on where the data came from (dsprites'
    re-rendering), or empty."""
    provenance = f" {data_note}" if data_note else ""
    m = report.metrics
    rows = [
        _row(
            [
                "<th>factor</th>",
                "<th>entropy (nats)</th>",
                "<th>MIG</th>",
                "<th>DCI completeness</th>",
                "<th>DCI informativeness</th>",
            ]
        )
    ]
    for k, f in enumerate(m.factor.values):
        rows.append(
            _row(
                [
                    f"<td class='text'>{html.escape(str(f))}</td>",
                    f"<td>{float(m.factor_entropy[k]):.3f}</td>",
                    f"<td>{mig_text(float(m.mig_per_factor[k]))}</td>",
                    f"<td>{float(m.completeness_per_factor[k]):.3f}</td>",
                    f"<td>{float(m.dci_informativeness[k]):.3f}</td>",
                ]
            )
        )
    body = [
        f"<h1>Disentanglement of {html.escape(run_name)}</h1>",
        f"<p class='lead'>{html.escape(report.summary())}</p>",
        "<p class='note'>MIG: the gap between the two latents most informative about each factor, over the "
        "factor's entropy (Chen et al. 2018), on encoder means in equal-width bins. DCI: random-forest "
        f"importances (Eastwood &amp; Williams 2018).{html.escape(provenance)}</p>",
        "<table>" + "".join(rows) + "</table>",
    ]
    for title, fig in figures:
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='{figure_to_data_uri(fig)}'>")
    body.append(f"<h2>Run configuration</h2><pre>{html.escape(config_text)}</pre>")
    css = CSS + ".lead{background:#f3f6fa;border-left:4px solid #4a78b0;padding:.6em 1em}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>disentanglement</title><style>{css}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )


def disentanglement_report(
    run: Run,
    out_dir: Optional[Path] = None,
    *,
    num_points: Optional[int] = 10_000,
    num_test_points: Optional[int] = 5_000,
    num_steps: int = 9,
    span: float = 3.0,
    seed: int = 0,
) -> DisentanglementReport:
    """Compute the metrics and the traversal of ``run`` on its own data and write :data:`FILES`
    into ``out_dir`` (default ``RUN/disentanglement``). Everything that can be refused (data
    without factor labels, a bad target) is refused before any file is written."""
    out_dir = Path(run.run_dir) / "disentanglement" if out_dir is None else Path(out_dir)
    data = load_run_data(run)  # the splits the run recorded
    if data.train_factors is None or data.test_factors is None:
        raise ValueError(
            f"MIG and DCI need a dataset with factor labels (dsprites, or an .npz with 'factors'); "
            f"the run's dataset {data.name!r} has none"
        )
    paths = check_targets(out_dir)
    vae, history = run.vae, run.read_history()
    run_name, config_text = run.made_from, run.config.to_json()  # "RUN at epoch N": the weights scored
    metrics = disentanglement_metrics(vae, data, num_points=num_points, num_test_points=num_test_points, seed=seed)
    x = data.test[: min(500, data.test.shape[0])]
    traversal = latent_traversal(vae, x, num_steps=num_steps, span=span)
    report = DisentanglementReport(metrics, traversal)
    figures = [("Latent traversals", plot_traversal(traversal)), ("Mutual information", plot_mutual_info(metrics))]
    terms = plot_objective_terms(history)
    if terms is not None:
        figures.append(("Objective terms per epoch", terms))
    note = ""
    if run.config.data.dataset == "dsprites":  # the registered data set, not a user's file
        from ppl_vae.data.dsprites import provenance

        note = provenance(run.config.data.data_dir)
    with io.file_set():  # replaces an earlier report whole: its objective_terms.png goes when this has none
        io.supersedes(paths.values())
        traversal_terms = traversal[["kl", "activity"]].rename(kl="traversal_kl", activity="traversal_activity")
        for name in ("traversal_kl", "traversal_activity"):
            traversal_terms[name].attrs["data"] = f"the first {x.shape[0]} test images (the traversal's)"
        merged = metrics.merge(traversal_terms.rename(latent="traversal_latent"))
        merged.attrs["made_from"] = run.made_from
        report.files["metrics"] = io.write_netcdf(merged, paths["metrics"])
        for (_, fig), key in zip(figures, ("traversal", "mutual_info", "terms")):
            report.files[key] = io.write_figure(fig, paths[key], dpi=100)
        page = render_html(run_name, config_text, report, figures, note)
        report.files["report"] = io.write_text(paths["report"], page)
    return report
