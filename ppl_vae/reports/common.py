"""What every driver that reads a run directory shares: which datapoints are scored, where
results go, and the HTML pieces of the reports.

:func:`select_datapoints` is the one rule, shared by ``evaluate``, ``compare`` and the
multi-run comparison, for which datapoints of a split are scored and how.
:func:`check_out_dir` / :func:`run_out_dir` refuse an output folder that cannot hold files
before any work is done.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ppl_vae.pipeline import Run, load_run_data

if TYPE_CHECKING:  # matplotlib is imported by the report stage, after the scoring
    from matplotlib.figure import Figure

SPLITS = ("test", "train")


def process_age() -> Optional[float]:
    """Seconds since this process started (from Linux's /proc; None where that is unavailable)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _kernel_usage() -> Tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far; (0, 0) where the
    ``resource`` module is unavailable (not Unix)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


@dataclass
class Stages:
    """Wall-clock seconds of each stage of a command (``--profile``): import, load, scoring,
    writing, report. ``scoring_began``: seconds from the process's start to the start of the
    scoring (:func:`process_age`), the time a user waits before any estimate is computed.

    Each stage also records the system (kernel) CPU seconds and the minor page faults of the
    process while it ran (``system``, ``faults``): memory freed to the kernel and taken back
    shows there, not in the wall time of any one line of Python."""

    seconds: Dict[str, float] = field(default_factory=dict)
    scoring_began: Optional[float] = None
    system: Dict[str, float] = field(default_factory=dict)
    faults: Dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (times of a stage entered twice add up)."""
        if name == "scoring" and self.scoring_began is None:
            self.scoring_began = process_age()
        start = time.perf_counter()
        sys_start, faults_start = _kernel_usage()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            sys_end, faults_end = _kernel_usage()
            self.system[name] = self.system.get(name, 0.0) + sys_end - sys_start
            self.faults[name] = self.faults.get(name, 0) + faults_end - faults_start

    def lines(self) -> List[str]:
        """One line per stage (wall seconds; system seconds and page faults where measured),
        then the total and when the scoring began."""
        out = []
        for name, secs in self.seconds.items():
            line = f"{name:<10} {secs:8.2f} s"
            if name in self.system:
                line += f"  (system {self.system[name]:.2f} s, {self.faults[name]:,} page faults)"
            out.append(line)
        out.append(f"{'total':<10} {sum(self.seconds.values()):8.2f} s (of the stages above)")
        if self.scoring_began is not None:
            out.append(f"scoring began {self.scoring_began:.2f} s after the process started")
        return out


@dataclass
class Selection:
    """The datapoints analysed: ``x`` ``(N, ...)``, their ``labels`` (or None), indices in the
    split, and ``preprocessing``: what was done to them beyond loading (recorded in results)."""

    x: Tensor
    labels: Optional[Tensor]
    index: np.ndarray
    split: str
    preprocessing: str = "none"

    def model_kwargs(self, run: Run) -> Dict[str, Any]:
        """``{"y": labels}`` when the dataset has labels (the model contract: models that
        ignore labels ignore ``y``; a conditional model without them says so itself). A model
        whose labels are a latent site it sums out (M2's y: ``enumerated_sites``) gets none, so
        it is scored on x alone: log p(x) with y summed out, as for unlabelled data."""
        if self.labels is None or tuple(getattr(run.vae, "enumerated_sites", ())):
            return {}
        return {"y": self.labels}


def select_datapoints(run: Run, split: str = "test", num_datapoints: Optional[int] = None, seed: int = 0) -> Selection:
    """Load the run's data and pick ``num_datapoints`` of ``split`` (all when None; a seeded subset).
    ``"train"`` is the points the run trained on: its validation split (``val_fraction``) is left out.

    Every split is scored as the model sees data: with dynamic binarization the training set
    is held as grey levels and binarized afresh for each minibatch, so here its selected points
    are binarized once, x ~ Bernoulli(grey level) with a generator seeded by ``seed``, as the
    test set was at load time; a Bernoulli likelihood never scores grey levels.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if num_datapoints is not None and num_datapoints < 1:
        raise ValueError(f"num_datapoints must be >= 1, got {num_datapoints}")
    # the splits the run recorded, not files replaced since; MNIST's test: the training images unread
    data = load_run_data(run, test_only=split == "test")
    x = data.test if split == "test" else data.train
    labels = data.test_labels if split == "test" else data.train_labels
    pool = np.arange(x.shape[0])
    if split == "train":  # the points trained on: a validation split (val_fraction) is held out of them
        from ppl_vae.inference.training import validation_split

        held = validation_split(x.shape[0], run.config.train)
        pool = pool if held is None else held[0].numpy()
    n = len(pool)
    if num_datapoints is None or num_datapoints >= n:
        index = pool
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_datapoints]
        index = np.sort(pool[perm.numpy()])
    device = next(run.vae.parameters()).device
    idx = torch.as_tensor(index)
    x, preprocessing = x[idx], "none"
    if split == "train" and getattr(data, "dynamic_binarization", False):
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
        preprocessing = f"dynamic binarization: x ~ Bernoulli(grey level), drawn once with seed {seed}"
    elif getattr(data, "dynamic_binarization", False):
        preprocessing = "dynamic binarization: binarized once at load time (the dataset's fixed test draw)"
    elif run.config.data.binarize != "none":
        preprocessing = f"binarize = {run.config.data.binarize}"
    return Selection(x.to(device), None if labels is None else labels[idx].to(device), index, split, preprocessing)


def weights_scored(run: Run) -> str:
    """ ", the weights after epoch N" for a page's run line (empty where the epoch is not known):
    a page left in a run directory that a resume has since trained on says which weights it scored."""
    return "" if run.checkpoint_epoch is None else f", the weights after epoch {run.checkpoint_epoch}"


def check_out_dir(out: Path, name: str = "out_dir") -> Path:
    """Create the folder ``out`` if needed; a one-line ValueError naming ``name`` when it cannot hold files."""
    from ppl_vae.io import check_target, make_folder

    out = Path(out)
    check_target(out / ".probe", shown=out)  # no folder is made through a symlink leaving a run directory
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {out} is an existing file; give a folder (it is created if missing)")
    try:
        make_folder(out)
    except OSError as exc:
        raise ValueError(f"{name} {out} cannot be created: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {out} is not writable")
    return out


def run_out_dir(run: Run, out_dir: Optional[Path]) -> Path:
    """The folder for a run's results (default: the run directory), checked by :func:`check_out_dir`."""
    return check_out_dir(Path(run.run_dir) if out_dir is None else Path(out_dir), "out_dir")


def figure_to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """A figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }
th { text-align: left; } td { text-align: right; font-variant-numeric: tabular-nums; } td.text { text-align: left; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; } code { background: #f4f4f4; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.4em 0.8em; margin: 0.5em 0; }
.lead { background: #f3f6fa; border-left: 4px solid #4a78b0; padding: 0.6em 1em; }
"""


def label_metric_lines(run: Run, sel: Selection) -> Tuple[Dict[str, float], List[str]]:
    """The label metrics the run's model declares (``label_metrics``: M2's test error of q(y|x),
    a GMVAE's cluster accuracy and clusters used), on the selected datapoints against their
    labels, and one line each saying what it is; nothing where the model declares none or the
    data has no class labels. ``evaluate`` and multi-run ``compare`` print them beside log p̂(x)."""
    from ppl_vae.data.datasets import labels_are_anomalies

    if not tuple(getattr(run.vae, "label_metrics", ())) or sel.labels is None:
        return {}, []
    if labels_are_anomalies(run.config.data.dataset):  # 0/1 anomaly flags are no classes
        return {}, []
    from ppl_vae.analysis.semisupervised import describe_label_metrics, label_metrics

    x, labels, n = sel.x, sel.labels, int(sel.x.shape[0])
    hidden = labels < 0  # a semi-supervised run's training split: the labels it was not given
    if bool(hidden.all()):
        return {}, [f"no label metric: none of the {n} {sel.split} datapoints has a label this run was given"]
    if bool(hidden.any()):
        keep = (~hidden).nonzero().squeeze(-1)
        x, labels = x[keep.to(x.device)], labels[keep]
    try:
        values = label_metrics(run.vae, x, labels)
    except ValueError:  # labels that are not class indices: nothing to measure against
        return {}, []
    lines = describe_label_metrics(run.vae, values, int(x.shape[0]), sel.split)
    if bool(hidden.any()):
        lines = [
            f"{line} [on the {x.shape[0]} of the {n} {sel.split} datapoints whose labels the run was given; "
            "it hid the others']"
            for line in lines
        ]
    return values, lines
