"""A report's files replace an earlier report together or not at all (``io.file_set``), and
SIGTERM gets the clean-up Ctrl-C gets. An interrupted ``calibrate`` into a folder holding an
earlier calibration left its new SBC files beside the old page (300 simulations against the
page's 100); SIGTERM left zero-byte temporary files and an empty output folder."""

from __future__ import annotations

import os
import signal

import pytest
from click.testing import CliRunner

from ppl_vae import io
from ppl_vae.cli.main import _terminate_as_interrupt, cli


def test_a_file_set_is_renamed_into_place_when_it_ends_and_dropped_when_it_fails(tmp_path):
    old = io.write_text(tmp_path / "a.txt", "old a")
    with io.file_set():
        io.write_text(tmp_path / "a.txt", "new a")
        io.write_text(tmp_path / "b.txt", "new b")
        with io.file_set():  # nested: part of the outer set
            io.write_text(tmp_path / "c.txt", "new c")
        assert old.read_text() == "old a" and not (tmp_path / "b.txt").exists()  # not yet
    assert [p.read_text() for p in sorted(tmp_path.iterdir())] == ["new a", "new b", "new c"]
    for error in (KeyboardInterrupt, ValueError):
        with pytest.raises(error):
            with io.file_set():
                io.write_text(tmp_path / "a.txt", "newer a")
                io.write_text(tmp_path / "d.txt", "d")
                raise error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]  # no temporary file
        assert (tmp_path / "a.txt").read_text() == "new a"


def test_a_set_removes_the_earlier_reports_files_it_supersedes_and_does_not_write(tmp_path):
    names = ["page.html", "optional.nc", "other.nc"]
    for name in names:
        io.write_text(tmp_path / name, f"old {name}")
    outside = tmp_path / "outside.nc"
    outside.write_text("not ours")
    (tmp_path / "linked.nc").symlink_to(outside)  # a link is never followed or removed
    with pytest.raises(ValueError):  # a failed set removes nothing
        with io.file_set():
            io.supersedes([tmp_path / n for n in [*names, "linked.nc"]])
            io.write_text(tmp_path / "page.html", "new page")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "linked.nc",
        "optional.nc",
        "other.nc",
        "outside.nc",
        "page.html",
    ]
    with io.file_set():
        io.supersedes([tmp_path / n for n in [*names, "linked.nc", "never_written.nc"]])
        io.write_text(tmp_path / "page.html", "new page")
        io.write_text(tmp_path / "other.nc", "new other")
        assert (tmp_path / "optional.nc").exists()  # only once the set goes into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.nc", "other.nc", "outside.nc", "page.html"]
    assert io.last_set_removed() == [tmp_path / "optional.nc"]
    assert (tmp_path / "page.html").read_text() == "new page" and outside.read_text() == "not ours"
    io.supersedes([tmp_path / "other.nc"])  # outside a set: nothing is removed
    assert (tmp_path / "other.nc").exists()


def test_a_failed_rename_puts_back_the_superseded_files_it_removed(tmp_path, monkeypatch):
    io.write_text(tmp_path / "page.html", "old page")
    io.write_text(tmp_path / "optional.nc", "old optional")
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith("page.html"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="cannot write .*page.html"):
        with io.file_set():
            io.supersedes([tmp_path / "page.html", tmp_path / "optional.nc"])
            io.write_text(tmp_path / "page.html", "new page")
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optional.nc", "page.html"]
    assert (tmp_path / "optional.nc").read_text() == "old optional" and (
        tmp_path / "page.html"
    ).read_text() == "old page"


def test_sigterm_raises_keyboard_interrupt_inside_a_command_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler at the next bytecode
            for _ in range(1000):
                pass
            pytest.fail("SIGTERM did not interrupt the block")
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_interrupted_compare_leaves_the_earlier_report_whole(tmp_path, monkeypatch, one_thread):
    runner = CliRunner()
    run, out = tmp_path / "run", tmp_path / "cmp"
    fit = ["fit", "--epochs", "1", "--train-size", "100", "--latent-dim", "2", "--hidden-dim", "8", "--no-progress"]
    assert runner.invoke(cli, [*fit, "--out", str(run)]).exit_code == 0
    compare = ["compare", str(run), "--num-datapoints", "10", "-k", "10", "--no-progress", "--out", str(out)]
    assert runner.invoke(cli, compare).exit_code == 0, "the first report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "report.html" in before and "gaps.nc" in before

    def interrupted(*args, **kwargs):  # after the netCDF files, before the page
        raise KeyboardInterrupt

    monkeypatch.setattr("ppl_vae.reports.compare.render_html", interrupted)
    result = runner.invoke(cli, [*compare, "--seed", "1"])
    assert result.exit_code == 130 and "none of the report's files was written" in result.output, result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new file beside the old page


def test_an_interrupt_during_the_renames_waits_until_all_are_in_place(tmp_path, monkeypatch):
    """SIGTERM in the middle of the renames (here from a thread, as the kernel may hand it to any
    of torch's threads) left new netCDF files beside the old page and temporary files behind; it
    now arrives after the last rename and after_commit's "wrote" line, and the set says so."""
    import threading
    import time

    real = os.replace
    renamed = []

    def slow(src, dst, *args, **kwargs):
        time.sleep(0.2)
        renamed.append(os.path.basename(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", slow)
    printed = []
    with pytest.raises(KeyboardInterrupt):
        with _terminate_as_interrupt():
            with io.file_set():
                for name in "abcd":
                    io.write_text(tmp_path / f"{name}.txt", name)
                io.after_commit(lambda: printed.append("wrote a-d"))
                threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    assert renamed == ["a.txt", "b.txt", "c.txt", "d.txt"] and printed == ["wrote a-d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert io.last_set_in_place()


def test_a_rename_that_fails_puts_the_earlier_files_back(tmp_path, monkeypatch):
    for name in "ab":
        io.write_text(tmp_path / f"{name}.txt", f"old {name}")
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "c.txt" and ".tmp" in os.path.basename(src):
            raise PermissionError(13, "Permission denied")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PermissionError, match="cannot write .*c.txt"):
        with io.file_set():
            for name in "abcd":
                io.write_text(tmp_path / f"{name}.txt", f"new {name}")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "old a", "b.txt": "old b"}
    assert not io.last_set_in_place()


def test_netcdf_is_written_from_memory_and_through_a_path_where_xarray_cannot(tmp_path, monkeypatch):
    """Files are made in memory (a full disk is then an OSError, not HDF5 crashing the process);
    an xarray that writes h5netcdf to paths only (before 2025) still writes them, the old way."""
    import numpy as np
    import xarray as xr

    from ppl_vae import io

    ds = xr.Dataset({"a": ("x", np.arange(3.0))}, attrs={"k": "v"})
    io.write_netcdf(ds, tmp_path / "mem.nc")
    real = xr.Dataset.to_netcdf

    def paths_only(self, path=None, *args, **kwargs):
        if path is None or not isinstance(path, (str, os.PathLike)):
            raise ValueError("invalid engine for creating bytes/file-like with to_netcdf: 'h5netcdf'")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_netcdf", paths_only)
    assert io.netcdf_in_memory(lambda buffer: ds.to_netcdf(buffer, engine="h5netcdf")) is None
    io.write_netcdf(ds, tmp_path / "path.nc")
    for name in ("mem.nc", "path.nc"):
        back = xr.load_dataset(tmp_path / name, engine="h5netcdf")
        assert back.identical(ds), name
