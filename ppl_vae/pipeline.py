"""From a config to a trained run directory, and back: :func:`fit`, :func:`resume`, :func:`load_run`.

Read top to bottom, this module is the whole run layer:

1. :func:`prepare` checks the config, loads the data, builds the model and the training method's
   stepper, and checks the data against the likelihood: everything that can fail on bad input,
   before any file is touched.
2. :func:`fit` and :func:`resume` describe the work as a :class:`Job` and hand it to
   :func:`execute`, the one place that decides between this process, N processes started here
   (``nproc``) and a rank of a torchrun launch.
3. :func:`run_job` is what every process does: restore the checkpoint when resuming, then the one
   training loop (:func:`ppl_vae.inference.training.train`) with the run directory's
   :class:`~ppl_vae.runs.Checkpointer` and optional sample grids as callbacks (rank 0 only).

A fresh run that stops before its first checkpoint (an error, Ctrl-C) removes what it wrote, and
a folder that holds only a config (a run killed before its first checkpoint) is started again by
:func:`resume` or reused by :func:`fit`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import random
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pyro
import torch

from ppl_vae import runs
from ppl_vae.config import DataConfig, RunConfig, check_config, reset_inapplicable
from ppl_vae.data.datasets import Dataset, check_data_dir, fingerprint, labels_are_anomalies, load_dataset
from ppl_vae.errors import ConfigError, DataError, RunConfigError, RunDirError, TrainingDiverged
from ppl_vae.inference import distributed
from ppl_vae.inference.capabilities import check_compatible
from ppl_vae.inference.training import (
    Callback,
    Stepper,
    TrainState,
    make_stepper,
    num_trained_on,
    resolve_device,
    train,
    validate_train_config,
    validation_split,
    verify_fast_path_on,
)
from ppl_vae.io import write_text
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import build_vae
from ppl_vae.plugins import check_recordable

if TYPE_CHECKING:  # xarray is imported where used: fit needs none of it before its first step
    import xarray as xr


@dataclass
class Run:
    """A trained (or loaded) run: its directory, config, model, and history; ``new_epochs``:
    how many epochs the call that returned it trained (0 for :func:`load_run`).

    ``vae`` is in eval mode whichever call returned it. :func:`fit` and :func:`resume` leave it
    on the device it trained on (CPU when it trained on several processes, or when a complete
    run is returned as it is); :func:`load_run` puts it on its ``device`` (default CPU)."""

    run_dir: Path
    config: RunConfig
    vae: VAE
    history: Optional[xr.Dataset]  # None: not read yet (load_run(history=False)); read_history() reads it
    new_epochs: int = 0
    test_data: Optional[Dict[str, Any]] = None
    """The test split's fingerprint the checkpoint recorded (:func:`~ppl_vae.data.datasets.fingerprint`;
    None for a run from before checkpoints kept one)."""
    train_data: Optional[Dict[str, Any]] = None
    """The training split's fingerprint the checkpoint recorded (None for a run from before)."""
    checkpoint_epoch: Optional[int] = None
    """The epoch the loaded weights are from (:func:`load_run`; the best epoch's with ``best``)."""

    @property
    def made_from(self) -> str:
        """Which weights this run's results describe: "RUN at epoch N" (the run's directory alone
        where the epoch is not known)."""
        return (
            str(self.run_dir) if self.checkpoint_epoch is None else f"{self.run_dir} at epoch {self.checkpoint_epoch}"
        )

    def read_history(self) -> xr.Dataset:
        """The history, read from the run directory on first use where :func:`load_run` was told
        not to read it (an empty Dataset for a run with none)."""
        if self.history is None:
            import xarray as xr

            has = (self.run_dir / runs.HISTORY).is_file()
            self.history = runs.load_history(self.run_dir) if has else xr.Dataset()
        return self.history

    @property
    def epochs_done(self) -> int:
        return int(self.read_history().sizes.get("epoch", 0))

    @property
    def final(self) -> dict:
        """The last epoch's record (train_elbo, test_elbo, ...); empty before the first epoch."""
        if not self.epochs_done:
            return {}
        history = self.read_history()
        last = history.isel(epoch=-1)
        return {k: float(last[k]) for k in history.data_vars}


# -- 1. prepare ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def load_plugins(config: RunConfig, trust: Optional[bool] = None, source: str = "the run") -> None:
    """Import the plugin modules the run names, so its custom parts are registered; only trusted
    ones (see :func:`ppl_vae.plugins.load_run_plugins`): ``trust`` None follows the process's
    setting (the CLI's ``--trust-plugins``)."""
    if config.plugins:
        from ppl_vae import plugins

        plugins.load_run_plugins(config.plugins, trust=plugins.trust_all() if trust is None else trust, source=source)


def absolute_data_paths(config: RunConfig) -> RunConfig:
    """``config`` with a relative ``data_dir``, or a dataset given as a relative file path,
    made absolute from the working folder, as a new run records them: ``evaluate`` and
    ``compare`` then find the data from any folder (a relative path would be read from
    theirs). Registered dataset names and absolute paths stay as they are."""
    from ppl_vae.data.datasets import DATASETS

    d = config.data
    data_dir, dataset = d.data_dir, d.dataset
    if data_dir is not None and not Path(data_dir).expanduser().is_absolute():
        data_dir = str(Path(data_dir).absolute())
    elif data_dir is not None:
        data_dir = str(Path(data_dir).expanduser())  # "~/data" recorded as the folder it names
    if dataset not in DATASETS and not Path(dataset).expanduser().is_absolute() and Path(dataset).exists():
        dataset = str(Path(dataset).absolute())
    elif dataset not in DATASETS and Path(dataset).expanduser().exists():
        dataset = str(Path(dataset).expanduser())
    if (data_dir, dataset) == (d.data_dir, d.dataset):
        return config
    return replace(config, data=replace(d, data_dir=data_dir, dataset=dataset))


def data_config(config: RunConfig, dataset: Optional[str] = None, data_dir: Optional[str] = None) -> DataConfig:
    """The run's data config, with another ``dataset`` and/or ``data_dir`` when given: the run's
    binarization, split and training size stay, so the new data is prepared as the training data was.
    Another ``dataset`` without ``data_dir`` is read from its own default place, not the run's folder."""
    d = config.data
    if dataset is None and data_dir is None:
        return d
    other = dataset is not None and str(dataset) != d.dataset
    new = replace(
        d,
        dataset=d.dataset if dataset is None else str(dataset),
        # the run's folder holds the run's data set: another one is read from its own default
        # place (MNIST's folder also has files named as Fashion-MNIST's, which it would score)
        data_dir=(None if other else d.data_dir) if data_dir is None else str(data_dir),
    )
    # a subset size belongs to the run's own (generated) data set, not to another one
    return new if new.dataset == d.dataset else replace(new, num_images=None)


def load_data(
    config: RunConfig, *, dataset: Optional[str] = None, data_dir: Optional[str] = None, test_only: bool = False
) -> Dataset:
    """The run's data (see :func:`data_config` for ``dataset``/``data_dir``). ``test_only``: the
    caller reads the test split alone, so a dataset with its own test files skips the training
    files (:func:`~ppl_vae.data.datasets.load_dataset`), and a semi-supervised run's labelled
    split, drawn from the training labels, is not drawn: the test split and its labels are the
    same either way (:func:`~ppl_vae.data.labels.keep_labels` masks training labels only)."""
    d = data_config(config, dataset, data_dir)
    data = load_dataset(
        d.dataset,
        d.data_dir,
        binarize=d.binarize,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        train_size=d.train_size,
        num_images=d.num_images,
        test_only=test_only,
    )
    if d.labels is not None and not test_only:  # semi-supervised: the same seeded split wherever the run is loaded
        from ppl_vae.data.labels import keep_labels

        split = validation_split(data.train.shape[0], config.train)  # labels only among the points trained on
        data = keep_labels(data, d.labels, d.label_seed, among=None if split is None else split[0])
    return data


def build_model(config: RunConfig, event_shape, data_info: Optional[dict] = None) -> VAE:
    m = config.model
    return build_vae(
        m.model,
        event_shape,
        prior=m.prior,
        likelihood=m.likelihood,
        latent_dim=m.latent_dim,
        hidden_dim=m.hidden_dim,
        prior_options=m.prior_options,
        likelihood_options=m.likelihood_options,
        data_info=data_info,
        guide=m.guide,
        guide_options=m.guide_options,
        model_options=m.model_options,
    )


TEST_DATA_KEY = "test_data"
"""The key of the checkpoint's metadata ``extra`` holding its test split's fingerprint."""

TRAIN_DATA_KEY = "train_data"
"""The key of the checkpoint's metadata ``extra`` holding its training split's fingerprint
(checked when the run is continued; runs from before it kept none)."""


def _check_split(
    recorded: Optional[Dict[str, Any]], x: Any, split: str, source: str, run_dir: Path, doing: str, labels: Any = None
) -> None:
    """Refuse data whose fingerprint is not the one the run recorded for ``split`` (its labels'
    too, where the run recorded them: runs from before did not)."""
    if recorded is None:
        return
    now: Dict[str, Any] = fingerprint(x, labels if "labels_sha256" in recorded else None)
    if now != recorded:
        if now["shape"] != recorded["shape"]:
            what = f"{now['shape'][0]} {split} points where it recorded {recorded['shape'][0]}"
        elif now["sha256"] != recorded["sha256"]:
            what = f"{split} points of other values"
        else:
            what = f"other {split} labels" if "labels_sha256" in now else f"no {split} labels"
        raise DataError(
            f"the {split} data of {source} is not what {run_dir} was trained with: it has {what} (files "
            f"replaced or regenerated since); restore the files it was trained with{doing}"
        )


def check_test_data(run: "Run", test: Any, source: str, labels: Any = None) -> None:
    """Refuse to score a run's test split when the data found now is not what the run recorded
    (its files were replaced or regenerated since): the scores would carry the run's name for
    other data. ``source``: where the data was read from, for the message."""
    _check_split(run.test_data, test, "test", source, run.run_dir, "", labels)


def load_run_data(run: "Run", *, test_only: bool = False) -> Dataset:
    """The run's own data (:func:`load_data`), refused where a split differs from the one the run
    recorded (files replaced or regenerated since): what a command scores under the run's name
    is what the run was trained and tested on."""
    data = load_data(run.config, test_only=test_only)
    check_test_data(run, data.test, data.name, data.test_labels)
    if not test_only:
        _check_split(run.train_data, data.train, "training", data.name, run.run_dir, "", data.train_labels)
    # a user's class that declares the fast path is scored as it is checked in training (a run
    # trained before the check, or a plugin edited since, would be scored as its base class)
    verify_fast_path_on(run.vae, data)
    return data


def _check_resumed_data(run_dir: Path, data: Dataset) -> None:
    """A run continues on the data it was trained with: other data would make it a mix of two
    data sets, and the next checkpoint would record the new test split's fingerprint, so that
    evaluate no longer noticed."""
    _, meta = runs.read_checkpoint(run_dir, tensors=False)
    extra = meta.get("extra", {})
    for key, split, x, labels in (
        (TRAIN_DATA_KEY, "training", data.train, data.train_labels),
        (TEST_DATA_KEY, "test", data.test, data.test_labels),
    ):
        _check_split(extra.get(key), x, split, data.name, run_dir, ", or start a new run", labels)


def _check_label_classes(vae: VAE, data: Dataset) -> None:
    """Refuse test labels of a class no training label has, for a model whose classes are the
    labels (cvae, M2): it would be built over max(label) + 1 classes (201 for a stray label 200)
    and score the test split against classes it never saw. Anomaly labels are not classes."""
    if getattr(vae, "num_classes", None) is None or data.train_labels is None or data.test_labels is None:
        return
    seen = set(data.train_labels[data.train_labels >= 0].unique().tolist())  # M2's unlabelled points are -1
    unseen = sorted(set(data.test_labels.unique().tolist()) - seen)
    if unseen:
        shown = ", ".join(map(str, unseen[:5])) + (" ..." if len(unseen) > 5 else "")
        raise DataError(
            f"{data.name}: the test labels hold class{'es' if len(unseen) > 1 else ''} {shown}, which no training "
            f"label has; model {type(vae).__name__} takes its classes from the labels"
        )


def prepare(
    config: RunConfig, world_size: int = 1, device: Optional[torch.device] = None, trust_plugins: Optional[bool] = True
) -> Tuple[VAE, Dataset, Stepper]:
    """Check ``config``, seed the RNGs, load the data, build the model and its stepper (on
    ``device``, default the config's). Touches no file; raises on any bad input.
    ``trust_plugins``: whether the config's plugins may be imported (True for a config the caller
    built; a received run's config goes through :func:`load_plugins`'s trust rule first)."""
    load_plugins(config, trust_plugins)
    check_config(config)  # types, ranges and what each setting applies to, as declared
    if world_size > 1:
        distributed.check_config(config.train, world_size)
    else:
        validate_train_config(config.train)
    seed_everything(config.train.seed)
    data = load_data(config)
    vae = build_model(config, data.event_shape, data.data_info)
    _check_label_classes(vae, data)
    vae.likelihood.check_support(data.train, what=f"the training data of {data.name}")
    vae.likelihood.check_support(data.test, what=f"the test data of {data.name}")
    device = resolve_device(config.train.device) if device is None else device
    vae, data = vae.to(device), data.to(device)
    check_compatible(
        vae,
        config.train,
        world_size=world_size,
        num_train=num_trained_on(int(data.train.shape[0]), config.train),
        model=config.model.model,
        guide=config.model.guide,
    )
    verify_fast_path_on(vae, data)  # a user's class that declares the fast path: before any file
    stepper = make_stepper(vae, config.train)
    return vae, data, stepper


def default_run_dir(config: RunConfig, root: Path = Path("runs")) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{config.model.model}-{Path(config.data.dataset).stem}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


# -- 2. the job, and where it runs -------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training job as every process sees it (picklable, for launched ranks).

    ``fresh``: a new run written into ``run_dir`` (which :func:`fit` checked is reusable);
    otherwise continue from its checkpoint. ``write_config``: a resumed run's writing rank
    rewrites ``config.json`` (a new number of epochs, learning rate or optimizer) together with
    the first checkpoint it writes, never before, so a resume that fails first leaves the
    config describing the checkpoint; a fresh run writes it first. ``created``: ``run_dir`` did
    not exist before, so a fresh run that fails before its first checkpoint removes it.
    ``resumed_config``: the config.json text of a resumed run that never started (``fresh``
    too), put back if it fails before finishing an epoch. ``callbacks`` run on rank 0.
    """

    config: RunConfig
    run_dir: Path
    fresh: bool
    created: bool = False
    write_config: bool = False
    resumed_config: Optional[str] = None
    progress: bool = True
    sample_grids: bool = False
    callbacks: Tuple[Any, ...] = ()
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S
    start_epoch: int = 0
    lr_scale: Optional[float] = None
    reset_optimizer: bool = False


def world_size(nproc: int) -> int:
    """How many processes train: torchrun's WORLD_SIZE under torchrun (``nproc`` must be 1), else ``nproc``."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if distributed.launched_by_torchrun():
        if nproc != 1:
            raise ValueError(f"nproc must be 1 under torchrun (torchrun starts the processes), got {nproc}")
        return distributed.env_world_size()
    return nproc


def execute(job: Job, nproc: int, prepared: Optional[Tuple[VAE, Dataset, Stepper]] = None) -> Run:
    """Run ``job`` here, on ``nproc`` processes started here, or as this torchrun rank.

    ``prepared``: what :func:`prepare` returned in this process (reused when training here).
    """
    if distributed.launched_by_torchrun():
        return _as_rank(job)
    if nproc > 1:
        try:
            distributed.launch(_launched_rank, (job,), nproc=nproc)
        except BaseException:
            _discard_unstarted(job)  # a rank killed before its first checkpoint cannot clean up
            raise
        run = load_run(job.run_dir, device="cpu")
        run.new_epochs = run.epochs_done - (0 if job.fresh else job.start_epoch)
        return run
    return run_job(job, prepared or prepare(job.config))


def _launched_rank(job: Job) -> None:
    """A process started by :func:`distributed.launch`: train as its rank; the parent loads the run."""
    _as_rank(job)


def _as_rank(job: Job) -> Run:
    with distributed.process_group(job.config.train.device, job.timeout_s) as ctx:
        if job.fresh:  # every rank writes to the folder rank 0 chose
            job = replace(job, run_dir=Path(ctx.broadcast_object(str(job.run_dir) if ctx.is_main else None)))
        run = run_job(job, prepare(job.config, ctx.world_size, ctx.device), ctx)
        ctx.barrier()  # rank 0 has written the last checkpoint when every rank returns
    return run


# -- 3. what every process does ---------------------------------------------------------------------


def run_job(job: Job, prepared: Tuple[VAE, Dataset, Stepper], dist: Optional[distributed.DistContext] = None) -> Run:
    """Restore (when resuming) and train; on the writing rank, checkpoint into ``job.run_dir``."""
    vae, data, stepper = prepared
    config, run_dir = job.config, job.run_dir
    writer = dist is None or dist.is_main
    if job.sample_grids:  # before the run directory is made or written
        from ppl_vae.analysis.generation import check_images

        check_images(vae, "--sample-grids")
    if job.fresh and writer and job.resumed_config is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.save_config(run_dir, config)
    # from here until the first epoch ends, a failure removes what this fresh run wrote (config.json)
    try:
        if not job.fresh:
            _check_labelled_split(run_dir, data)
            _check_resumed_data(run_dir, data)
        if job.fresh:
            state = TrainState()
        else:
            # a history without val_elbo would let a run with early stopping train on past its stop
            needed = ("val_elbo",) if config.train.val_fraction > 0 else ()
            state = runs.restore(run_dir, vae, stepper, optimizer_state=not job.reset_optimizer, history_vars=needed)
            runs.restore_learning_rates(
                run_dir, stepper, config.train, lr_scale=job.lr_scale or 1.0, fresh_optimizer=job.reset_optimizer
            )
        start = state.epoch
        checkpointer = runs.Checkpointer(
            run_dir,
            config.train.checkpoint_every,
            extra={
                "event_shape": list(data.event_shape),
                "data_info": data.data_info,
                runs.CONFIG_KEY: json.loads(config.to_json()),  # what these weights are trained under
                TEST_DATA_KEY: fingerprint(data.test, data.test_labels),  # what evaluate and compare must find again
                TRAIN_DATA_KEY: fingerprint(data.train, data.train_labels),  # what a resume must find again
            },
            # a resume's new settings are written with the first checkpoint trained under them
            before_first_save=(lambda: runs.save_config(run_dir, config)) if job.write_config and writer else None,
        )
        callbacks: list = [checkpointer] if writer else []
        if job.sample_grids and writer:
            from ppl_vae.analysis.generation import SampleGridRecorder

            recorder = SampleGridRecorder(run_dir / "samples")
            recorder.check_frames()  # a resume over frames drawn with other settings: refused before training
            callbacks.append(recorder)
        callbacks.append(DivergenceCheck(int(np.prod(data.event_shape))))
        callbacks.extend(job.callbacks)
        metrics = None
        # what the model declares, on the test set where the data has class labels (0/1 anomaly
        # flags are no classes: a cluster accuracy against them is the share of normal points)
        if vae.label_metrics and not labels_are_anomalies(config.data.dataset):
            from ppl_vae.analysis.semisupervised import epoch_label_metrics

            metrics = epoch_label_metrics(vae, data.test, data.test_labels)
        history = train(
            vae,
            data,
            config.train,
            stepper=stepper,
            state=state,
            callbacks=callbacks,
            progress=job.progress and writer,
            history_attrs=history_attrs(config, data),
            dist=dist,
            metrics=metrics,
        )
    except TrainingDiverged as exc:
        if writer:
            _discard_unstarted(job)
        if runs.started(run_dir):
            kept = f"the last good checkpoint is from epoch {runs.checkpoint_epoch(run_dir)} in {run_dir}"
        elif job.created:
            kept = f"no epoch finished, so {run_dir} was removed"
        else:
            kept = f"no epoch finished; {run_dir} holds what it held before"
        raise TrainingDiverged(f"{exc}; {kept}", step=exc.step) from None
    except BaseException:
        if writer:
            _discard_unstarted(job)
        raise
    vae.eval()  # as load_run gives it: a model may compute another density in training mode (M2)
    done = int(history.sizes.get("epoch", 0))
    return Run(
        run_dir, config, vae, history, new_epochs=done - start, checkpoint_epoch=done
    )  # saved after its last epoch


class DivergenceCheck(Callback):
    """Warns, naming the epoch, the step and the setting to change, when an epoch's ELBO is NaN,
    infinite, or below any plausible value: ``PLAUSIBLE_NATS_PER_DIM`` nats per data dimension
    (-5.6e30 from an SGD run ended with exit 0 and no word)."""

    PLAUSIBLE_NATS_PER_DIM = 1e6

    def __init__(self, num_dims: int):
        self.floor = -self.PLAUSIBLE_NATS_PER_DIM * max(1, num_dims)

    def on_epoch_end(self, ctx) -> None:
        import warnings

        record = ctx.state.records[-1]
        for key in ("train_elbo", "test_elbo"):
            value = record.get(key)
            if value is None:
                continue
            if not np.isfinite(value) or value < self.floor:
                what = "is not finite" if not np.isfinite(value) else f"is below any plausible value ({self.floor:.3g})"
                warnings.warn(
                    f"training has diverged: epoch {ctx.state.epoch} (step {ctx.state.step}) ended with "
                    f"{key.replace('_', ' ').replace('elbo', 'ELBO')} {value:.3g} nats per datapoint, which {what}; "
                    f"choose a smaller learning rate (train.lr, --lr; now {ctx.config.lr:g}) or another optimizer "
                    f"(train.optimizer, --optimizer; now {ctx.config.optimizer})",
                    UserWarning,
                    stacklevel=2,
                )
                return


def _check_labelled_split(run_dir: Path, data: Dataset) -> None:
    """A semi-supervised run resumes on the labelled points it was trained with (saved in the checkpoint)."""
    if not runs.started(run_dir):
        return
    _, meta = runs.read_checkpoint(run_dir, tensors=False)
    saved = meta.get("extra", {}).get("data_info", {}).get("labelled_indices")
    if saved is not None and saved != data.data_info.get("labelled_indices"):
        raise RunDirError(
            f"{run_dir}: the labelled training points differ from those the checkpoint was trained "
            "with (data.labels, data.label_seed or the data changed); start a new run"
        )


def _discard_unstarted(job: Job) -> None:
    """Remove what a fresh run wrote when it stopped before finishing its first epoch: an epoch-0
    checkpoint only repeats the failure, and the folder would refuse a corrected ``fit``."""
    if not job.fresh or not job.run_dir.is_dir():
        return
    if runs.started(job.run_dir):
        try:
            if runs.checkpoint_epoch(job.run_dir) > 0:
                return
        except RunDirError:
            return
    if job.created:
        shutil.rmtree(job.run_dir, ignore_errors=True)
    elif job.resumed_config is not None:  # a resumed run that had never started: as it was
        for name in (runs.CHECKPOINT, runs.HISTORY):  # it had neither (resume refuses a lone history)
            (job.run_dir / name).unlink(missing_ok=True)
        if (job.run_dir / runs.CONFIG).read_text() != job.resumed_config:
            write_text(job.run_dir / runs.CONFIG, job.resumed_config, run_files=True)
        runs.remove_stale_temp_files(job.run_dir)
    else:
        for name in (runs.CONFIG, runs.CHECKPOINT, runs.HISTORY):  # the folder held nothing else (is_reusable)
            (job.run_dir / name).unlink(missing_ok=True)
        if job.sample_grids:
            shutil.rmtree(job.run_dir / "samples", ignore_errors=True)
            (job.run_dir / "samples.gif").unlink(missing_ok=True)
        runs.remove_stale_temp_files(job.run_dir)


def history_attrs(config: RunConfig, data: Dataset) -> dict:
    return {
        "model": config.model.model,
        "dataset": data.name,
        "num_train": int(data.train.shape[0]),
        "num_test": int(data.test.shape[0]),
    }


# -- the entry points ---------------------------------------------------------------------------------


def fit(
    config: RunConfig,
    out: Optional[Path] = None,
    *,
    nproc: int = 1,
    progress: bool = True,
    sample_grids: bool = False,
    callbacks: Sequence[Any] = (),
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
) -> Run:
    """Train a model from ``config``, writing the run to ``out`` (a fresh ``runs/...`` when None).

    ``out`` must not exist, be an empty folder, or hold a run that never started (a config and
    no checkpoint); use :func:`resume` to continue a run. ``nproc`` > 1 trains data-parallel on
    that many processes here (under torchrun leave it at 1). ``sample_grids`` saves a grid of
    samples after every epoch (``RUN/samples/``, ``RUN/samples.gif``); ``callbacks``
    (:class:`~ppl_vae.inference.training.Callback` or ``fn(epoch, vae)``, picklable when
    ``nproc`` > 1) run on rank 0. ``timeout_s`` bounds every distributed collective.
    The returned :class:`Run`'s model is in eval mode, on the device it trained on (see :class:`Run`).
    """
    distributed.check_timeout(timeout_s)
    check_data_dir(config.data.dataset, config.data.data_dir)  # a new run records no ignored setting
    check_recordable(config.plugins)  # nor a plugin later commands would refuse to load
    config = absolute_data_paths(config)
    world = world_size(nproc)
    prepared = prepare(config, world) if world == 1 or not distributed.launched_by_torchrun() else None
    if world > 1 and prepared is not None:
        prepared[2].close()  # checked here; every rank builds its own
        prepared = None
    run_dir = default_run_dir(config) if out is None else Path(out)
    if str(out) == "" or str(out).isspace():
        raise RunDirError("the run directory (--out) is an empty name; give a folder name")
    _check_name_lengths(run_dir)
    if not runs.is_reusable(run_dir):
        what = "is a file" if run_dir.exists() and not run_dir.is_dir() else "already holds files"
        raise RunDirError(f"{run_dir} {what}; write the run to another folder or resume it")
    _check_parent(run_dir)
    job = Job(
        config,
        run_dir,
        fresh=True,
        created=not run_dir.exists(),
        progress=progress,
        sample_grids=sample_grids,
        callbacks=tuple(callbacks),
        timeout_s=timeout_s,
    )
    return execute(job, world, prepared)


def _check_parent(run_dir: Path) -> None:
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunDirError(
            f"cannot create {run_dir}: it is a symbolic link to {run_dir.readlink()}, which does not exist; "
            "remove the link or give another folder"
        )
    for parent in run_dir.absolute().parents:
        if (parent / runs.CONFIG).is_file() and runs.started(parent):  # a run holds its own files only
            raise RunDirError(f"cannot create {run_dir} inside the run directory {parent}: give a folder outside it")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"cannot create {run_dir}: {parent} is a file, not a folder")
            return


def _check_name_lengths(path: Path) -> None:
    """A one-line RunDirError for a path the filesystem would refuse as too long (before any work)."""
    import os

    absolute = Path(os.path.abspath(path))
    try:  # (Path.exists itself raises for a name that is too long: ask the current folder's filesystem)
        name_max = os.pathconf(os.getcwd(), "PC_NAME_MAX")
        path_max = os.pathconf(os.getcwd(), "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max:
            raise RunDirError(
                f"cannot create the run directory: the name {part[:20]}... is "
                f"{len(os.fsencode(part))} bytes long; the filesystem allows {name_max}"
            )
    longest = len(os.fsencode(str(absolute))) + 40  # room for the files written inside
    if longest > path_max:
        raise RunDirError(
            f"cannot create the run directory {str(path)[:40]}...: its path is "
            f"{len(os.fsencode(str(absolute)))} bytes long; the filesystem allows {path_max} "
            "including the files inside; choose a shorter --out"
        )


def _one_trainer(resume_fn: Callable[..., "Run"]) -> Callable[..., "Run"]:
    """``resume`` holding the run directory for this process (:func:`ppl_vae.runs.exclusive`);
    torchrun's ranks leave it to their launch."""

    @functools.wraps(resume_fn)
    def holding(run_dir: Path, **kwargs: Any) -> "Run":
        if distributed.launched_by_torchrun():
            return resume_fn(run_dir, **kwargs)
        with runs.exclusive(Path(run_dir)):
            return resume_fn(run_dir, **kwargs)

    return holding


@_one_trainer
def resume(
    run_dir: Path,
    *,
    epochs: Optional[int] = None,
    nproc: int = 1,
    progress: bool = True,
    sample_grids: bool = False,
    callbacks: Sequence[Any] = (),
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    trust_plugins: Optional[bool] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    device: Optional[str] = None,
) -> Run:
    """Continue a run from its checkpoint up to ``epochs`` epochs (default: the config's).

    ``epochs`` must exceed the epochs already done. A run that is already complete (and no
    ``epochs`` given) is returned as it is. A run that never took its first step starts from
    scratch with its config. Other arguments as in :func:`fit`; on several machines the run
    directory must be on a shared filesystem.

    ``lr`` and ``optimizer`` change those settings: the learning-rate schedule continues (its
    epoch count and decayed rate; a new ``lr`` scales the rates by new/old), and a new optimizer
    starts its own state afresh. ``device`` moves the run (a GPU-trained run on to a CPU).
    Every check of the run directory (links, damaged checkpoint,
    scheduler state or history) comes before anything is written.
    """
    distributed.check_timeout(timeout_s)
    run_dir = Path(run_dir)
    if run_dir.is_dir():  # a resume writes nothing through a link, and finds nothing in its way
        runs.check_writable(
            run_dir, files=("samples.gif",) if sample_grids else (), folders=("samples",) if sample_grids else ()
        )
    config = runs.load_config(run_dir, check_names=False)
    original_config = (run_dir / runs.CONFIG).read_text()
    load_plugins(config, trust_plugins, source=str(run_dir))  # before anything imports its parts
    runs.check_config_names(run_dir, config)  # a plugin may register its method or objective
    world = world_size(nproc)
    if not distributed.launched_by_torchrun():
        runs.remove_stale_temp_files(run_dir)  # once, here: never by several ranks at a time
    fresh = not runs.started(run_dir)
    if fresh and (run_dir / runs.HISTORY).is_file():
        raise RunDirError(
            f"{run_dir} has {runs.HISTORY} but no {runs.CHECKPOINT}: the trained weights are lost, "
            "so it cannot be continued; restore the checkpoint, or start a new run in another folder"
        )
    done = 0 if fresh else runs.checkpoint_epoch(run_dir)
    if not fresh:  # a config.json edited since its checkpoint would train something else
        runs.check_config_matches_checkpoint(
            run_dir, config, runs.read_checkpoint(run_dir, tensors=False)[1], may_differ=runs.RESUME_MAY_DIFFER
        )
    changed: Dict[str, Any] = {}
    if lr is not None and lr != config.train.lr:
        changed["lr"] = lr
    if optimizer is not None and optimizer != config.train.optimizer:
        changed["optimizer"] = optimizer
    if device is not None and device != config.train.device:  # where it runs: the same training
        changed["device"] = device
    old_lr = config.train.lr
    if changed:
        config.train = replace(config.train, **changed)
    if "optimizer" in changed:  # Adam's eps and betas do not apply to SGD: the record drops them
        dropped = reset_inapplicable(config, "train.optimizer")
        if dropped:
            warnings.warn(
                f"optimizer {changed['optimizer']!r} does not take {', '.join(dropped)}: "
                "config.json records the defaults from here on",
                stacklevel=2,
            )
    if epochs is not None:
        if epochs <= done:
            raise ConfigError(
                f"train.epochs ({epochs}) must be more than the {done} epochs {run_dir} has done to continue it",
                field="train.epochs",
            )
        config.train.epochs = epochs
    elif done >= config.train.epochs:
        if changed:
            raise ConfigError(
                f"{run_dir} has done all {done} of its epochs; give train.epochs (more than {done}) "
                "to train it further with new settings",
                field="train.epochs",
            )
        return load_run(run_dir)  # complete: nothing to do
    try:
        prepared = prepare(config, world) if not distributed.launched_by_torchrun() else None
    except ConfigError as exc:  # a setting the user did not give now: config.json's, named as it spells it
        given_now = {*changed, "epochs", *(["nproc"] if world > 1 else [])}  # what this command says
        if exc.field is not None and exc.field.split(".")[-1] not in given_now:
            raise RunConfigError(f"{run_dir / runs.CONFIG}: {exc}") from None
        raise
    if world > 1 and prepared is not None:
        prepared[2].close()
        prepared = None
    # config.json takes the new target once it is known to be valid (written by the writing rank)
    job = Job(
        config,
        run_dir,
        fresh=fresh,
        created=False,
        write_config=epochs is not None or bool(changed),
        resumed_config=original_config if fresh else None,
        progress=progress,
        sample_grids=sample_grids,
        callbacks=tuple(callbacks),
        timeout_s=timeout_s,
        start_epoch=done,
        lr_scale=config.train.lr / old_lr if "lr" in changed else None,
        reset_optimizer="optimizer" in changed,
    )
    return execute(job, world, prepared)


def load_run(
    run_dir: Path,
    device: str = "cpu",
    *,
    best: bool = False,
    trust_plugins: Optional[bool] = None,
    history: bool = True,
) -> Run:
    """Rebuild a run's model with its trained weights, in eval mode (no data is loaded except its shape).

    ``best``: the weights of the epoch with the best validation ELBO (``checkpoint-best.safetensors``,
    written when the run has a validation split) instead of the last; the history stays whole.
    The plugins its config names are imported only when trusted (installed entry points, plugins
    already loaded, or ``trust_plugins=True``; None: the process's ``--trust-plugins`` setting).
    ``history`` False: the history file is checked to be an HDF5 file but not read, so xarray is
    not imported (about 0.35 s): ``evaluate`` and ``compare`` score first, and
    :meth:`Run.read_history` reads it when it is needed."""
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir, check_names=False)
    load_plugins(config, trust_plugins, source=str(run_dir))
    runs.check_config_names(run_dir, config)  # a plugin may register its method or objective
    name = runs.CHECKPOINT_BEST if best else runs.CHECKPOINT
    tensors, meta = runs.read_checkpoint(run_dir, checkpoint=name)
    extra = meta.get("extra", {})
    if "event_shape" in extra:
        event_shape, data_info = extra["event_shape"], extra.get("data_info", {})
    else:
        data = load_data(config)
        event_shape, data_info = data.event_shape, data.data_info
    vae = build_model(config, event_shape, data_info)
    # scored as trained: the model and data the checkpoint's weights were trained with
    runs.check_config_matches_checkpoint(run_dir, config, meta, sections=("model", "data"), may_differ=runs.MAY_MOVE)
    runs.load_weights(vae, tensors, str(run_dir / name))
    vae.eval()
    run = Run(
        run_dir,
        config,
        vae.to(resolve_device(device)),
        None,
        test_data=extra.get(TEST_DATA_KEY),
        train_data=extra.get(TRAIN_DATA_KEY),
        checkpoint_epoch=int(meta["epoch"]),
    )
    if history:
        run.read_history()
    else:
        runs.check_history_file(run_dir)
    return run
