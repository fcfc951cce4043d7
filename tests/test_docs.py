"""Every code block of README.md and docs/*.md, checked so a snippet that no longer runs fails CI.

- ```python blocks are **executed** in a temporary folder, on the CPU: as ``__main__`` in this
  process, or, when they start processes (``nproc=``, the distributed example), as a script
  of their own (``python block.py``), as a user's file would run, so a missing
  ``if __name__ == "__main__":`` guard fails.
- Shell blocks (```sh, ```bash, and unlabelled blocks holding commands) are **parsed**: every
  ``ppl-vae ...`` command (also after ``torchrun ... --no-python``) goes through click's parser
  for its (sub)command, so an unknown option, a wrong type or a missing argument fails here.
  They are not run: most train for minutes or need datasets that are absent here; the
  behaviour behind them is tested elsewhere. ``make TARGET`` lines must name a Makefile target.
  Placeholders (``RUN``, ``DIR``, ``...``, ``[optional parts]``, ``a / b`` alternatives) are
  resolved before parsing.
- Other blocks (``ini``, output, layout) are neither.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def blocks(kind: str) -> list:
    """A pytest param (id: file and index) of each block of ``kind`` ("python" or "shell")."""
    return list(_blocks(kind))


def _blocks(kind: str):
    for path in DOC_FILES:
        for i, match in enumerate(FENCE.finditer(path.read_text())):
            lang, text = match.group(1), match.group(2)
            if kind == "python" and lang == "python":
                yield pytest.param(text, id=f"{path.name}-{i}")
            elif kind == "shell" and (lang in ("sh", "bash") or (lang == "" and _has_commands(text))):
                yield pytest.param(text, id=f"{path.name}-{i}")


def _has_commands(text: str) -> bool:
    return any(line.strip().startswith(("ppl-vae ", "make ", "torchrun ")) for line in text.splitlines())


def test_the_docs_have_blocks_of_both_kinds():
    assert len(list(blocks("python"))) >= 5 and len(list(blocks("shell"))) >= 10


@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, tmp_path, monkeypatch):
    from ppl_vae.inference import estimators
    from ppl_vae.inference.capabilities import METHODS, OBJECTIVES

    estimators.names()  # the built-in estimators are registered before a block adds one
    # a block that registers one (docs/extending.md, docs/estimators.md) leaves no trace
    for registry in (METHODS, OBJECTIVES, estimators.ESTIMATORS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_docs", dict(registry._docs))
    script = tmp_path / "block.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    if "nproc=" not in code:
        import matplotlib

        matplotlib.use("Agg")
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # device "auto" means the CPU here
        runpy.run_path(str(script), run_name="__main__")
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


# -- shell blocks ---------------------------------------------------------------------------------


def commands(text: str):
    """The command lines of a shell block: continuations joined, comments and output dropped."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def resolve_placeholders(line: str) -> list:
    """Words of a documented command with its placeholders made concrete (see the module doc)."""
    line = re.sub(r"\[-[^\]]*\]", "", line)  # optional parts ([--seed 0]; not a JSON list such as '[512,512]')
    line = line.split(" / ")[0]  # "generate RUN / inpaint RUN": the first alternative
    words = [w for w in shlex.split(line) if w != "..."]
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # PYTHONPATH=. ppl-vae ...: the environment
        words = words[1:]
    return words


def parse_ppl_vae(args: list) -> None:
    """Parse ``ppl-vae ARGS`` with click down to the last subcommand, invoking nothing."""
    from ppl_vae.cli.main import cli

    command: click.Command = cli
    ctx = command.make_context("ppl-vae", list(args))
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click < 9 keeps the subcommand apart
        if not rest:
            return
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None, f"unknown command {name!r}"
        command = sub
        ctx = command.make_context(name, rest, parent=ctx)


MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("code", blocks("shell"))
def test_shell_block_parses(code):
    checked = 0
    for line in commands(code):
        words = resolve_placeholders(line)
        if words[0] == "torchrun":
            words = words[words.index("--no-python") + 1 :]
        if words[0] == "ppl-vae":
            try:
                parse_ppl_vae(words[1:])
            except click.ClickException as exc:
                pytest.fail(f"{line!r} does not parse: {exc.format_message()}")
            checked += 1
        elif words[0] == "make":
            assert set(words[1:]) <= MAKE_TARGETS, f"{line!r}: no such Makefile target"
            checked += 1
    assert checked or all(w.split()[0] in (".", "tensorboard") for w in commands(code)), code


def test_the_parser_check_catches_a_bad_option():
    with pytest.raises(click.NoSuchOption):
        parse_ppl_vae(["fit", "--no-such-option", "3"])
    with pytest.raises(click.BadParameter):
        parse_ppl_vae(["fit", "--epochs", "many"])


# -- the options table -----------------------------------------------------------------------------


def test_the_options_table_is_the_one_the_declarations_generate():
    """docs/options.md holds :func:`ppl_vae.config.options_table`; regenerate it with the command
    the page gives when a declaration changes."""
    from ppl_vae.config import render_options_doc

    path = ROOT / "docs" / "options.md"
    text = path.read_text()
    assert render_options_doc(text) == text, (
        "docs/options.md differs from the declarations in ppl_vae/config.py: regenerate the table with "
        "python -c \"import pathlib, ppl_vae.config as c; p = pathlib.Path('docs/options.md'); "
        'p.write_text(c.render_options_doc(p.read_text()))"'
    )
    nav = (ROOT / "mkdocs.yml").read_text()
    assert "options.md" in nav


def test_every_page_is_in_the_site_navigation_and_linked_from_the_index():
    """semisupervised.md was reachable only from other pages' text: mkdocs reports a page left
    out of nav at INFO level, which --strict lets pass."""
    nav = (ROOT / "mkdocs.yml").read_text()
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        name = page.relative_to(ROOT / "docs").as_posix()
        assert f" {name}" in nav, f"{name} is not in mkdocs.yml's nav"
        assert name == "index.md" or f"]({name})" in index, f"docs/index.md does not link {name}"


def test_every_documented_fit_command_passes_the_config_checks():
    """A documented ``ppl-vae fit`` builds a config that ppl_vae.config.check_config accepts
    (no setting where it does not apply, none out of range); nothing is run."""
    from ppl_vae.cli.fit import fit, run_config

    checked = 0
    for param in blocks("shell"):
        for line in commands(param.values[0]):
            words = resolve_placeholders(line)
            if words[0] == "torchrun":
                words = words[words.index("--no-python") + 1 :]
            if words[:2] != ["ppl-vae", "fit"] or "--resume" in words:
                continue
            try:
                run_config(fit.make_context("fit", words[2:]).params)
            except ValueError as exc:
                pytest.fail(f"{line!r} ({param.id}) is refused: {exc}")
            checked += 1
    assert checked >= 10


INLINE_FIT = re.compile(r"(?<!`)`(ppl-vae fit [^`\n]*--model [^`\n]+)`(?!`)")


def test_every_inline_fit_command_with_a_model_passes_the_config_checks():
    """A whole ``ppl-vae fit --model ...`` written inline in prose (not in a block) is checked too:
    semisupervised.md's Rui Shu configuration gave --hidden-dim and hidden_dims, which fit refuses."""
    from ppl_vae.cli.fit import fit, run_config
    from ppl_vae.pipeline import build_model

    checked = 0
    for path in DOC_FILES:
        for match in INLINE_FIT.finditer(FENCE.sub("", path.read_text())):
            line = match.group(1)
            words = resolve_placeholders(line)
            try:
                parse_ppl_vae(words[1:])
                config = run_config(fit.make_context("fit", words[2:]).params)
            except (click.ClickException, ValueError) as exc:
                pytest.fail(f"{path.name}: {line!r} is refused: {exc}")
            if len(config.model.model) == 1:  # a placeholder (--model M)
                continue
            try:  # the builder's own checks (hidden_dim beside hidden_dims), on 28x28 images
                build_model(config, (1, 28, 28), {"num_classes": 10, "num_train": 100, "num_labelled": 10})
            except ValueError as exc:
                pytest.fail(f"{path.name}: {line!r} is refused: {exc}")
            checked += 1
    assert checked >= 5


def test_the_methods_table_is_the_one_the_declarations_generate(monkeypatch):
    """docs/methods.md holds :func:`ppl_vae.inference.capabilities.declarations_table`; a method or
    objective whose declaration changes changes the table (checked by adding one here)."""
    import ppl_vae.inference  # noqa: F401  (registers every method and objective)
    from ppl_vae.inference.capabilities import METHODS, declarations_table, render_declarations_doc
    from ppl_vae.inference.training import Stepper

    path = ROOT / "docs" / "methods.md"
    text = path.read_text()
    assert render_declarations_doc(text) == text, (
        "docs/methods.md differs from the methods' and objectives' declarations: regenerate the table with "
        'python -c "import pathlib, ppl_vae.inference, ppl_vae.inference.capabilities as c; '
        "p = pathlib.Path('docs/methods.md'); p.write_text(c.render_declarations_doc(p.read_text()))\""
    )
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(METHODS, "_docs", dict(METHODS._docs))

    class Extra(Stepper):
        data_parallel = True

        @classmethod
        def requires(cls, config):
            return frozenset({"encoder_guide"})

    METHODS.register("zz_extra", doc="a method added in the test")(Extra)
    (row,) = [r for r in declarations_table().splitlines() if r.startswith("| `zz_extra` |")]
    assert row.startswith("| `zz_extra` | method | guide is the encoder's Gaussian") and "| yes | no | none |" in row, (
        row
    )


def test_the_estimators_table_is_the_one_the_registrations_generate(monkeypatch):
    """docs/estimators.md holds :func:`ppl_vae.inference.estimators.estimators_table`; a new
    registration appears in it (checked by adding one here)."""
    from ppl_vae.inference import estimators
    from ppl_vae.inference.estimators import ESTIMATORS, Estimate, register_estimator

    path = ROOT / "docs" / "estimators.md"
    text = path.read_text()
    assert estimators.render_estimators_doc(text) == text, (
        "docs/estimators.md differs from the estimators' registrations: regenerate the table with "
        "python -c \"import pathlib, ppl_vae.inference.estimators as e; p = pathlib.Path('docs/estimators.md'); "
        'p.write_text(e.render_estimators_doc(p.read_text()))"'
    )
    monkeypatch.setattr(ESTIMATORS, "_entries", dict(ESTIMATORS._entries))
    monkeypatch.setattr(ESTIMATORS, "_docs", dict(ESTIMATORS._docs))

    @register_estimator("zz_extra", title="an estimator added in the test", bound="upper bound", needs_guide=False)
    def zz_extra(model, guide, x, *, seed=None, num_chains=3, batch_size=1, progress=False) -> Estimate: ...

    (row,) = [r for r in estimators.estimators_table().splitlines() if r.startswith("| zz_extra |")]
    assert row.startswith("| zz_extra | upper bound | an estimator added in the test | no | `--num-chains`"), row
