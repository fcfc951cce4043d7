"""The run layer (pipeline, runs, training loop, io): one test per bug that issue 10 reported,
each failing before the fix, plus the structure it promised (no import cycle, one loop)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ppl_vae
from ppl_vae import io, pipeline, runs
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.errors import ConfigError, RunDirError
from tests.conftest import drop_checkpoint_config, one_line_error


def small_config(**train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=16),
        data=DataConfig(train_size=200, binarize="threshold"),
        train=TrainConfig(**{"epochs": 2, "batch_size": 50, "device": "cpu", **train}),
    )


# -- structure -------------------------------------------------------------------------------------


# The import structure (no cycle, layers) is checked in tests/test_layers.py.


def test_the_experiments_train_through_the_one_loop(monkeypatch):
    """experiments/common.py had a second loop (batches with replacement, CPU only, silent NaN stop)."""
    from ppl_vae.experiments import common
    from ppl_vae.inference import training

    calls = []
    real = training.train
    monkeypatch.setattr(common, "train", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    data = ppl_vae.load_dataset("digits", binarize="threshold", train_size=200)
    vae = common.build_model("digits", data, 2, 8)
    records = common.train_curve(
        vae,
        data,
        "svi",
        max_samples=400,
        batch_size=50,
        lr=0.01,
        optimizer="adagrad",
        num_evals=3,
        evaluate=common.elbo_evaluator(data, 50),
        progress=False,
        device="cpu",
    )
    assert len(calls) == 1 and calls[0].method == "svi"
    assert [r["num_train_samples"] for r in records] == [0.0, 50.0, 150.0, 400.0]


def test_a_diverging_experiment_curve_warns_instead_of_stopping_silently():
    from ppl_vae.experiments import common

    data = ppl_vae.load_dataset("digits", binarize="threshold", train_size=100)
    vae = common.build_model("digits", data, 2, 8)
    with torch.no_grad():
        vae.decoder.net[-1].bias.fill_(float("nan"))
    with pytest.warns(UserWarning, match="training diverged .*loss became nan"):
        records = common.train_curve(
            vae,
            data,
            "svi",
            max_samples=200,
            batch_size=50,
            lr=0.01,
            optimizer="adagrad",
            num_evals=2,
            evaluate=lambda v: {"test": 0.0},
            progress=False,
            device="cpu",
            evaluate_at_start=False,
        )
    assert records == []


# -- bugs of issue 10 ------------------------------------------------------------------------------


def test_anomaly_prepares_another_dataset_like_the_runs_training_data(tmp_path):
    """`ppl-vae anomaly --dataset ...` rebuilt the data without the run's --binarize/--train-size
    (AUROC 0.70 -> 0.36 on a thresholded run): the scores must equal those of the run's own data."""
    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=1), run_dir, progress=False)
    runner = CliRunner()
    own = runner.invoke(
        cli, ["anomaly", str(run_dir), "--no-progress", "--normal-class", "3", "--out", str(tmp_path / "own.nc")]
    )
    other = runner.invoke(
        cli,
        [
            "anomaly",
            str(run_dir),
            "--dataset",
            "digits",
            "--no-progress",
            "--normal-class",
            "3",
            "--out",
            str(tmp_path / "other.nc"),
        ],
    )
    assert own.exit_code == 0 and other.exit_code == 0, own.output + other.output
    import xarray as xr

    a, b = xr.load_dataset(tmp_path / "own.nc"), xr.load_dataset(tmp_path / "other.nc")
    assert a.attrs["auroc"] == pytest.approx(b.attrs["auroc"])
    assert (a.score == b.score).all()


def test_anomaly_refuses_a_normal_class_the_data_does_not_have(tmp_path):
    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=1), run_dir, progress=False)
    result = CliRunner().invoke(cli, ["anomaly", str(run_dir), "--normal-class", "11", "--no-progress"])
    one_line_error(result, "--normal-class 11 is not one of the data's classes (0..9)")


def test_anomaly_of_class_labelled_data_scores_it_and_says_how_to_get_auroc(tmp_path, monkeypatch):
    """Without --normal-class the digits' class labels failed the command after every datapoint
    was scored ("labels must be 0 or 1"): it now writes the scores, equal to those with
    --normal-class, and says which flag gives AUROC. The library refuses such labels before scoring."""
    from ppl_vae.analysis import anomaly

    run_dir = tmp_path / "run"
    run = ppl_vae.fit(small_config(epochs=1), run_dir, progress=False)
    result = CliRunner().invoke(cli, ["anomaly", str(run_dir), "--no-progress", "--out", str(tmp_path / "s.nc")])
    assert result.exit_code == 0, result.output
    assert "digits has class labels: --normal-class C gives AUROC and AUPRC" in result.output
    assert "an upper bound on -log p(x)" in result.output  # what neg_elbo is
    labelled = CliRunner().invoke(
        cli, ["anomaly", str(run_dir), "--no-progress", "--normal-class", "3", "--out", str(tmp_path / "c.nc")]
    )
    assert labelled.exit_code == 0, labelled.output
    import xarray as xr

    plain, with_class = xr.load_dataset(tmp_path / "s.nc"), xr.load_dataset(tmp_path / "c.nc")
    assert "auroc" not in plain.attrs and "label" not in plain and "auroc" in with_class.attrs
    assert (plain.score == with_class.score).all()
    scored = []
    monkeypatch.setattr(anomaly, "anomaly_scores", lambda *a, **k: scored.append(1))
    with pytest.raises(ValueError, match="for class labels pass normal_class"):
        anomaly.score_dataset(run.vae, torch.zeros(3, 1, 8, 8), torch.tensor([0, 3, 1]))
    assert not scored  # refused before any datapoint was scored


def test_stale_temp_files_removed_by_two_processes_at_once_are_no_error(tmp_path, monkeypatch):
    """Ctrl-C during `fit --nproc 2` left a temp file; both ranks removed it on resume and one
    failed. Now only the deciding process cleans, and cleaning tolerates a file already gone."""
    gone = tmp_path / ".checkpoint.safetensors.abc12_yz.tmp"
    gone.write_bytes(b"x")
    real_glob = Path.glob

    def glob_then_other_process_removes(self, pattern):
        found = list(real_glob(self, pattern))
        gone.unlink()  # the other rank was faster
        return found

    monkeypatch.setattr(Path, "glob", glob_then_other_process_removes)
    assert io.remove_stale_temp_files(tmp_path) == []  # gone before this process looked: skipped, no error


def test_cleaning_removes_only_this_librarys_temporary_files(tmp_path):
    """QA: every hidden '*.tmp' in a run folder was deleted on resume, a user's '.notes.tmp' and
    links of such names included; only atomic_path's own '.NAME.XXXXXXXX.tmp' files go."""
    ours = tmp_path / ".history.nc.k3j_9x2a.tmp"
    ours.write_bytes(b"half a history")
    users = tmp_path / ".notes.tmp"
    users.write_text("user data")
    outside = tmp_path / "outside.tmp"
    outside.write_text("keep")
    link = tmp_path / ".report.html.abcdefgh.tmp"
    link.symlink_to(outside)
    with io.atomic_path(tmp_path / "evaluation.nc") as tmp:  # the name the writer really gives
        assert io._TEMP_NAME.match(tmp.name), tmp.name
        tmp.write_bytes(b"x")
    assert io.remove_stale_temp_files(tmp_path) == [ours]
    assert not ours.exists() and users.read_text() == "user data" and link.is_symlink() and outside.exists()


def test_resume_cleans_stale_temp_files_in_the_deciding_process_only(tmp_path, monkeypatch):
    from ppl_vae import pipeline

    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=1), run_dir, progress=False)
    stale = run_dir / ".checkpoint.safetensors.x1y2_3z4.tmp"
    stale.write_bytes(b"half a checkpoint")
    cleaned = []
    real = runs.remove_stale_temp_files
    monkeypatch.setattr(runs, "remove_stale_temp_files", lambda d: cleaned.append(d) or real(d))
    run = pipeline.resume(run_dir, epochs=2, progress=False)
    assert run.epochs_done == 2 and not stale.exists() and cleaned == [run_dir]
    # a rank under torchrun leaves the cleaning to the process that launched it
    monkeypatch.setattr(pipeline.distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(pipeline, "execute", lambda job, world, prepared: job)
    monkeypatch.setattr(pipeline.distributed, "env_world_size", lambda: 2)
    stale.write_bytes(b"another")
    pipeline.resume(run_dir, epochs=3, progress=False)
    assert stale.exists() and cleaned == [run_dir]


def test_a_run_interrupted_before_its_first_checkpoint_leaves_nothing_behind(tmp_path, monkeypatch):
    real = runs.save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ppl_vae.fit(small_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(runs, "save", real)
    assert ppl_vae.fit(small_config(), tmp_path / "run", progress=False).epochs_done == 2


@pytest.mark.parametrize("failing", ["Checkpointer", "_check_labelled_split"])
def test_a_failure_between_config_json_and_training_leaves_nothing_behind(tmp_path, monkeypatch, failing):
    """QA: an error after config.json was written but before the training loop (the checkpointer's
    set-up, the label metrics, a resume's checks) left a folder holding only config.json."""

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    target = runs if failing == "Checkpointer" else pipeline
    monkeypatch.setattr(target, failing, broken)
    if failing == "_check_labelled_split":  # read on resumes only: resume a run made just now
        monkeypatch.undo()
        ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)
        before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
        monkeypatch.setattr(target, failing, broken)
        with pytest.raises(RuntimeError, match="broken on purpose"):
            ppl_vae.resume(tmp_path / "run", epochs=2, progress=False)
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # as it was
        return
    with pytest.raises(RuntimeError, match="broken on purpose"):
        ppl_vae.fit(small_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_model_registered_for_fit_must_build_a_vae(tmp_path, monkeypatch):
    """QA: a hand-written Pyro pair registered as a model crashed fit with one AttributeError after
    another (prior, likelihood, label_metrics, latent_dim); fit now says what --model takes."""
    import dataclasses

    from ppl_vae.models.zoo import MODELS

    class Pair(torch.nn.Module):
        def model(self, x, y=None, num_data=None, kl_weight=1.0): ...

        def guide(self, x, y=None, num_data=None, kl_weight=1.0): ...

    spec = dataclasses.replace(MODELS.get("bernoulli_mlp"), build=lambda *a, **k: Pair())
    monkeypatch.setitem(MODELS._entries, "pair", spec)
    config = small_config()
    config.model.model = "pair"
    with pytest.raises(ValueError) as caught:
        ppl_vae.fit(config, tmp_path / "run", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "model 'pair' built a Pair, not a ppl_vae.models.VAE" in message
    assert "ppl_vae.inference.train" in message
    assert not (tmp_path / "run").exists()


def test_a_folder_with_only_a_config_can_be_resumed_and_reused(tmp_path):
    """A run killed between writing config.json and its first checkpoint (SIGKILL: no cleanup)."""
    straight = ppl_vae.fit(small_config(), tmp_path / "straight", progress=False)
    for name in ("resumed", "reused"):
        (tmp_path / name).mkdir()
        runs.save_config(tmp_path / name, small_config())
    resumed = ppl_vae.resume(tmp_path / "resumed", progress=False)
    reused = ppl_vae.fit(small_config(), tmp_path / "reused", progress=False)
    for run in (resumed, reused):
        assert run.history.epoch.values.tolist() == [1, 2]
        assert run.final["test_elbo"] == pytest.approx(straight.final["test_elbo"], abs=1e-6)


def test_a_method_refusing_the_model_is_refused_before_the_folder_is_created(tmp_path):
    """`--method mcem --latent-dim 30` failed after config.json was written."""
    result = CliRunner().invoke(
        cli,
        [
            "fit",
            "--method",
            "mcem",
            "--latent-dim",
            "30",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    one_line_error(result, "latent")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"foo": 1}', "unknown key(s): foo"),
        ('{"model": {}, "data": {}, "train": {"lr": "fast"}}', "train.lr must be a finite number"),
    ],
)
def test_a_replaced_config_is_refused_by_every_command_and_not_rewritten(tmp_path, text, message):
    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=1), run_dir, progress=False)
    (run_dir / "config.json").write_text(text)
    for call in (lambda: ppl_vae.load_run(run_dir), lambda: ppl_vae.resume(run_dir, epochs=3, progress=False)):
        with pytest.raises(RunDirError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    runner = CliRunner()
    for args in (
        ["fit", "--resume", str(run_dir), "--epochs", "3"],
        ["evaluate", str(run_dir)],
        ["compare", str(run_dir)],
        ["generate", str(run_dir)],
    ):
        one_line_error(runner.invoke(cli, args), "config.json")
    assert (run_dir / "config.json").read_text() == text


def test_a_deleted_history_is_an_error_not_a_silent_restart(tmp_path):
    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=2), run_dir, progress=False)
    (run_dir / "history.nc").unlink()
    with pytest.raises(RunDirError, match="checkpoint from epoch 2 but no history.nc"):
        ppl_vae.resume(run_dir, epochs=3, progress=False)


def test_resume_to_fewer_epochs_than_done_is_refused_and_a_complete_run_says_so(tmp_path):
    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=2), run_dir, progress=False)
    with pytest.raises(ConfigError, match=r"train.epochs \(1\) must be more than the 2 epochs"):
        ppl_vae.resume(run_dir, epochs=1, progress=False)
    runner = CliRunner()
    one_line_error(
        runner.invoke(cli, ["fit", "--resume", str(run_dir), "--epochs", "2"]),
        "--epochs (2) must be more than the 2 epochs",
    )
    done = runner.invoke(cli, ["fit", "--resume", str(run_dir)])
    assert done.exit_code == 0 and "nothing to do" in done.output and "2 of 2 epochs" in done.output


def test_cli_errors_name_flags_and_library_errors_name_fields(tmp_path):
    runner = CliRunner()
    line = one_line_error(runner.invoke(cli, ["fit", "--lr", "-1", "--out", str(tmp_path / "r")]))
    assert line == "Error: --lr must be a positive number, got -1.0"
    with pytest.raises(ConfigError, match=r"^train.lr must be a positive number") as info:
        ppl_vae.fit(small_config(lr=-1.0), tmp_path / "r", progress=False)
    assert info.value.field == "train.lr"
    assert not (tmp_path / "r").exists()
    # --epochs 0 printed NaN ELBOs; it keeps the initialised model and says so
    zero = runner.invoke(cli, ["fit", "--epochs", "0", "--out", str(tmp_path / "r"), "--train-size", "100"])
    assert zero.exit_code == 0 and "nan" not in zero.output.lower() and "no training step" in zero.output
    assert runs.checkpoint_epoch(tmp_path / "r") == 0


def test_out_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile.txt").write_text("x")
    result = CliRunner().invoke(cli, ["fit", "--epochs", "1", "--out", str(tmp_path / "afile.txt" / "run")])
    one_line_error(result, "afile.txt is a file, not a folder")


def test_a_checkpoint_that_does_not_fit_says_what_differs(tmp_path):
    run_dir = tmp_path / "run"
    ppl_vae.fit(small_config(epochs=1), run_dir, progress=False)
    config = runs.load_config(run_dir)
    config.model.hidden_dim = 17
    runs.save_config(run_dir, config)
    with pytest.raises(RunDirError, match="has 'model.hidden_dim' = 17 but the run's checkpoint was trained with 16"):
        ppl_vae.load_run(run_dir)
    drop_checkpoint_config(run_dir)  # a checkpoint written before it kept its config: the shapes say what differs
    with pytest.raises(
        RunDirError,
        match=r"do not fit the model .* of other shape \(saved vs model\): "
        r"decoder\.net\.0\.bias \(16,\) vs \(17,\)",
    ):
        ppl_vae.load_run(run_dir)


def test_train_elbo_uses_a_fixed_subset_and_the_test_set_in_full(tmp_path):
    from ppl_vae.inference.training import train_eval_set

    data = ppl_vae.load_dataset("digits", binarize="dynamic", train_size=300)
    config = TrainConfig(train_eval_size=100, seed=4)
    x1, y1 = train_eval_set(data, config)
    x2, _ = train_eval_set(data, config)
    assert x1.shape[0] == 100 and torch.equal(x1, x2)  # fixed: the same points and binarization each epoch
    assert set(x1.unique().tolist()) <= {0.0, 1.0}  # binarized like the training batches
    assert y1 is not None and y1.shape == (100,)
    everything, _ = train_eval_set(ppl_vae.load_dataset("digits", train_size=300), TrainConfig(train_eval_size=None))
    assert everything.shape[0] == 300


@pytest.mark.slow
def test_sample_grids_are_written_by_a_two_process_run(tmp_path):
    """`ppl-vae fit --sample-grids --nproc 2` wrote no samples: the grids now go to rank 0."""
    from ppl_vae import pipeline

    run = pipeline.fit(
        small_config(epochs=2), tmp_path / "run", nproc=2, progress=False, sample_grids=True, timeout_s=120
    )
    frames = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert frames == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    assert (tmp_path / "run" / "samples.gif").is_file() and run.epochs_done == 2


def test_a_new_run_inside_another_run_is_refused(tmp_path):
    """`fit --out RUN/sub` made a run inside another run's folder; a folder that merely holds a
    config.json of some other tool is no run (it has no checkpoint) and may hold runs."""
    ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match=r"cannot create .*sub inside the run directory .*run: give a folder outside"):
        ppl_vae.fit(small_config(epochs=1), tmp_path / "run" / "a" / "sub", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.safetensors",
        "config.json",
        "history.nc",
    ]
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    ppl_vae.fit(small_config(epochs=1), project / "runs" / "a", progress=False)


def test_the_train_split_of_a_run_is_the_points_it_trained_on(tmp_path):
    """evaluate --split train scored the validation hold-out as training data ("mean over 100
    train datapoints" where 50 were held out for validation)."""
    from ppl_vae.inference.training import validation_split
    from ppl_vae.reports.common import select_datapoints

    config = small_config(epochs=1)
    config.data.train_size = 100
    config.train.val_fraction = 0.5
    run = ppl_vae.fit(config, tmp_path / "run", progress=False)
    trained, held_out = validation_split(100, run.config.train)
    sel = select_datapoints(run, "train")
    assert sel.index.tolist() == trained.tolist() and not set(sel.index.tolist()) & set(held_out.tolist())
    some = select_datapoints(run, "train", 10, seed=3)
    assert len(some.index) == 10 and set(some.index.tolist()) <= set(trained.tolist())


def test_scoring_refuses_test_data_replaced_since_the_run_was_trained(tmp_path):
    """evaluate scored 100 other points under a run's name after its test files were replaced:
    the checkpoint now records its test split's fingerprint (shape and a hash of its rows)."""
    import numpy as np

    from ppl_vae.data.datasets import fingerprint
    from ppl_vae.reports.common import select_datapoints

    path = tmp_path / "a.npy"
    np.save(path, np.random.default_rng(0).random((300, 6)).astype(np.float32))
    config = RunConfig(
        model=ModelConfig(model="gaussian_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset=str(path)),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    ppl_vae.fit(config, tmp_path / "run", progress=False)
    run = ppl_vae.load_run(tmp_path / "run", history=False)
    assert run.test_data == fingerprint(pipeline.load_data(run.config).test) and run.test_data["shape"] == [60, 6]
    assert len(select_datapoints(run, "test").index) == 60
    np.save(path, np.random.default_rng(1).random((300, 6)).astype(np.float32))  # same shape, other values
    with pytest.raises(ValueError, match="is not what .*run was trained with: it has test points of other values"):
        select_datapoints(run, "test")
    np.save(path, np.random.default_rng(0).random((500, 6)).astype(np.float32))
    with pytest.raises(ValueError, match="it has 100 test points where it recorded 60"):
        select_datapoints(run, "test")


def test_another_dataset_is_read_from_its_own_place_not_the_runs_folder():
    """The run's data_dir holds the run's data set: `anomaly RUN --dataset fashion-mnist` on an
    MNIST run scored the run's MNIST files (whose names Fashion-MNIST shares) as Fashion-MNIST."""
    config = RunConfig(data=DataConfig(dataset="mnist", data_dir="/data/mnist"))
    other = pipeline.data_config(config, dataset="fashion-mnist")
    assert other.dataset == "fashion-mnist" and other.data_dir is None  # its own default folder
    assert pipeline.data_config(config, dataset="mnist").data_dir == "/data/mnist"  # the same data set
    given = pipeline.data_config(config, dataset="fashion-mnist", data_dir="/data/fashion")
    assert given.data_dir == "/data/fashion"
    assert pipeline.data_config(config, data_dir="/elsewhere").dataset == "mnist"


def test_a_resume_refuses_data_replaced_since_and_leaves_the_run_alone(tmp_path):
    """`fit --resume` trained on replaced files and recorded the new test split's fingerprint, so
    evaluate stopped noticing: a resume now checks both splits against the checkpoint's record."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    train, test = rng.random((200, 6)).astype(np.float32), rng.random((50, 6)).astype(np.float32)
    np.savez(path, train=train, test=test)
    config = RunConfig(
        model=ModelConfig(model="gaussian_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset=str(path)),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    run_dir = tmp_path / "run"
    ppl_vae.fit(config, run_dir, progress=False)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    np.savez(path, train=train[::-1].copy(), test=test)  # the training split alone changed
    with pytest.raises(ValueError, match="the training data of d.npz is not what .*run was trained with"):
        pipeline.resume(run_dir, epochs=2, progress=False)
    np.savez(path, train=train, test=test[:40])
    with pytest.raises(ValueError, match="it has 40 test points where it recorded 50"):
        pipeline.resume(run_dir, epochs=2, progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    np.savez(path, train=train, test=test)  # the files it was trained with: it continues
    assert pipeline.resume(run_dir, epochs=2, progress=False).epochs_done == 2


def test_every_command_reading_a_runs_own_data_refuses_replaced_files(tmp_path):
    """calibrate, evaluate and compare refused test files replaced since training; anomaly,
    inpaint and generate --traverse scored them under the run's name, and the training split was
    never checked (evaluate --split train)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    train, test = rng.random((200, 1, 4, 4)).astype(np.float32), rng.random((50, 1, 4, 4)).astype(np.float32)
    np.savez(path, train=train, test=test)
    run = tmp_path / "run"
    fit = ["fit", "--dataset", str(path), "--epochs", "1", "--latent-dim", "2", "--hidden-dim", "8"]
    assert CliRunner().invoke(cli, [*fit, "--out", str(run), "--no-progress"]).exit_code == 0
    commands = {
        "anomaly": ["anomaly", str(run), "--num-samples", "1", "--no-progress"],
        "inpaint": ["inpaint", str(run), "--num-samples", "4", "--num-images", "1", "--out", str(tmp_path / "i.png")],
        "traverse": ["generate", str(run), "--traverse", "--out", str(tmp_path / "t.png")],
    }
    for name, args in commands.items():  # the files it was trained with: accepted
        assert CliRunner().invoke(cli, args).exit_code == 0, name
    np.savez(path, train=train, test=test[::-1].copy())
    for name, args in commands.items():
        line = one_line_error(CliRunner().invoke(cli, args))
        assert "the test data of d.npz is not what" in line, (name, line)
    np.savez(path, train=train[::-1].copy(), test=test)
    evaluate = ["evaluate", str(run), "--split", "train", "-k", "2", "--no-progress", "--out", str(tmp_path / "e")]
    assert "the training data of d.npz is not what" in one_line_error(CliRunner().invoke(cli, evaluate))


def test_replaced_labels_are_other_data_for_a_run_too(tmp_path):
    """A cvae run (scored as log p(x | y)) was evaluated with a replaced test-labels file under its
    name: the fingerprints now cover the labels where a split has them."""
    import numpy as np

    from ppl_vae.reports.common import select_datapoints

    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    arrays = dict(
        train=rng.random((120, 6)).astype(np.float32),
        test=rng.random((40, 6)).astype(np.float32),
        train_labels=rng.integers(0, 3, 120),
        test_labels=rng.integers(0, 3, 40),
    )
    np.savez(path, **arrays)
    config = RunConfig(
        model=ModelConfig(model="cvae", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset=str(path)),
        train=TrainConfig(epochs=1, batch_size=40, device="cpu"),
    )
    ppl_vae.fit(config, tmp_path / "run", progress=False)
    run = ppl_vae.load_run(tmp_path / "run", history=False)
    assert len(select_datapoints(run, "test").index) == 40
    np.savez(path, **{**arrays, "test_labels": (arrays["test_labels"] + 1) % 3})  # every label shifted
    with pytest.raises(ValueError, match="it has other test labels"):
        select_datapoints(run, "test")
    np.savez(path, **{**arrays, "train_labels": arrays["train_labels"][::-1].copy()})
    with pytest.raises(ValueError, match="the training data of d.npz .* it has other training labels"):
        pipeline.resume(tmp_path / "run", epochs=2, progress=False)
