"""An experiment's result table survives a death between its two writes: a unit counts as
finished only when both the CSV and the netCDF hold it."""

from __future__ import annotations

import pandas as pd
import pytest
import xarray as xr

from ppl_vae.experiments import common


class _Killed(BaseException):
    """Stands in for SIGKILL inside the process: not an Exception, so nothing catches it."""


def _rows(unit: int):
    return [{"unit": unit, "step": s, "value": float(10 * unit + s)} for s in (1, 2)]


def _units_in_nc(path) -> list:
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        values = ds["value"].load()
    return sorted(int(u) for u in values.unit.values if values.sel(unit=u).notnull().all())


@pytest.mark.parametrize("die_in", ["to_csv", "to_netcdf"])
def test_death_in_either_write_makes_the_rerun_redo_the_unit(tmp_path, monkeypatch, die_in):
    table = common.ResultTable(tmp_path, "t", ["unit"], ["unit", "step"])
    table.add(_rows(1))
    owner = pd.DataFrame if die_in == "to_csv" else xr.Dataset

    def dying(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(owner, die_in, dying)
    with pytest.raises(_Killed):
        table.add(_rows(2))
    monkeypatch.undo()

    rerun = common.ResultTable(tmp_path, "t", ["unit"], ["unit", "step"])
    assert rerun.done(unit=1)
    assert not rerun.done(unit=2)  # the CSV never claimed unit 2, so the rerun redoes it
    rerun.add(_rows(2))
    assert sorted(pd.read_csv(tmp_path / "t.csv")["unit"].unique()) == [1, 2]
    assert len(pd.read_csv(tmp_path / "t.csv")) == 4  # unit 2 once, not twice
    assert _units_in_nc(tmp_path / "t.nc") == [1, 2]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
