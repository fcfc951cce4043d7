"""A run directory is data a user may receive: reading it runs no code, and no output replaces
its files or goes through a symlink that leaves it (issue 20, part 1)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from ppl_vae import io, pipeline, plugins
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests.conftest import drop_checkpoint_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """An initialised (epoch-0) tiny run: enough for evaluate, anomaly and compare to read it."""
    out = tmp_path_factory.mktemp("trust") / "run"
    config = RunConfig(
        model=ModelConfig(model="gaussian_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", train_size=100),
        train=TrainConfig(epochs=0, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, out, progress=False)
    return out


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def name_plugin(run_dir, names):
    config = json.loads((run_dir / "config.json").read_text())
    config["plugins"] = names
    (run_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A module placed beside the run, importable as with PYTHONPATH=. ; importing it leaves a marker."""
    marker = tmp_path / "ran"
    (tmp_path / "beside_run.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(plugins._LOADED, "beside_run", raising=False)
    yield marker
    import sys

    sys.modules.pop("beside_run", None)
    plugins._LOADED.pop("beside_run", None)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_received_run_does_not_import_a_module_beside_it(run, planted):
    name_plugin(run, ["beside_run"])
    result = invoke("evaluate", run, "-k", 2, "--num-datapoints", 2, "--no-progress")
    assert result.exit_code == 1
    assert not planted.exists()
    message = result.stderr.strip()
    assert message.startswith("Error: ") and "\n" not in message
    assert "--plugin beside_run" in message and "--trust-plugins" in message


@pytest.mark.parametrize("flags", [["--plugin", "beside_run"], ["--trust-plugins"]])
def test_a_plugin_the_user_names_or_trusts_is_imported(run, planted, flags):
    name_plugin(run, ["beside_run"])
    result = invoke(
        *flags, "evaluate", run, "-k", 2, "--num-datapoints", 2, "--no-progress", "--out", run.parent / "eval"
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert planted.exists()


def test_trust_flag_does_not_stay_on_after_the_command(run, planted):
    name_plugin(run, ["beside_run"])
    invoke("--trust-plugins", "models")
    assert plugins.trust_all() is False
    with pytest.raises(plugins.PluginError, match="--plugin beside_run"):
        pipeline.load_run(run)
    assert not planted.exists()


@pytest.mark.parametrize("name", ["sys:exit", "code:interact", "os:system", "a b", "../x", "mod.", ""])
def test_entry_point_syntax_in_a_config_runs_nothing(run, name):
    # "sys:exit" made evaluate exit 0 having done nothing; "code:interact" opened a prompt
    name_plugin(run, [name])
    for flags in ([], ["--trust-plugins"]):
        result = CliRunner().invoke(
            cli, [*flags, "evaluate", str(run), "-k", "2", "--num-datapoints", "2", "--no-progress"], input=""
        )
        assert result.exit_code == 1, (name, flags, result.output)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_a_file_name_as_a_plugin_imports_nothing_even_trusted(run, planted):
    """QA: "beside_run.py" in config.json is a dotted name (package beside_run, module py): under
    --trust-plugins it imported beside_run, ran its code, then said it "cannot be imported"."""
    name_plugin(run, ["beside_run.py"])
    for flags in ([], ["--trust-plugins"]):
        result = invoke(*flags, "evaluate", run, "-k", 2, "--num-datapoints", 2, "--no-progress")
        assert result.exit_code == 1 and not planted.exists(), (flags, result.output)
        assert result.stderr.count("\n") == 1 and "got the file name 'beside_run.py': use 'beside_run'" in result.stderr


def test_fit_resume_of_a_received_run_imports_nothing(run, planted):
    name_plugin(run, ["beside_run"])
    result = invoke("fit", "--resume", run, "--epochs", 1, "--no-progress")
    assert result.exit_code == 1 and "--plugin beside_run" in result.stderr
    assert not planted.exists()
    assert "beside_run" in (run / "config.json").read_text()  # and the config is as it was


def test_compare_refuses_to_write_through_a_symlink_leaving_the_run(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.html").write_text("precious")
    os.symlink(elsewhere, run / "multirun")
    result = invoke("compare", run, run, "--num-datapoints", 2, "--num-samples", 2, "--mf-steps", 2, "--no-progress")
    assert result.exit_code == 1, result.output
    assert "symlink" in result.stderr and result.stderr.count("\n") == 1
    assert ".probe" not in result.stderr  # the folder is named, not the file that probed it
    assert (elsewhere / "report.html").read_text() == "precious"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["report.html"]


def test_io_refuses_a_symlinked_folder_below_a_run_directory(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "samples")
    with pytest.raises(ValueError, match="symlink that leads out of the run directory"):
        io.write_text(run / "samples" / "x.txt", "x")
    assert list(elsewhere.iterdir()) == []
    # a symlink to the run directory itself is the user's own choice of path: allowed
    os.symlink(run, tmp_path / "alias")
    io.write_text(tmp_path / "alias" / "notes.txt", "ok")
    assert (run / "notes.txt").read_text() == "ok"


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "history.nc", "config.json", "checkpoint-best.safetensors"])
def test_anomaly_out_never_replaces_a_run_file(run, name):
    target = run / name
    before = target.read_bytes() if target.exists() else None
    result = invoke("anomaly", run, "--out", target, "--num-samples", 1, "--normal-class", 0, "--no-progress")
    assert result.exit_code == 1
    assert "run directory's own files" in result.stderr and result.stderr.count("\n") == 1
    assert (target.read_bytes() if target.exists() else None) == before


def test_the_run_layer_still_writes_its_own_files(run):
    with pytest.raises(ValueError, match="own files"):
        io.write_text(run / "config.json", "{}")
    before = (run / "config.json").read_text()
    io.write_text(run / "config.json", before, run_files=True)
    assert pipeline.load_run(run).epochs_done == 0


def test_text_on_a_config_naming_another_folder_reads_none_of_its_files(tmp_path):
    # a received config with dataset fortunes, data_dir /etc read every regular file there
    (tmp_path / "lines.txt").write_text("\n".join(f"sentence number {i}" for i in range(20)) + "\n")
    config = RunConfig(
        model=ModelConfig(model="text_hybrid", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="text-lines", data_dir=str(tmp_path / "lines.txt")),
        train=TrainConfig(epochs=0, batch_size=10, device="cpu"),
    )
    run_dir = tmp_path / "text"
    pipeline.fit(config, run_dir, progress=False)
    secrets = tmp_path / "etc"
    secrets.mkdir()
    (secrets / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n%\nroot2\n")
    raw = json.loads((run_dir / "config.json").read_text())
    raw["data"].update(dataset="fortunes", data_dir=str(secrets))
    (run_dir / "config.json").write_text(json.dumps(raw))
    result = invoke("text", run_dir, "--num-samples", 1, "--samples", 0)
    assert result.exit_code == 1  # the edit itself is refused: the checkpoint was trained on text-lines
    assert "has 'data.dataset' = \"fortunes\"" in result.stderr and "/bin/bash" not in result.output
    drop_checkpoint_config(run_dir)  # a run from before checkpoints kept their config
    result = invoke("text", run_dir, "--num-samples", 1, "--samples", 0)
    assert result.exit_code == 1
    assert "no fortune files" in result.stderr and "/bin/bash" not in result.output
