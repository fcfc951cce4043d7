"""Inputs a new user gets wrong: each ends in one ``Error: ...`` line (or a ``Warning:``), with
the exit code the README gives, and never a traceback."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae.cli.main import EXIT_ERROR, EXIT_INTERRUPTED, memory_message
from ppl_vae.errors import DataError
from ppl_vae.models.likelihoods import LIKELIHOODS, DataRangeWarning, make_likelihood
from tests.conftest import invoke, one_line_error

SMALL = ["--hidden-dim", "8", "--latent-dim", "2", "--train-size", "100", "--no-progress"]
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny bernoulli_mlp run on the embedded digits (359 test images)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("fit", "--model", "bernoulli_mlp", "--epochs", "1", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def test_huge_latent_dim_is_a_memory_error_naming_the_size(tmp_path):
    # 10^12 x 8 float32 weights: 32 TB, more than any machine's memory or address space allows
    out = tmp_path / "run"
    result = invoke("fit", "--latent-dim", "1000000000000", "--epochs", "1", "--out", out, *SMALL[:2], "--no-progress")
    line = one_line_error(result, "not enough memory")
    assert result.exit_code == EXIT_ERROR
    assert re.search(r"allocation of [\d.e+]+ GB failed", line), line
    assert "--latent-dim" in line
    assert not out.exists()


def test_memory_message_reads_cpu_and_cuda_allocation_errors():
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 160000000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert "allocation of 160 GB failed on this machine" in memory_message(cpu)
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"
    )
    assert "allocation of 20.00 GiB failed on the GPU" in memory_message(cuda)
    assert memory_message(MemoryError()).startswith("not enough memory")
    assert memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_zero_d_npy_is_refused(tmp_path):
    path = tmp_path / "scalar.npy"
    np.save(path, np.array(3.0))
    one_line_error(
        invoke("fit", "--dataset", path, "--epochs", "1", "--out", tmp_path / "run", "--no-progress"),
        "holds a single number (a 0-d array)",
    )
    assert not (tmp_path / "run").exists()


def test_text_named_npy_is_not_read_as_a_pickle(tmp_path):
    path = tmp_path / "table.npy"
    path.write_text("1,2,3\n4,5,6\n")
    line = one_line_error(
        invoke("fit", "--dataset", path, "--epochs", "1", "--out", tmp_path / "run", "--no-progress"),
        "is not a NumPy .npy file",
    )
    assert "pickle" not in line and ".csv" in line


def test_object_npy_is_refused_without_advice_to_unpickle(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    line = one_line_error(
        invoke("fit", "--dataset", path, "--epochs", "1", "--out", tmp_path / "run", "--no-progress"),
        "holds Python objects",
    )
    assert "allow_pickle" not in line


def test_usage_errors_exit_2_and_the_readme_says_so():
    result = invoke("fit", "--no-such-option")
    assert result.exit_code == 2 and "No such option" in result.output and "Traceback" not in result.output
    assert invoke("no-such-command").exit_code == 2
    assert invoke("fit", "--epochs", "many").exit_code == 2
    text = " ".join(README.read_text().split())
    assert "exit code 1" in text and "exit code 2" in text and "130" in text


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "{run}", "--num-samples", "2"],
        ["compare", "{run}"],
        ["generate", "{run}"],
        ["inpaint", "{run}"],
        ["text", "{run}"],
        ["anomaly", "{run}"],
        ["animate", "{run}", "--epochs", "2"],
    ],
    ids=lambda a: a[0],
)
def test_ctrl_c_in_any_run_command_is_one_line_and_exit_130(run_dir, monkeypatch, args):
    from ppl_vae import runs

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "load_config", interrupted)
    result = invoke(*[a.format(run=run_dir) for a in args])
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    one_line_error(result, "Error: interrupted")
    assert "Aborted" not in result.output


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ValueError("a bad value found while scoring")])
def test_a_failed_command_removes_the_empty_output_folders_it_made_and_nothing_else(
    run_dir, tmp_path, monkeypatch, failure
):
    """evaluate makes --out (and its missing parents) before it scores, so that an unwritable
    folder is refused first; when the scoring then fails or is interrupted, the folders it made
    and left empty are removed, while a folder that existed before, or that holds a file, stays."""
    from ppl_vae.reports import evaluation

    def fails(*a, **k):
        raise failure

    monkeypatch.setattr(evaluation, "score_block", fails)
    made = tmp_path / "new" / "deeper" / "out"
    result = invoke("evaluate", run_dir, "--num-samples", "2", "--out", made)
    assert result.exit_code in (EXIT_ERROR, EXIT_INTERRUPTED), result.output
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    result = invoke("evaluate", run_dir, "--num-samples", "2", "--out", existing / "out")
    assert result.exit_code in (EXIT_ERROR, EXIT_INTERRUPTED), result.output
    assert existing.is_dir() and not (existing / "out").exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = invoke("evaluate", run_dir, "--num-samples", "2", "--out", kept)
    assert result.exit_code in (EXIT_ERROR, EXIT_INTERRUPTED), result.output
    assert (kept / "notes.txt").read_text() == "mine"


def test_a_command_that_succeeds_keeps_its_output_folder_even_after_a_later_failure(run_dir, tmp_path, monkeypatch):
    """(in one process: a notebook, these tests) a later command's failure removes only what it made"""
    from ppl_vae.reports import evaluation

    made = tmp_path / "new" / "out"
    result = invoke("evaluate", run_dir, "--num-samples", "2", "--num-datapoints", "5", "--out", made)
    assert result.exit_code == 0, result.output
    assert sorted(p.suffix for p in made.iterdir()) == [".csv", ".nc"]
    for path in made.iterdir():
        path.unlink()  # the folder the successful command made, emptied by its user

    def fails(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "score_block", fails)
    result = invoke("evaluate", run_dir, "--num-samples", "2", "--out", tmp_path / "later")
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert made.is_dir() and not (tmp_path / "later").exists()


def test_ctrl_c_in_experiment_is_one_line_and_exit_130(tmp_path, monkeypatch):
    from ppl_vae.experiments import fig4

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fig4, "run", interrupted)
    result = invoke("experiment", "fig4", "--out", tmp_path / "fig4", "--no-progress")
    assert result.exit_code == EXIT_INTERRUPTED
    one_line_error(result, "Error: interrupted")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_text_temperature_must_be_finite_and_non_negative(tmp_path, value):
    one_line_error(
        invoke("text", tmp_path / "absent", "--temperature", value), "--temperature must be a finite number >= 0"
    )


def test_inpaint_more_images_than_the_test_set_is_refused(run_dir):
    one_line_error(
        invoke("inpaint", run_dir, "--num-images", "400"),
        "--num-images 400 is more than the 359 test images of digits; choose at most 359",
    )


# --- every likelihood's data range -------------------------------------------------------


def _likelihood(name: str):
    return make_likelihood(name, event_dims=1)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS.names()))
def test_every_likelihood_refuses_or_warns_on_8_bit_data(name, recwarn):
    """Binary data lies in every likelihood's support and scale; 0..255 data is either refused
    with a hint to rescale (bounded likelihoods) or warned about (unbounded ones), never silent."""
    lik = _likelihood(name)
    # binary data; for categorical_text as end-padded texts (its end symbol 0 only at the end)
    binary = [[1.0, 0.0], [1.0, 1.0]] if name == "categorical_text" else [[0.0, 1.0], [1.0, 0.0]]
    lik.check_support(torch.tensor(binary))
    assert not [w for w in recwarn if issubclass(w.category, DataRangeWarning)]
    pixels = torch.tensor([[0.0, 255.0], [17.0, 128.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lik.check_support(pixels)
        except DataError as exc:
            assert re.search(r"needs data in \[.*\], but its values lie in \[0, 255\]", str(exc)), exc
            assert "rescale" in str(exc) and not caught
            return
    messages = [str(w.message) for w in caught if issubclass(w.category, DataRangeWarning)]
    assert len(messages) == 1, f"likelihood {name!r} accepted 0..255 data silently"
    assert re.search(r"values in \[0, 255\].*rescale", messages[0]), messages[0]


def test_gaussian_sigmoid_refuses_data_outside_0_1_and_gaussian_warns_once():
    with pytest.raises(DataError, match=r"mean is squashed into \(0, 1\): rescale"):
        _likelihood("gaussian_sigmoid").check_support(torch.tensor([0.0, 1.5]))
    _likelihood("gaussian_sigmoid").check_support(torch.tensor([-0.0, 0.25, 1.0]))
    lik = _likelihood("gaussian")
    lik.check_support(torch.tensor([-3.0, 9.0]))  # standardized data: fine
    with pytest.warns(DataRangeWarning) as caught:
        lik.check_support(torch.tensor([0.0, 200.0]), what="the training data")
        lik.check_support(torch.tensor([0.0, 210.0]), what="the test data")
    assert len(caught) == 1 and "the training data" in str(caught[0].message)


@pytest.fixture
def pixels_npy(tmp_path):
    path = tmp_path / "pixels.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (60, 1, 4, 4)).astype(np.float32))
    return path


def test_default_model_on_8_bit_data_is_refused_with_a_hint(pixels_npy, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(
        invoke("fit", "--dataset", pixels_npy, "--epochs", "1", "--out", out, "--no-progress"),
        "likelihood 'gaussian_sigmoid' needs the training data of pixels.npy in [0, 1]",
    )
    assert "divide 8-bit images by 255" in line
    assert not out.exists()


def test_unbounded_likelihood_on_8_bit_data_trains_with_a_one_line_warning(pixels_npy, tmp_path):
    result = invoke(
        "fit",
        "--dataset",
        pixels_npy,
        "--likelihood",
        "laplace",
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
        *SMALL[:4],
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "likelihood 'laplace'" in warnings[0] and "rescale" in warnings[0]
    assert "UserWarning" not in result.output


def test_help_imports_neither_torch_nor_pyro():
    """`ppl-vae --help` stays fast (issue: 1.9 s, nearly all of it importing torch): the group,
    the package's top level and every command module it lists import no torch."""
    import subprocess
    import sys

    code = (
        "import sys; from ppl_vae.cli.main import cli; cli(['--help'], standalone_mode=False); "
        "import ppl_vae; print(sorted(m for m in ('torch', 'pyro', 'xarray', 'sklearn') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "beta", float("nan"), "train.beta must be a finite number > 0, got nan"),
        ("train", "beta", 4.0, "train.beta applies to objective 'beta_vae' only; train.objective is 'elbo'"),
        ("data", "num_images", 100, "data.num_images applies to dataset 'dsprites' only; data.dataset is 'digits'"),
    ],
)
def test_a_received_run_whose_config_is_out_of_range_or_does_not_apply_is_refused(
    run_dir, tmp_path, section, key, value, message
):
    import json
    import shutil

    received = tmp_path / "received"
    shutil.copytree(run_dir, received)
    raw = json.loads((received / "config.json").read_text())
    raw[section][key] = value
    (received / "config.json").write_text(json.dumps(raw))  # NaN as Python's json writes it
    result = invoke("evaluate", received, "--num-samples", "2", "--num-datapoints", "5")
    line = one_line_error(result, message)
    assert result.exit_code == EXIT_ERROR and "config.json" in line
    assert sorted(p.name for p in received.iterdir()) == sorted(p.name for p in run_dir.iterdir())


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--objective", "bogus"],
            "--objective must be one of beta_tc, beta_vae, capacity, elbo, free_bits, got 'bogus'",
        ),
        (["--free-bits", "1"], "--free-bits applies to objective 'free_bits' only; --objective is 'elbo'"),
        (
            ["--model", "ladder", "--model-option", "latent_dims=[8,4,2]", "--latent-dim", "3"],
            "but --latent-dim is 3: leave --latent-dim out or set it to 2",
        ),
    ],
)
def test_errors_name_flags_but_leave_values_that_spell_like_them(tmp_path, args, message):
    """Library messages name arguments (free_bits, latent_dim), which the CLI shows as the flags
    users type; a value that is spelled like one (the objective 'free_bits', an entry of a list of
    choices) stayed garbled as '--free-bits'."""
    one_line_error(invoke("fit", *args, "--out", tmp_path / "r"), message)
    assert not (tmp_path / "r").exists()


def test_with_flags_replaces_arguments_only():
    from ppl_vae.cli.main import with_flags

    flags = {"free_bits": "--free-bits", "batch_size": "--batch-size", "train.lr": "--lr"}
    assert with_flags("free_bits must be >= 0 and train.lr > 0", flags) == "--free-bits must be >= 0 and --lr > 0"
    assert (
        with_flags("unknown 'batch_size'; allowed: 'batch_size'", flags)
        == "unknown 'batch_size'; allowed: 'batch_size'"
    )
    assert (
        with_flags("x must be one of elbo, free_bits, got 'y'; batch_size too", flags)
        == "x must be one of elbo, free_bits, got 'y'; --batch-size too"
    )
    assert with_flags("unknown objective 'z'; valid objectives: elbo, free_bits", flags).endswith("elbo, free_bits")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data-dir", "{tmp}"], "--data-dir applies to a dataset read from a folder; dataset 'digits' is embedded"),
        (
            ["--dataset", "{tmp}/a.npy", "--data-dir", "{tmp}"],
            "is a file, read from its own path: leave --data-dir out",
        ),
        (["--log-every-steps", "10"], "--log-every-steps applies to a training log only: give --log NAME"),
        (
            ["--objective", "free_bits", "--free-bits-groups", "3"],
            "--objective 'free_bits' needs a KL floor: --free-bits is 0",
        ),
        (
            ["--model", "two_layer", "--latent-dim", "50", "--model-option", "latent_dims=[8,4]"],
            "latent_dims=[8, 4] puts 4 units in the top layer but --latent-dim is 50",
        ),
        (
            ["--model", "two_layer", "--hidden-dim", "7", "--model-option", "hidden_dims=[[16],[8]]"],
            "both set the hidden sizes of 'two_layer': give one",
        ),
        (["--elbo", "enum"], "--elbo 'enum' sums out the discrete sites a model declares in enumerated_sites; model"),
        (["--train-size", "5000"], "--train-size 5000 is larger than the training set of digits (1438 points)"),
        (["--model", "m2", "--label-seed", "3"], "--label-seed applies to a semi-supervised split (labels N) only"),
    ],
    ids=[
        "data-dir-embedded",
        "data-dir-file",
        "log-every-steps",
        "free-bits-zero",
        "latent-dims",
        "hidden-dims",
        "elbo-enum",
        "train-size-beyond-the-data",
        "label-seed-without-labels",
    ],
)
def test_fit_refuses_settings_that_would_do_nothing(tmp_path, args, message):
    """Each was accepted, recorded in config.json and ignored (a data_dir the dataset never reads,
    a logging interval with no log, a free-bits objective without a floor: the ELBO)."""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((40, 4)).astype(np.float32))
    out = tmp_path / "run"
    one_line_error(invoke("fit", *[a.format(tmp=tmp_path) for a in args], "--epochs", 1, "--out", out), message)
    assert not out.exists()


def test_anomaly_refuses_a_data_dir_its_dataset_does_not_read_and_a_folder_as_out(run_dir, tmp_path):
    one_line_error(
        invoke("anomaly", run_dir, "--normal-class", 3, "--data-dir", tmp_path, "--out", tmp_path / "new" / "s.nc"),
        "--data-dir applies to a dataset read from a folder; dataset 'digits' is embedded",
    )
    assert not (tmp_path / "new").exists()
    one_line_error(
        invoke("anomaly", run_dir, "--normal-class", 3, "--out", tmp_path), "is a folder; give the netCDF file"
    )


def test_fit_into_a_dangling_link_is_one_line_naming_it(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere" / "target")
    one_line_error(invoke("fit", "--epochs", 1, "--out", link), "is a symbolic link to")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA device")
@pytest.mark.parametrize("command", ["evaluate", "compare", "calibrate", "anomaly"])
def test_cuda_without_a_gpu_names_the_flag(run_dir, tmp_path, command):
    extra = ["--normal-class", 3] if command == "anomaly" else []
    out = tmp_path / ("x.nc" if command == "anomaly" else "out")
    line = one_line_error(invoke(command, run_dir, "--device", "cuda", *extra, "--out", out), "--device 'cuda'")
    assert "train.device" not in line and not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "{run}", "--out", "{tmp}/g.png"],
        ["anomaly", "{run}", "--normal-class", "3", "--num-samples", "2", "--out", "{tmp}/a.nc"],
        ["evaluate", "{run}", "-k", "2", "--num-datapoints", "5", "--out", "{tmp}/e"],
    ],
    ids=lambda a: a[0],
)
def test_commands_that_read_no_training_curve_treat_a_damaged_history_alike(run_dir, tmp_path, args):
    """A history.nc cut short passes the HDF5 signature check: the commands that do not read it
    (everything but compare's training-curve figure and disentanglement's report) all run, where
    calibrate and anomaly used to read it and fail while evaluate ran; one that is not HDF5 at
    all is refused by every one of them, before any work."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    history = (run / "history.nc").read_bytes()
    (run / "history.nc").write_bytes(history[:3000])
    result = invoke(*[a.format(run=run, tmp=tmp_path) for a in args])
    assert result.exit_code == 0, result.output
    (run / "history.nc").write_bytes(b"not a netCDF file")
    one_line_error(invoke(*[a.format(run=run, tmp=tmp_path / "x") for a in args]), "history.nc")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "{run}"],
        ["inpaint", "{run}", "--num-images", "2"],
        ["animate", "{run}", "--epochs", "2"],
        ["fit", "--resume", "{run}", "--epochs", "3", "--no-progress"],
    ],
)
def test_a_read_only_file_system_is_one_line_naming_the_file(run_dir, tmp_path, monkeypatch, args):
    """generate, inpaint, animate and resume wrote into a read-only run folder with a traceback
    (OSError EROFS from the temporary file, a folder or the config). Every write here fails as
    the file system would (root writes through chmod, so the failure is simulated)."""
    import errno
    import os
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("ppl_vae.io.tempfile.mkstemp", read_only)
    monkeypatch.setattr("pathlib.Path.mkdir", lambda self, *a, **k: read_only())
    result = invoke(*[str(run) if a == "{run}" else a for a in args])
    one_line_error(result, "Read-only file system")


def test_data_dsprites_refuses_an_empty_out_name(tmp_path, monkeypatch):
    """`data dsprites --out ''` rendered 3 GB into the working folder; fit's --out refused it."""
    monkeypatch.chdir(tmp_path)
    one_line_error(invoke("data", "dsprites", "--out", ""), "is an empty name")
    assert list(tmp_path.iterdir()) == []


def test_models_shows_whole_first_sentences():
    """Descriptions were cut at the docstring's first line: "digits ... the embedded default (it reads"."""
    from ppl_vae.registry import first_sentence

    result = invoke("models")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    assert lines["digits"].endswith("so a new run refuses a data_dir with it, check_data_dir).")
    assert lines["dsprites"].rstrip().endswith("(see ppl_vae.data.dsprites).")
    assert "Chen et al. 2018's dSprites MLP" in lines["chen_mlp"]  # "et al." ends no sentence
    assert first_sentence("One (a. b) two.\nthree. Four.\n\nFive.") == "One (a. b) two. three."


@pytest.mark.parametrize("flag", ["--lr-schedule-options", "--model-option"])
def test_command_line_json_nested_too_deeply_is_one_line(tmp_path, flag):
    """QA review: JSON of ~1000 nested brackets on the command line gave a RecursionError traceback."""
    deep = "[" * 3000 + "]" * 3000
    value = deep if flag == "--lr-schedule-options" else f"x={deep}"
    extra = ["--lr-schedule", "StepLR"] if flag == "--lr-schedule-options" else []
    result = invoke("fit", "--epochs", 0, "--out", tmp_path / "r", *extra, flag, value)
    one_line_error(result, f"{flag} is JSON nested too deeply")
    assert not (tmp_path / "r").exists()
