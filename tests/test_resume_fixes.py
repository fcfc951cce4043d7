"""Resume and fit bugs of the run layer, one test each (each failed before its fix): the learning-rate
schedule across a resume that changes the optimizer or the rate, damaged scheduler state and
histories refused up front, fit's model in eval mode, links and files in the way of a resume's
writes, and a Ctrl-C during the history write."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import threading

import pytest
import torch

from ppl_vae import pipeline, runs
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.errors import RunDirError
from tests.conftest import invoke, one_line_error

STEP_LR = {"lr_schedule": "StepLR", "lr_schedule_options": {"step_size": 2, "gamma": 0.5}}


def small_config(**train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(train_size=100, binarize="threshold"),
        train=TrainConfig(**{"epochs": 3, "batch_size": 50, "device": "cpu", "train_eval_size": 50, **train}),
    )


def lrs(run) -> list:
    return [float(v) for v in run.history["lr"].values]


def rewrite_checkpoint(run_dir, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / runs.CHECKPOINT
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["ppl_vae"])
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata={"ppl_vae": json.dumps(meta)})


def snapshot(run_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and not p.is_symlink()}


# -- 1. the learning-rate schedule continues across a resume ------------------------------------------


@pytest.mark.parametrize("change", [{}, {"optimizer": "adagrad"}], ids=["same-optimizer", "new-optimizer"])
def test_resume_continues_the_lr_schedule(tmp_path, one_thread, change):
    pipeline.fit(small_config(**STEP_LR), tmp_path / "r", progress=False)
    run = pipeline.resume(tmp_path / "r", epochs=5, progress=False, **change)
    # before: an optimizer change restarted the schedule ([.001, .001, .0005, .001, .001])
    assert lrs(run) == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize(
    "schedule, options",
    [
        ("CyclicLR", {"base_lr": 1e-4, "max_lr": 1e-2, "step_size_up": 1}),
        ("OneCycleLR", {"max_lr": 1e-2, "total_steps": 3}),
    ],
)
def test_a_schedule_that_cycles_the_momentum_resumes_exactly(tmp_path, one_thread, schedule, options):
    """QA: CyclicLR and OneCycleLR move Adam's beta1 with the rate; made afresh on resume they set
    it back to the cycle's start (0.9 where the run had reached 0.8), so fit 1 + resume to 3
    trained another run than fit 3 (train ELBO at epoch 2: -16.015 against -23.258)."""
    config = small_config(lr_schedule=schedule, lr_schedule_options=options)
    straight = pipeline.fit(config, tmp_path / "straight", progress=False)
    config.train.epochs = 1
    pipeline.fit(config, tmp_path / "resumed", progress=False)
    resumed = pipeline.resume(tmp_path / "resumed", epochs=3, progress=False)
    for name in ("train_loss", "train_elbo", "test_elbo", "lr"):
        assert resumed.history[name].values.tolist() == straight.history[name].values.tolist(), name
    for (key, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("change", [{}, {"optimizer": "adagrad"}], ids=["same-optimizer", "new-optimizer"])
def test_resume_with_a_new_lr_scales_the_schedule(tmp_path, one_thread, change):
    pipeline.fit(small_config(**STEP_LR), tmp_path / "r", progress=False)
    run = pipeline.resume(tmp_path / "r", epochs=5, progress=False, lr=1e-2, **change)
    # the decayed rate is scaled by new/old (x10) and the schedule goes on decaying from there
    assert lrs(run) == pytest.approx([1e-3, 1e-3, 5e-4, 5e-3, 2.5e-3])
    _, meta = runs.read_checkpoint(tmp_path / "r", tensors=False)
    assert meta["schedulers"]["svi"]["base_lrs"] == pytest.approx([1e-2])


@pytest.mark.parametrize("stage", ["history", "checkpoint"])
def test_an_interrupted_resume_with_a_new_lr_leaves_config_and_checkpoint_in_step(
    tmp_path, one_thread, monkeypatch, stage
):
    """QA: a resume with a new --lr wrote config.json first, then the history, then the
    checkpoint; a Ctrl-C between them left config.json with the new rate beside a checkpoint
    trained with the old one, and every later resume was refused ('restore config.json'). The
    three now go into place as one set."""
    import safetensors.torch

    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=2), run_dir, progress=False)
    before = snapshot(run_dir)
    target = (runs, "write_netcdf") if stage == "history" else (safetensors.torch, "save")
    real = getattr(*target)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.resume(run_dir, epochs=3, progress=False, lr=5e-4)
    monkeypatch.setattr(*target, real)
    assert snapshot(run_dir) == before  # config.json, history and checkpoint all as they were
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    resumed = pipeline.resume(run_dir, epochs=3, progress=False, lr=5e-4)  # the printed command works
    assert resumed.history.epoch.values.tolist() == [1, 2, 3] and resumed.config.train.lr == 5e-4


def test_a_history_from_another_run_is_refused_on_resume(tmp_path, one_thread):
    """QA: resume checked only the epoch numbers of history.nc, so another run's history (seed 1)
    was merged into this one's: its epochs 1-2 then this run's epoch 3, read by early stopping,
    the best checkpoint and ReduceLROnPlateau. The checkpoint now records which history it
    continues."""
    pipeline.fit(small_config(epochs=2), tmp_path / "mine", progress=False)
    pipeline.fit(small_config(epochs=2, seed=1), tmp_path / "other", progress=False)
    (tmp_path / "mine" / runs.HISTORY).write_bytes((tmp_path / "other" / runs.HISTORY).read_bytes())
    before = snapshot(tmp_path / "mine")
    with pytest.raises(RunDirError, match="history.nc is not the history of .*checkpoint.safetensors") as caught:
        pipeline.resume(tmp_path / "mine", epochs=3, progress=False)
    assert "\n" not in str(caught.value) and snapshot(tmp_path / "mine") == before
    resumed = pipeline.resume(tmp_path / "other", epochs=3, progress=False)  # its own history resumes
    assert resumed.history.epoch.values.tolist() == [1, 2, 3]


def test_resume_with_a_new_lr_scales_the_schedule_base_too(tmp_path, one_thread):
    """CosineAnnealingLR reads its base rate at a restart (epoch T_max + 1): scaled, it goes on
    as a run started at the new rate does."""
    cosine = {"lr_schedule": "CosineAnnealingLR", "lr_schedule_options": {"T_max": 2}}
    pipeline.fit(small_config(**cosine, epochs=2), tmp_path / "a", progress=False)
    scaled = pipeline.resume(tmp_path / "a", epochs=5, progress=False, lr=1e-2)
    reference = pipeline.fit(small_config(**cosine, lr=1e-2, epochs=5), tmp_path / "b", progress=False)
    assert lrs(scaled)[2:] == pytest.approx(lrs(reference)[2:])


# -- 2. scheduler state missing or damaged ---------------------------------------------------------


@pytest.fixture
def scheduled_run(tmp_path, one_thread):
    pipeline.fit(small_config(**STEP_LR, epochs=2), tmp_path / "r", progress=False)
    return tmp_path / "r"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda m: m.pop("schedulers"), "lacks the learning-rate scheduler state"),
        (lambda m: m["schedulers"].pop("svi"), "lacks the learning-rate scheduler state"),
        (lambda m: m["schedulers"].update(svi="abc"), "is damaged"),
        (lambda m: m["schedulers"]["svi"].update(last_epoch="abc"), "last_epoch"),
        (lambda m: m["schedulers"]["svi"].pop("last_epoch"), "last_epoch"),
        (lambda m: m["schedulers"]["svi"].update(base_lrs=["x"]), "base_lrs"),
    ],
    ids=["no-schedulers", "no-entry", "string-entry", "text-last-epoch", "no-last-epoch", "text-base-lrs"],
)
def test_damaged_scheduler_state_is_refused_before_anything_is_written(scheduled_run, damage, message):
    rewrite_checkpoint(scheduled_run, lambda t, m: damage(m))
    before = snapshot(scheduled_run)
    result = invoke("fit", "--resume", scheduled_run, "--epochs", 3, "--no-progress")
    line = one_line_error(result, message)
    assert str(scheduled_run / runs.CHECKPOINT) in line
    assert snapshot(scheduled_run) == before


# -- 3. fit returns the model as load_run does --------------------------------------------------------


def test_fit_returns_the_model_in_eval_mode_like_load_run(tmp_path, one_thread):
    import pyro.poutine as poutine

    config = RunConfig(
        model=ModelConfig(model="m2", latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200, labels=20),
        train=TrainConfig(epochs=1, batch_size=100, device="cpu"),
    )
    fitted = pipeline.fit(config, tmp_path / "m2", progress=False)
    loaded = pipeline.load_run(tmp_path / "m2")
    data = pipeline.load_data(config)
    x, y = data.test[:8].cpu(), data.test_labels[:8].cpu()

    def log_density(vae):
        torch.manual_seed(0)
        with torch.no_grad():
            return float(poutine.trace(vae.model).get_trace(x, y).log_prob_sum())

    # before: fit's model was in training mode, where M2 adds its classifier term
    assert log_density(fitted.vae.to("cpu")) == pytest.approx(log_density(loaded.vae), rel=1e-6)
    assert not fitted.vae.training and not loaded.vae.training


# -- 4. nothing in the way of, or redirecting, a resume's writes ---------------------------------------


@pytest.fixture
def tiny_run(tmp_path, one_thread):
    pipeline.fit(small_config(epochs=1), tmp_path / "r", progress=False)
    return tmp_path / "r"


def test_resume_refuses_a_tensorboard_file_before_writing(tiny_run):
    pytest.importorskip("torch.utils.tensorboard")
    (tiny_run / "tensorboard").write_text("not a folder")
    before = snapshot(tiny_run)
    result = invoke("fit", "--resume", tiny_run, "--epochs", 2, "--log", "tensorboard", "--no-progress")
    one_line_error(result, "tensorboard")
    assert snapshot(tiny_run) == before


def test_resume_refuses_a_tensorboard_link_out_of_the_run(tiny_run, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tiny_run / "tensorboard").symlink_to(outside)
    before = snapshot(tiny_run)
    result = invoke("fit", "--resume", tiny_run, "--epochs", 2, "--log", "tensorboard", "--no-progress")
    one_line_error(result, "symlink")
    assert os.listdir(outside) == []
    assert snapshot(tiny_run) == before


@pytest.mark.parametrize("name", [runs.HISTORY, runs.CHECKPOINT, runs.CONFIG, "samples"])
def test_resume_refuses_run_files_that_are_links_out_of_the_run(tiny_run, tmp_path, name):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / name
    if name == "samples":
        target.mkdir()
    else:
        (tiny_run / name).rename(target)
    (tiny_run / name).symlink_to(target)
    before = {p.name: p.read_bytes() for p in outside.iterdir() if p.is_file()}
    result = invoke("fit", "--resume", tiny_run, "--epochs", 2, "--sample-grids", "--no-progress")
    one_line_error(result, "symlink")
    assert (tiny_run / name).is_symlink()
    assert {p.name: p.read_bytes() for p in outside.iterdir() if p.is_file()} == before
    assert runs.checkpoint_epoch(tiny_run) == 1


# -- 5. a Ctrl-C in the history write -------------------------------------------------------------------


def unraisable(monkeypatch) -> list:
    """What Python would print as "Exception ignored in ..." (pytest turns it into a warning)."""
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(f"{args.exc_type.__name__}: {args.exc_value}"))
    return seen


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_inside_the_history_write_leaves_a_whole_file_and_no_noise(tiny_run, capfd, monkeypatch):
    import h5netcdf

    run = pipeline.load_run(tiny_run)
    state = runs.restore(tiny_run, run.vae)
    real_init = h5netcdf.File.__init__

    def interrupted_init(self, path, mode="r", *args, **kwargs):
        if mode == "w":  # Ctrl-C arrives while the file object is being built
            os.kill(os.getpid(), signal.SIGINT)
        return real_init(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(h5netcdf.File, "__init__", interrupted_init)
    ignored = unraisable(monkeypatch)
    capfd.readouterr()
    # a shell starts background jobs (`cmd &`, nohup) with SIGINT ignored: Ctrl-C as a terminal delivers it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            runs.save(tiny_run, run.vae, None, state)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(h5netcdf.File, "__init__", real_init)
    gc.collect()
    err = capfd.readouterr().err
    assert not ignored and "Exception ignored" not in err and "AttributeError" not in err, (ignored, err)
    assert runs.load_history(tiny_run).epoch.values.tolist() == [1]
    assert not [p for p in tiny_run.iterdir() if p.name.endswith(".tmp")]


def test_a_keyboard_interrupt_raised_inside_the_file_constructor_leaves_no_noise(tiny_run, capfd, monkeypatch):
    """An interrupt raised in h5netcdf.File.__init__ before it sets ``_closed`` made its
    ``__del__`` print "AttributeError: 'File' object has no attribute '_closed'"."""
    import h5netcdf

    run = pipeline.load_run(tiny_run)
    state = runs.restore(tiny_run, run.vae)
    before = (tiny_run / runs.HISTORY).read_bytes()
    real_open = h5netcdf.core._open_h5py

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5netcdf.core, "_open_h5py", interrupted)
    ignored = unraisable(monkeypatch)
    capfd.readouterr()
    with pytest.raises(KeyboardInterrupt):
        runs.save(tiny_run, run.vae, None, state)
    gc.collect()
    monkeypatch.setattr(h5netcdf.core, "_open_h5py", real_open)
    err = capfd.readouterr().err
    assert not ignored and "Exception ignored" not in err and "_closed" not in err, (ignored, err)
    assert (tiny_run / runs.HISTORY).read_bytes() == before


# -- 6. a run with a validation split needs val_elbo in its history --------------------------------------


def test_a_history_without_val_elbo_is_refused_for_a_run_with_early_stopping(tmp_path, one_thread):
    config = small_config(epochs=4, val_fraction=0.2, early_stopping_patience=1)
    pipeline.fit(config, tmp_path / "r", progress=False)
    history = runs.load_history(tmp_path / "r").drop_vars("val_elbo")
    (tmp_path / "r" / runs.HISTORY).unlink()
    history.to_netcdf(tmp_path / "r" / runs.HISTORY, engine="h5netcdf")
    before = snapshot(tmp_path / "r")
    with pytest.raises(RunDirError, match="history.nc is damaged: it lacks 'val_elbo'") as info:
        pipeline.resume(tmp_path / "r", epochs=6, progress=False)
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path / "r") == before
    assert math.isfinite(runs.checkpoint_epoch(tmp_path / "r"))


# -- 6. a resume that fails leaves the run directory describing its checkpoint ----------------------


DIVERGE = ["--optimizer", "sgd", "--lr", "3e38", "--no-progress"]  # non-finite at the second step


def test_a_failed_resume_of_a_run_that_never_started_leaves_its_config(tmp_path, one_thread):
    """A run with its config only resumes from scratch; when that fails before an epoch ends, its
    config.json was deleted (the clean-up of a fresh fit) and the error named an epoch-0
    checkpoint that was gone. It stays, byte for byte, and the error says so."""
    run = tmp_path / "unstarted"
    run.mkdir()
    runs.save_config(run, small_config(epochs=1))
    (run / "NOTES.txt").write_text("mine")
    before = snapshot(run)
    line = one_line_error(invoke("fit", "--resume", run, "--epochs", 2, *DIVERGE), "the loss became")
    assert line.endswith(f"no epoch finished; {run} holds what it held before")
    assert snapshot(run) == before


def test_a_failed_resume_with_new_settings_leaves_the_config_of_its_checkpoint(tiny_run, tmp_path):
    """config.json took a resume's new optimizer and rate before training; when the first new epoch
    diverged, the config said SGD while the checkpoint held Adam's state, and the next resume
    dropped that state. The new settings are now written with the first checkpoint trained
    under them: the run resumes as an untouched copy does."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    before = snapshot(tiny_run)
    line = one_line_error(invoke("fit", "--resume", tiny_run, "--epochs", 2, *DIVERGE), "the loss became")
    assert line.endswith(f"the last good checkpoint is from epoch 1 in {tiny_run}")
    assert snapshot(tiny_run) == before
    for run in (tiny_run, copy):
        assert invoke("fit", "--resume", run, "--epochs", 2, "--no-progress").exit_code == 0
    torch.testing.assert_close(runs.read_checkpoint(tiny_run)[0], runs.read_checkpoint(copy)[0], rtol=0, atol=0)
    # a resume with new settings that trains records them with its checkpoint
    assert invoke("fit", "--resume", tiny_run, "--epochs", 3, "--lr", "0.002", "--no-progress").exit_code == 0
    assert runs.load_config(tiny_run).train.lr == 0.002 and runs.checkpoint_epoch(tiny_run) == 3


# -- a config.json edited by hand since its checkpoint ---------------------------------------------


def _edit(run_dir, section, key, value) -> None:
    path = run_dir / runs.CONFIG
    raw = json.loads(path.read_text())
    raw[section][key] = value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "batch_size", 7),
        ("train", "objective", "free_bits"),
        ("data", "train_size", 60),
        ("model", "likelihood", "continuous_bernoulli"),
    ],
)
def test_resume_refuses_a_config_edited_since_its_checkpoint(tmp_path, one_thread, section, key, value):
    """Resume refused these as flags but took them from a hand-edited config.json, training epoch 2
    on other settings than epoch 1 (QA: a likelihood, batch size, objective, training subset)."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    _edit(run_dir, section, key, value)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match=f"has '{section}.{key}' = .* but the run's checkpoint was trained with"):
        pipeline.resume(run_dir, epochs=2, progress=False)
    assert snapshot(run_dir) == before
    if section == "train":  # scoring does not depend on how the weights were trained
        assert pipeline.load_run(run_dir).config.train.batch_size in (7, 50)
    else:  # the model or data a run is scored with is the one it was trained with
        with pytest.raises(RunDirError, match=f"'{section}.{key}'"):
            pipeline.load_run(run_dir)


def test_resume_flags_keep_config_and_checkpoint_in_step(tmp_path, one_thread):
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    pipeline.resume(run_dir, epochs=2, lr=1e-2, optimizer="adagrad", progress=False)
    pipeline.resume(run_dir, epochs=3, progress=False)  # the first resume's settings are the checkpoint's
    assert pipeline.load_run(run_dir).config.train.optimizer == "adagrad"
    _edit(run_dir, "train", "device", "cpu")  # where it runs may change, and where its data is
    _edit(run_dir, "data", "data_dir", str(tmp_path))
    assert pipeline.load_run(run_dir).config.data.data_dir == str(tmp_path)
    _edit(run_dir, "data", "data_dir", None)
    _edit(run_dir, "train", "epochs", 9)
    assert pipeline.resume(run_dir, progress=False).epochs_done == 9


def test_errors_from_config_json_name_the_file_and_its_setting_not_a_flag(tmp_path, one_thread):
    """Resume of a config.json holding optimizer 'Adam' or device 'gpu7' said "--optimizer must
    be ..." / "--device must be ...", flags the user never typed and resume refuses; evaluate read
    optimizer 'Adam' and ran."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    _edit(run_dir, "train", "optimizer", "Adam")
    for args in (["fit", "--resume", run_dir, "--epochs", "2", "--no-progress"], ["evaluate", run_dir, "-k", "2"]):
        line = one_line_error(invoke(*args), f"{run_dir / 'config.json'}: train.optimizer must be one of")
        assert "--optimizer" not in line
    _edit(run_dir, "train", "optimizer", "adam")
    _edit(run_dir, "train", "device", "gpu7")  # the device may differ from the checkpoint's, but must be one
    line = one_line_error(invoke("fit", "--resume", run_dir, "--epochs", "2", "--no-progress"), "train.device must be")
    assert "--device" not in line and str(run_dir / "config.json") in line


def test_a_new_optimizer_on_resume_drops_settings_only_the_old_one_took(tmp_path, one_thread):
    """A run made with --adam-eps could not change optimizer: "--adam-eps applies to optimizer
    'adam' or 'adamax' only", a flag the user could not drop. The record now drops it, saying so."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1, adam_eps=1e-4), run_dir, progress=False)
    with pytest.warns(UserWarning, match=r"optimizer 'sgd' does not take train.adam_eps 0.0001"):
        pipeline.resume(run_dir, epochs=2, optimizer="sgd", progress=False)
    config = runs.load_config(run_dir)
    assert config.train.optimizer == "sgd" and config.train.adam_eps == TrainConfig().adam_eps
    assert pipeline.resume(run_dir, epochs=3, progress=False).epochs_done == 3


def test_resume_may_move_a_run_to_another_device(tmp_path, one_thread):
    """A run made with --device cuda could not continue on a CPU-only machine: resume refused
    --device, and only a hand edit of config.json moved it."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1, device="auto"), run_dir, progress=False)
    result = invoke("fit", "--resume", run_dir, "--epochs", "2", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert runs.load_config(run_dir).train.device == "cpu"


def test_a_run_is_continued_by_one_process_at_a_time(tmp_path, one_thread):
    """QA: two `fit --resume` of one run at once both printed success and exited 0, and the one
    that finished first lost its epochs to the other's files. While one process continues a run,
    another resume (or animate) is refused in one line and writes nothing."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    before = snapshot(run_dir)
    import subprocess

    holder = subprocess.Popen(  # another process holding the run, as a resume of it does while it trains
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match="is being trained by another process") as refused:
            pipeline.resume(run_dir, epochs=2, progress=False)
        assert "\n" not in str(refused.value)
        line = one_line_error(invoke("fit", "--resume", run_dir, "--epochs", 2, "--no-progress"), "another process")
        assert str(run_dir) in line
        line = one_line_error(invoke("animate", run_dir, "--epochs", 2, "--no-progress"), "another process")
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    with runs.exclusive(run_dir):  # this process's own hold does not refuse its own resume
        assert pipeline.resume(run_dir, epochs=2, progress=False).epochs_done == 2
    assert pipeline.resume(run_dir, epochs=3, progress=False).epochs_done == 3  # free again once it ends


def _ppl_vae_with_file_limit(args, limit_bytes: int):
    """Run the ppl-vae CLI in a child process whose files may not grow beyond ``limit_bytes`` (a
    full disk, as RLIMIT_FSIZE makes one: writes fail with EFBIG, as they would with ENOSPC)."""
    import resource
    import subprocess

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", *map(str, args)],
        capture_output=True, text=True, preexec_fn=limit, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.parametrize("fails", ["history", "checkpoint"])
def test_a_full_disk_is_one_line_and_keeps_the_run(tmp_path, fails):
    """QA: a full disk while writing a netCDF file crashed the process (SIGSEGV after pages of h5py
    errors, sometimes with no 'Error:' line), and while writing a checkpoint printed safetensors'
    traceback. Files are now made in memory and written as bytes: one line naming the file, exit
    1, and the run as it was. The file limit comes from this run's own file sizes: below its
    history's (the history fails first), or between the history's and the larger checkpoint's."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    before = snapshot(run_dir)
    history, checkpoint = ((run_dir / name).stat().st_size for name in (runs.HISTORY, runs.CHECKPOINT))
    limit = history // 2 if fails == "history" else int(1.25 * history)
    if fails == "checkpoint" and not limit < checkpoint:
        pytest.skip(f"the history ({history} B) is not well below the checkpoint ({checkpoint} B) here")
    result = _ppl_vae_with_file_limit(["fit", "--resume", run_dir, "--epochs", 2, "--no-progress"], limit)
    lines = [line for line in (result.stdout + result.stderr).strip().splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, lines[-5:])
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("Error: cannot write ") and "File too large" in lines[-1], lines[-3:]
    written = runs.HISTORY if fails == "history" else runs.CHECKPOINT
    assert lines[-1].split(":")[1].strip().endswith(written), lines[-1]
    assert ".tmp" not in lines[-1]  # the file it asked for, not the temporary name
    assert snapshot(run_dir) == before
    evaluated = _ppl_vae_with_file_limit(["evaluate", run_dir, "-k", 2, "--num-datapoints", 400, "--no-progress"], 4096)
    err = [line for line in evaluated.stderr.strip().splitlines() if line.strip()]
    assert evaluated.returncode == 1 and len(err) == 1 and err[0].startswith("Error: cannot write "), err[-5:]
    assert snapshot(run_dir) == before and not (run_dir / "evaluation.nc").exists()


def test_json_nested_too_deeply_is_one_line_naming_the_file(tmp_path):
    """QA: a config.json, a checkpoint's metadata or an experiment's settings.json of 200,000 nested
    brackets gave a RecursionError traceback in every command (not a ValueError: it passed every
    handler)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ppl_vae.experiments.common import check_settings

    deep = "[" * 200_000 + "]" * 200_000
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    config = tmp_path / "config_deep"
    shutil.copytree(run_dir, config)
    (config / runs.CONFIG).write_text(deep)
    line = one_line_error(invoke("evaluate", config, "-k", 2, "--no-progress"), "nested too deeply")
    assert "config.json" in line
    meta = tmp_path / "meta_deep"
    shutil.copytree(run_dir, meta)
    path = meta / runs.CHECKPOINT
    save_file(load_file(str(path)), str(path), metadata={"ppl_vae": deep})
    line = one_line_error(invoke("evaluate", meta, "-k", 2, "--no-progress"), "nested too deeply")
    assert str(path) in line
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "settings.json").write_text(deep)
    with pytest.raises(ValueError, match=r"settings.json is damaged \(it is nested too deeply\)"):
        check_settings(tmp_path / "exp", small_config())


def test_an_interrupt_python_swallowed_stops_training_at_the_next_step(tmp_path, monkeypatch, one_thread):
    """QA: a Ctrl-C landing inside a weakref callback raised its KeyboardInterrupt where Python
    prints "Exception ignored" and goes on; the handler recorded it, but training ran all its
    epochs before the command exited 130. The recorded interrupt now stops it at the next step."""
    import contextlib

    from ppl_vae.cli import fit as fit_cli

    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)

    @contextlib.contextmanager
    def swallowed():
        yield [signal.SIGINT]  # recorded by the handler, its exception lost on the way

    monkeypatch.setattr(fit_cli, "_interrupts_are_never_lost", swallowed)
    result = invoke("fit", "--resume", run_dir, "--epochs", 40, "--no-progress")
    assert result.exit_code == 130, result.output
    assert runs.checkpoint_epoch(run_dir) == 1  # stopped at its first step, not after 39 epochs


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["extra"].update(data_info=5), "'extra.data_info' is 5, not a JSON object"),
        (lambda m: m["extra"].update(train_data=7), "'extra.train_data' is 7, not a JSON object"),
        (lambda m: m["extra"].update(event_shape="x"), "'extra.event_shape' is \"x\", not a list of positive"),
        (lambda m: m["optimizers"]["svi"]["param_groups"][0].update(lr="a"), "['lr'] = \"a\", not a number"),
        (lambda m: m["optimizers"]["svi"]["param_groups"][0].update(eps=None), "['eps'] = null, not a number"),
        (lambda m: m["optimizers"]["svi"]["param_groups"][0].update(betas=[2, 3, 4]), "['betas'] = [2, 3, 4], not a list of 2"),
        (lambda m: m["optimizers"]["svi"]["param_groups"][0].update(params=[0, 1, 2, 3, 4, 5, 6, "x"]), "not an integer"),
        (lambda m: m["optimizers"]["svi"].update(scalars={"optim.svi.0.step": "abc"}), "is \"abc\", not a number"),
    ],
)  # fmt: skip
def test_crafted_checkpoint_metadata_is_refused_in_one_line_before_training(tmp_path, edit, words):
    """QA: a checkpoint's metadata is plain JSON anyone sending a run can edit; such values gave
    tracebacks (TypeError in the model's builder, the split check, the learning-rate restore, the
    first fused Adam step) or messages naming a generator object."""
    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    rewrite_checkpoint(run_dir, lambda tensors, meta: edit(meta))
    before = snapshot(run_dir)
    line = one_line_error(invoke("fit", "--resume", run_dir, "--epochs", 2, "--no-progress"), words)
    assert "is damaged" in line and str(run_dir) in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda ds: ds.rename({"epoch": "ep"}), "it has no 'epoch' dimension"),
        (lambda ds: ds.assign(train_elbo=ds["train_elbo"].expand_dims(x=3)), "'train_elbo' has dimensions"),
        (lambda ds: ds.assign_coords(epoch=["a"]), "its epochs are"),
        (lambda ds: ds.assign(weird=("epoch", ["a"])), "'weird' holds"),
    ],
)
def test_a_damaged_history_is_one_line_on_resume(tmp_path, edit, words):
    """QA: a history.nc with its epoch dimension renamed, a variable with another dimension, or
    text where numbers belong failed with KeyError/TypeError tracebacks or "invalid literal"."""
    import xarray as xr

    run_dir = tmp_path / "r"
    pipeline.fit(small_config(epochs=1), run_dir, progress=False)
    path = run_dir / runs.HISTORY
    edited = edit(xr.load_dataset(path, engine="h5netcdf"))
    path.unlink()
    edited.to_netcdf(path, engine="h5netcdf")
    before = snapshot(run_dir)
    line = one_line_error(invoke("fit", "--resume", run_dir, "--epochs", 2, "--no-progress"), words)
    assert f"{path} is damaged" in line
    assert snapshot(run_dir) == before


def test_a_failed_netcdf_read_leaves_no_exception_ignored_noise(monkeypatch):
    """QA: a damaged history.nc printed "Exception ignored ... 'File' object has no attribute
    '_writable'" under the one-line error: the half-opened h5py File, held by the failed call's
    frames, complained when collected. Those frames are now freed with h5py's noise dropped."""

    class HalfOpened:  # as h5py's File whose constructor failed half-way
        def __del__(self):
            raise AttributeError("'File' object has no attribute '_writable'")

    HalfOpened.__del__.__module__ = "h5py._hl.files"  # what "Exception ignored in" names

    def read():
        half = HalfOpened()  # noqa: F841  # held by this frame, which the error keeps alive
        raise OSError("Unable to synchronously open file (bad object header)")

    ignored = unraisable(monkeypatch)
    with pytest.raises(OSError, match="bad object header"):
        runs._interruptible(read, errors_too=True)
    import gc

    gc.collect()
    assert ignored == []
    # a write's unexpected error keeps its traceback (review: every error's frames were dropped)

    def failing_write():
        raise ZeroDivisionError("a bug inside the writer")

    with pytest.raises(ZeroDivisionError) as info:
        runs._interruptible(failing_write)
    assert any(entry.name == "failing_write" for entry in info.traceback)


def test_a_run_whose_schedule_sets_sgd_momentum_resumes(tmp_path, one_thread):
    """QA review: the optimizer-state check compared kinds strictly, so SGD's momentum, an int (0)
    in a fresh optimizer and a float once CyclicLR cycles it, refused a valid run as damaged."""
    run_dir = tmp_path / "r"
    config = small_config(
        epochs=1, optimizer="sgd", lr=0.01, lr_schedule="CyclicLR",
        lr_schedule_options={"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 2},
    )  # fmt: skip
    pipeline.fit(config, run_dir, progress=False)
    assert pipeline.resume(run_dir, epochs=2, progress=False).epochs_done == 2
