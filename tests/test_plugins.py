"""Plugins: an explicit ``--plugin MODULE`` and an installed ``ppl_vae.plugins`` entry point
register a custom prior and likelihood that ``ppl-vae fit`` then uses.

The plugin package is written to a temporary folder with a ``.dist-info`` holding its
``entry_points.txt``: on ``sys.path`` that is exactly what ``pip install`` leaves behind, with
no network, no build and nothing left in the shared virtual environment afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ppl_vae import plugins
from ppl_vae.cli.main import active_plugins, cli
from ppl_vae.models.likelihoods import LIKELIHOODS
from ppl_vae.models.priors import PRIORS
from tests.conftest import one_line_error

PLUGIN_SOURCE = '''
"""A test plugin: a Student-t prior and a fixed-scale Laplace likelihood."""
import torch
from pyro import distributions as dist

from ppl_vae.models.likelihoods import LIKELIHOODS, Likelihood
from ppl_vae.models.priors import PRIORS, Prior


@PRIORS.register("student_t_test")
class StudentTPrior(Prior):
    """Student-t prior with 4 degrees of freedom per latent dimension."""

    def __init__(self, latent_dim):
        super().__init__(latent_dim)
        self.register_buffer("df", torch.full((latent_dim,), 4.0))

    def forward(self):
        return dist.StudentT(self.df, torch.zeros_like(self.df), torch.ones_like(self.df)).to_event(1)


@LIKELIHOODS.register("laplace_fixed_test")
class FixedLaplace(Likelihood):
    """Laplace with scale 0.1 around the decoder's output."""

    num_params = 1
    name = "laplace_fixed_test"

    def __init__(self, event_dims=1):
        super().__init__()
        self.event_dims = event_dims

    def forward(self, loc):
        return dist.Laplace(loc, torch.full_like(loc, 0.1)).to_event(self.event_dims)
'''

SMALL = ["--hidden-dim", "8", "--latent-dim", "2", "--train-size", "100", "--epochs", "1", "--no-progress"]


def write_plugin(root: Path, package: str, *, entry_point: bool) -> Path:
    """Write ``package`` (the plugin above) under ``root``; with ``entry_point``, also the
    ``.dist-info`` an installed distribution has, declaring it in the group ``ppl_vae.plugins``."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(PLUGIN_SOURCE)
    if entry_point:
        info = root / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nparts = {package}\n")
    return root


@pytest.fixture
def clean_registries():
    """Registrations and imports made by a test's plugin are undone afterwards, so other tests
    that loop over every registered prior or likelihood never meet the test parts."""
    saved = {reg: (dict(reg._entries), dict(reg._docs)) for reg in (PRIORS, LIKELIHOODS)}
    loaded = dict(plugins._LOADED)
    modules = set(sys.modules)
    yield
    for reg, (entries, docs) in saved.items():
        reg._entries.clear(), reg._entries.update(entries)
        reg._docs.clear(), reg._docs.update(docs)
    plugins._LOADED.clear(), plugins._LOADED.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith("plugpkg"):
            del sys.modules[name]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_load_plugins_imports_once_and_registers(tmp_path, monkeypatch, clean_registries):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, "plugpkg_a", entry_point=False)))
    assert "student_t_test" not in PRIORS
    assert plugins.load_plugins(["plugpkg_a", "plugpkg_a"]) == ["plugpkg_a"]
    assert "student_t_test" in PRIORS and "laplace_fixed_test" in LIKELIHOODS
    # a second load is a no-op (registering the same name twice would raise)
    assert plugins.load_plugins(["plugpkg_a"]) == ["plugpkg_a"]
    prior = PRIORS.get("student_t_test")(3)
    assert prior().event_shape == (3,) and torch.allclose(prior().base_dist.df, torch.tensor(4.0))


def test_plugin_errors_name_the_module(tmp_path, monkeypatch, clean_registries):
    (tmp_path / "plugpkg_broken.py").write_text("raise RuntimeError('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginError, match="'plugpkg_missing' cannot be imported: ModuleNotFoundError"):
        plugins.load_plugins(["plugpkg_missing"])
    with pytest.raises(
        plugins.PluginError, match="'plugpkg_broken' cannot be imported: RuntimeError: needs a licence key"
    ):
        plugins.load_plugins(["plugpkg_broken"])
    with pytest.raises(plugins.PluginError, match="has no function 'register'"):
        plugins.load_plugins(["json:register"])
    with pytest.raises(plugins.PluginError, match="module name"):
        plugins.load_plugins(["not a module"])
    line = one_line_error(invoke("--plugin", "plugpkg_broken", "models"), "plugpkg_broken")
    assert "needs a licence key" in line


def test_discover_lists_installed_entry_points(tmp_path, monkeypatch, clean_registries):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, "plugpkg_b", entry_point=True)))
    found = [p for p in plugins.discover() if p.spec == "plugpkg_b"]
    assert found == [plugins.PluginEntryPoint("parts", "plugpkg_b", "plugpkg_b")]
    assert plugins.load_installed_plugins() == (["plugpkg_b"], [])
    assert "student_t_test" in PRIORS


def test_fit_uses_parts_of_an_explicit_plugin(tmp_path, monkeypatch, clean_registries, one_thread):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path / "src", "plugpkg_c", entry_point=False)))
    out = tmp_path / "run"
    result = invoke(
        "--plugin",
        "plugpkg_c",
        "fit",
        "--prior",
        "student_t_test",
        "--likelihood",
        "laplace_fixed_test",
        "--out",
        out,
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["prior"] == "student_t_test"
    assert config["model"]["likelihood"] == "laplace_fixed_test"
    assert config["plugins"] == ["plugpkg_c"]


def test_unknown_part_without_the_plugin_is_one_line(tmp_path):
    result = invoke("fit", "--prior", "student_t_test", "--out", tmp_path / "run", *SMALL)
    one_line_error(result, "unknown prior 'student_t_test'")
    assert not (tmp_path / "run").exists()


def test_active_plugins_outside_a_command_is_empty():
    assert active_plugins() == []


@pytest.mark.slow
def test_installed_entry_point_needs_no_flag_in_the_console_script(tmp_path):
    """The real ``ppl-vae`` executable in a fresh process: the entry point alone makes the parts
    available to fit, and to evaluate of the run it wrote."""
    site = write_plugin(tmp_path / "site", "plugpkg_d", entry_point=True)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("ppl-vae")
    out = tmp_path / "run"
    fit = subprocess.run(
        [str(exe), "fit", "--prior", "student_t_test", "--likelihood", "laplace_fixed_test", "--out", str(out), *SMALL],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fit.returncode == 0, fit.stderr
    assert "test ELBO" in fit.stdout
    assert json.loads((out / "config.json").read_text())["plugins"] == ["plugpkg_d"]
    evaluate = subprocess.run(
        [str(exe), "evaluate", str(out), "--num-samples", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert evaluate.returncode == 0, evaluate.stderr
    # without the plugin on the path the run's parts are unknown: a one-line error, no traceback
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    missing = subprocess.run(
        [str(exe), "evaluate", str(out), "--num-samples", "2"], env=bare, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "plugpkg_d" in missing.stderr or "student_t_test" in missing.stderr, missing.stderr


def test_a_broken_installed_plugin_is_a_warning_not_a_dead_cli(tmp_path, monkeypatch, clean_registries):
    info = tmp_path / "plugpkg_e-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugpkg_e\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nparts = plugpkg_e_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("models")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "installed plugin 'parts'" in warnings[0] and "plugpkg_e_missing" in warnings[0]


def write_received_run_with_an_entry_point(folder: Path, marker: Path) -> Path:
    """A run folder as someone could send it: beside the run's files, a module that writes
    ``marker`` when imported and a ``.dist-info`` declaring it a ``ppl_vae.plugins`` entry point."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    info = folder / "evil-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nevil = evil_mod\n")
    return folder


@pytest.mark.parametrize("entry", ["", ".", "cwd"])
def test_entry_points_in_the_current_folder_are_never_discovered(tmp_path, monkeypatch, clean_registries, entry):
    """`python -m ppl_vae.cli evaluate .` inside a received run folder puts that folder on
    sys.path ('' or its absolute path; '.' from a relative PYTHONPATH): a .dist-info there must
    not make its module an installed plugin, while a plugin really installed elsewhere still is."""
    marker = tmp_path / "marker"
    received = write_received_run_with_an_entry_point(tmp_path / "received", marker)
    site = write_plugin(tmp_path / "site", "plugpkg_f", entry_point=True)
    monkeypatch.chdir(received)
    monkeypatch.setattr(sys, "path", [str(received) if entry == "cwd" else entry, str(site), *sys.path])
    try:
        found = plugins.discover()
        assert [p.spec for p in found if p.distribution == "evil" or p.name == "evil"] == []
        assert plugins.PluginEntryPoint("parts", "plugpkg_f", "plugpkg_f") in found
        loaded, failures = plugins.load_installed_plugins()
        assert "plugpkg_f" in loaded and "evil_mod" not in loaded and failures == []
        with pytest.raises(plugins.PluginError, match="evil_mod"):
            plugins.load_run_plugins(["evil_mod"])  # not trusted as an installed plugin either
        assert invoke("models").exit_code == 0  # the CLI loads installed plugins on every start
        assert not marker.exists() and "evil_mod" not in sys.modules
    finally:
        sys.modules.pop("evil_mod", None)


def test_fit_refuses_to_record_a_hook_and_a_hook_is_never_offered_to_trust(tmp_path, monkeypatch, clean_registries):
    """`--plugin mod:register fit` recorded the hook in config.json, which every later command then
    refused, suggesting `--trust-plugins`, which never runs a hook. fit now refuses the hook
    before anything is written; a run that names one (written before) gets only `--plugin`."""
    root = write_plugin(tmp_path / "src", "plugpkg_h", entry_point=False)
    (root / "plugpkg_h" / "hooks.py").write_text("def register():\n    pass\n")
    monkeypatch.syspath_prepend(str(root))
    out = tmp_path / "run"
    result = invoke("--plugin", "plugpkg_h.hooks:register", "fit", "--out", out, *SMALL)
    line = one_line_error(result, "plugin 'plugpkg_h.hooks:register' is a module:function hook")
    assert "load it as --plugin plugpkg_h.hooks" in line and not out.exists()
    with pytest.raises(plugins.PluginError) as refused:  # a hook this process has not run
        plugins.load_run_plugins(["plugpkg_h.hooks:other"], trust=True)
    assert "--plugin plugpkg_h.hooks:other" in str(refused.value) and "--trust-plugins" not in str(refused.value)
