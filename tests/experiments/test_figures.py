"""Small-scale runs of every figure experiment on the embedded digits: files, numbers, resuming."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from scipy.stats import norm

from ppl_vae.experiments import common, fig2, fig3, fig4, fig5
from ppl_vae.inference import estimators

pytestmark = pytest.mark.usefixtures("one_thread")  # small loops: one thread is several times faster


def test_eval_steps_log_spaced_and_end_at_budget():
    assert common.eval_steps(10_000, 100, 3) == [1, 10, 100]
    assert common.eval_steps(10_000, 100, 1) == [100]
    assert common.eval_steps(50, 100, 4) == [1]


def test_fig2_small_run_resumes_and_improves(tmp_path, monkeypatch):
    settings = fig2.Fig2Settings(
        datasets=("digits",), latent_dims=(2,), hidden_dim=16, max_samples=1500, num_evals=3, eval_size=100
    )  # 15 Adagrad steps
    result = fig2.run(settings, tmp_path, progress=False)
    for name in ("fig2.csv", "fig2.nc", "fig2.png", "fig2.svg", "settings.json"):
        assert (tmp_path / name).is_file()
    lb = result["lower_bound"]
    assert lb.attrs["bound"] == "lower bound"
    assert set(lb["method"].values) == {"AEVB", "wake-sleep"}
    for method in ("AEVB", "wake-sleep"):
        curve = lb.sel({"dataset": "digits", "latent_dim": 2, "method": method, "split": "train"}).dropna(
            "num_train_samples"
        )
        assert float(curve[-1]) > float(curve[0]) + 5  # training raised the bound
    on_disk = xr.open_dataset(tmp_path / "fig2.nc", engine="h5netcdf").load()
    xr.testing.assert_allclose(on_disk["lower_bound"], lb)
    # what the number is, in the file as well
    assert on_disk["lower_bound"].attrs["bound"] == "lower bound"
    assert on_disk["lower_bound"].attrs["long_name"].startswith("mean ELBO per datapoint")
    assert len(pd.read_csv(tmp_path / "fig2.csv")) == 2 * 2 * 4  # methods x splits x (0 + 3 evals)
    # each ELBO has its standard error over the evaluated points: the 100 points' ELBOs vary by
    # several nats, so the error of their mean is a fraction of a nat, and the summary prints it
    se = result["lower_bound_se"]
    assert bool((se > 0).all()) and float(se.max()) < 5, se.values
    ((heading, lines),) = fig2.summary_sections(result)
    assert "± its standard error over the evaluated datapoints" in heading
    curve = {"dataset": "digits", "latent_dim": 2, "method": "AEVB", "split": "test"}  # 'method' is sel's too
    final = lb.sel(curve).dropna("num_train_samples")
    final_se = float(se.sel(curve).sel(num_train_samples=final["num_train_samples"][-1]))
    assert lines["digits z=2 AEVB test"] == f"{float(final[-1]):.2f} ± {final_se:.2f}"

    # a rerun trains nothing: every unit is done
    monkeypatch.setattr(common, "train_curve", lambda *a, **k: pytest.fail("a finished unit was retrained"))
    again = fig2.run(settings, tmp_path, progress=False)
    xr.testing.assert_allclose(again["lower_bound"], lb)


def test_the_experiments_elbo_standard_error_is_the_sd_of_the_per_datapoint_elbos_over_root_n():
    """Independently: the evaluator's error is the sample sd of elbo_per_datapoint at the same
    RNG state over sqrt(n), and its mean the mean of the same values."""
    from ppl_vae.data.datasets import load_dataset

    data = load_dataset("digits")
    vae = common.build_model("digits", data, 2, 8)
    evaluate = common.elbo_evaluator(data, 40)
    torch.manual_seed(3)
    got = evaluate(vae)
    torch.manual_seed(3)
    for split, x in (("train", data.train[:40]), ("test", data.test[:40])):
        values = estimators_elbo(vae, x).double()
        assert got[split] == pytest.approx(float(values.mean()), rel=1e-6)
        assert got[f"{split}_se"] == pytest.approx(float(np.std(values.numpy(), ddof=1) / np.sqrt(40)), rel=1e-6)


def estimators_elbo(vae, x):
    from ppl_vae.inference.importance import elbo_per_datapoint

    return elbo_per_datapoint(vae.model, vae.guide, x, num_particles=1)


def test_fig2_resumes_an_interrupted_run(tmp_path, monkeypatch):
    settings = fig2.Fig2Settings(
        datasets=("digits",), latent_dims=(2,), hidden_dim=8, max_samples=300, num_evals=2, eval_size=50
    )
    real = common.train_curve
    calls = []

    def interrupted(vae, data, method, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(method)
        return real(vae, data, method, **kw)

    monkeypatch.setattr(common, "train_curve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fig2.run(settings, tmp_path, progress=False)
    assert set(pd.read_csv(tmp_path / "fig2.csv")["method"]) == {"AEVB"}  # the first unit was kept
    stale = tmp_path / ".fig2.csv.k1ll3d_x.tmp"  # what a SIGKILL mid-write would leave
    stale.write_text("half a csv")
    monkeypatch.setattr(common, "train_curve", real)
    result = fig2.run(settings, tmp_path, progress=False)
    assert set(result["method"].values) == {"AEVB", "wake-sleep"}
    assert not stale.exists()


def test_rerun_with_other_settings_is_refused(tmp_path):
    settings = fig2.Fig2Settings(
        datasets=("digits",),
        latent_dims=(2,),
        hidden_dim=8,
        max_samples=100,
        num_evals=1,
        eval_size=20,
        methods=("AEVB",),
    )
    fig2.run(settings, tmp_path, progress=False)
    # the refusal names the setting and both values (QA: it named none)
    with pytest.raises(ValueError, match=r"other settings \('max_samples' 100 in its settings.json, 200 now\)"):
        fig2.run(fig2.Fig2Settings(**{**settings.__dict__, "max_samples": 200}), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"\('eval_size' 20 in its settings.json, 30 now \(and 1 more\)\)"):
        fig2.run(fig2.Fig2Settings(**{**settings.__dict__, "eval_size": 30, "seed": 4}), tmp_path, progress=False)
    with pytest.raises(
        ValueError, match=r"\('methods' \[\"AEVB\"\] in its settings.json, \[\"AEVB\", \"wake-sleep\"\] now"
    ):
        fig2.run(
            fig2.Fig2Settings(**{**settings.__dict__, "methods": ("AEVB", "wake-sleep")}), tmp_path, progress=False
        )
    (tmp_path / "settings.json").write_text("[1, 2]")  # damaged: not an object
    with pytest.raises(ValueError, match=r"other settings \(see its settings.json\)"):
        fig2.run(settings, tmp_path, progress=False)


def test_fig3_small_run(tmp_path):
    settings = fig3.Fig3Settings(
        dataset="digits",
        hidden_dim=8,
        train_sizes=(100,),
        max_samples=200,
        mcem_max_samples=100,
        methods=("AEVB", "MCEM"),
        num_evals=1,
        eval_size=4,
        hmc_samples=6,
        hmc_warmup=5,
        iw_samples=10,
    )
    result = fig3.run(settings, tmp_path, progress=False)
    for name in ("fig3.csv", "fig3.nc", "fig3.png", "fig3.svg"):
        assert (tmp_path / name).is_file()
    lm = result["log_marginal"]
    assert set(lm["method"].values) == {"AEVB", "MCEM"}
    assert set(lm["estimator"].values) == {"appendix_d", "iw"}
    # what each number is, in the netCDF too, read from the estimator registry
    on_disk = xr.open_dataset(tmp_path / "fig3.nc", engine="h5netcdf").load()
    for name in ("log_marginal", "log_marginal_se", "accept_rate", "num_low_ess", "num_impossible"):
        assert on_disk[name].attrs["long_name"] and on_disk[name].attrs["kind"], name
    assert on_disk["log_marginal"].attrs["bound"] == "appendix_d: neither; iw: lower bound"
    assert dict(zip(on_disk["estimator"].values, on_disk["estimator_bound"].values)) == {
        e: estimators.get(e).bound for e in ("appendix_d", "iw")
    }
    se = on_disk["log_marginal_se"].sel({"num_train_samples": 200.0, "method": "AEVB"})
    assert np.isfinite(se).all() and (se > 0).all()
    assert np.isfinite(
        on_disk["accept_rate"].sel({"estimator": "appendix_d", "method": "AEVB", "num_train_samples": 200.0})
    ).all()
    assert np.isnan(on_disk["accept_rate"].sel(estimator="iw")).all()
    # each method is evaluated at the end of its own budget (MCEM's is smaller)
    aevb = lm.sel({"method": "AEVB", "num_train_samples": 200.0})
    mcem = lm.sel({"method": "MCEM", "num_train_samples": 100.0})
    assert np.isfinite(aevb).all() and np.isfinite(mcem).all()
    assert np.isnan(lm.sel({"method": "MCEM", "num_train_samples": 200.0})).all()
    # cross-entropy of 64 grey pixels in [0, 1]: a negative log-likelihood. The IW estimate is a
    # stochastic lower bound; appendix D's estimate (of 1/p(x)) is too noisy at 6 HMC draws to bound.
    assert float(aevb.sel(estimator="iw").max()) < 0 and float(mcem.sel(estimator="iw").max()) < 0
    # what `ppl-vae experiment fig3` prints: each estimator's final values under a line saying what they are
    sections = dict(fig3.summary_sections(result))
    assert list(sections) == [
        "final estimate of log p(x), nats per datapoint, by appendix D (HMC): estimate, neither bound (mean over the "
        "evaluated points ± its Monte Carlo standard error); by training-set size N, method and split:",
        "final estimate of log p(x), nats per datapoint, by IW with the encoder: stochastic lower bound (mean over "
        "the evaluated points ± its Monte Carlo standard error); by training-set size N, method and split:",
    ]
    appendix_d, iw = sections.values()
    row = on_disk.sel(
        {"estimator": "iw", "split": "test", "train_size": 100, "method": "MCEM", "num_train_samples": 100.0}
    )
    assert iw["N=100 MCEM test, after 100 training samples"].startswith(
        f"{float(row['log_marginal']):.2f} ± {float(row['log_marginal_se']):.2f} (Monte Carlo se)"
    )
    assert all("HMC acceptance" in line for line in appendix_d.values())


def test_fig3_printout_flags_what_the_estimator_can_tell():
    """+15500 nats on Bernoulli data (QA's short-HMC run) is printed with its se and flagged."""
    coords = dict(
        train_size=[100], method=["MCEM"], estimator=["appendix_d"], split=["train"], num_train_samples=[100.0]
    )
    dims = list(coords)

    def var(value):
        return (dims, np.full((1, 1, 1, 1, 1), value))

    result = fig3.netcdf_attrs(
        xr.Dataset(
            dict(
                log_marginal=var(15500.26),
                log_marginal_se=var(0.35),
                accept_rate=var(0.67),
                num_low_ess=var(5.0),
                num_impossible=var(5.0),
            ),
            coords=coords,
        )
    )
    ((_, lines),) = fig3.summary_sections(result)
    line = lines["N=100 MCEM train, after 100 training samples"]
    assert line.startswith("15500.26 ± 0.35 (Monte Carlo se), HMC acceptance 0.67 [")
    assert "IMPOSSIBLE: log p̂(x) > 0 for 5 datapoints" in line and "UNRELIABLE: low ESS for 5 datapoints" in line
    assert "--hmc-samples" in line
    result["num_impossible"][:] = 0.0
    result["num_low_ess"][:] = 0.0
    ((_, lines),) = fig3.summary_sections(result)
    assert (
        lines["N=100 MCEM train, after 100 training samples"] == "15500.26 ± 0.35 (Monte Carlo se), HMC acceptance 0.67"
    )


def test_fig3_refuses_large_latent_dim(tmp_path):
    with pytest.raises(ValueError, match="latent_dim"):
        fig3.run(fig3.Fig3Settings(dataset="digits", latent_dim=5), tmp_path, progress=False)


def test_manifold_grid_decodes_inverse_cdf_points():
    data = common.load_experiment_data(["digits"], None)["digits"]
    vae = common.build_model("digits", data, 2, 8)
    grid = fig4.manifold_grid(vae, 4)
    u = np.array([0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(grid["z1"].values, norm.ppf(u), rtol=1e-6)
    np.testing.assert_allclose(grid["z2"].values, norm.ppf(u)[::-1], rtol=1e-6)
    with torch.no_grad():  # row 0, col 3: the top-right cell is (z1, z2) = (max, max)
        expected = vae.decode(torch.tensor([[norm.ppf(0.875), norm.ppf(0.875)]], dtype=torch.float32))
    np.testing.assert_allclose(grid.isel(row=0, col=3).values, expected[0, 0].numpy(), atol=1e-6)


def test_fig4_and_fig5_small_runs(tmp_path):
    grids = fig4.run(
        fig4.Fig4Settings(datasets=("digits",), hidden_dim=8, max_samples=200, grid_size=3, eval_size=20),
        tmp_path / "f4",
        progress=False,
    )
    assert grids["digits"].shape == (3, 3, 8, 8)
    assert float(grids["digits"].min()) >= 0 and float(grids["digits"].max()) <= 1
    for name in ("fig4.png", "fig4.svg", "fig4.csv", "fig4.nc", "fig4_digits.nc"):
        assert (tmp_path / "f4" / name).is_file()
    # the manifold's axes say which z each tile decodes (QA: no labels or values for z1/z2)
    ax = fig4.plot(grids).axes[0]
    assert ax.get_xlabel().startswith("z1") and ax.get_ylabel().startswith("z2")
    z = grids["digits"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{v:.2f}" for v in z["z1"].values]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{v:.2f}" for v in z["z2"].values]
    assert float(z["z2"][0]) > 0 > float(z["z2"][-1])  # the top row is the largest z2
    samples = fig5.run(
        fig5.Fig5Settings(
            dataset="digits", latent_dims=(2, 3), hidden_dim=8, max_samples=200, num_images=4, eval_size=20
        ),
        tmp_path / "f5",
        progress=False,
    )
    assert samples.dims == ("latent_dim", "sample", "height", "width")
    assert samples.shape == (2, 4, 8, 8)
    table = pd.read_csv(tmp_path / "f5" / "fig5.csv")
    assert list(table["latent_dim"]) == [2, 3] and (table["train_elbo"] < 0).all()
    for name in ("fig5.png", "fig5.svg", "fig5_samples.nc"):
        assert (tmp_path / "f5" / name).is_file()
    # QA: their ELBOs had no attributes, no standard error and were not printed
    for folder, fig, key in ((tmp_path / "f4", fig4, "dataset"), (tmp_path / "f5", fig5, "latent_dim")):
        on_disk = xr.open_dataset(folder / f"{fig.__name__.rsplit('.', 1)[-1]}.nc", engine="h5netcdf").load()
        assert on_disk["test_elbo"].attrs["bound"] == "lower bound" and on_disk["test_elbo"].attrs["units"] == "nats"
        assert bool((on_disk["test_elbo_se"] > 0).all()) and float(on_disk["test_elbo_se"].max()) < 5
        ((heading, lines),) = fig.summary_sections(folder)
        assert "lower bound" in heading and "± its standard error" in heading
        first = on_disk.isel({key: 0})
        label = f"{key} {first[key].values.item()}"
        assert lines[label].endswith(f"test {float(first.test_elbo):.2f} ± {float(first.test_elbo_se):.2f}")


def test_missing_mnist_names_source_and_checksum(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        common.load_experiment_data(["mnist"], tmp_path)


def test_a_data_dir_that_no_dataset_reads_is_refused(tmp_path):
    """fig2 --dataset digits --data-dir DIR ran on the embedded digits and recorded DIR."""
    with pytest.raises(
        ValueError, match="data_dir applies to a dataset read from a folder; dataset 'digits' is embedded"
    ):
        common.load_experiment_data(["digits"], tmp_path)
    with pytest.raises(ValueError, match="sha256"):  # read by mnist, so given for the pair: mnist's files are checked
        common.load_experiment_data(["digits", "mnist"], tmp_path)


def test_dataset_dir_finds_subfolder(tmp_path):
    (tmp_path / "frey_face").mkdir()
    assert common.dataset_dir("frey-face", tmp_path) == tmp_path / "frey_face"
    assert common.dataset_dir("mnist", tmp_path) == tmp_path
    assert common.dataset_dir("mnist", None) is None


def test_mnist_fig2_loads_shared_data(shared_datasets):
    data = common.load_experiment_data(["mnist"], shared_datasets, train_size=500)["mnist"]
    assert data.train.shape == (500, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)


def _points_inside(fig) -> bool:
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        for line in ax.get_lines():
            x, y = (np.asarray(v, dtype=float) for v in line.get_data())
            ok = np.isfinite(x) & np.isfinite(y)
            if line.get_xydata().shape[0] > 2 and not (
                np.all((x[ok] >= x0) & (x[ok] <= x1)) and np.all((y[ok] >= y0) & (y[ok] <= y1))
            ):
                return False
    return True


def test_figure_points_stay_inside_axes_and_fig3_names_each_bound():
    n = np.logspace(2, 6, 10)
    rows = [
        dict(
            dataset="mnist",
            latent_dim=3,
            method=m,
            split=s,
            num_train_samples=v,
            lower_bound=-100 - 400 / (1 + v / 300),
        )  # a steep early transient, as in training
        for m in ("AEVB", "wake-sleep")
        for s in ("train", "test")
        for v in n
    ]
    assert _points_inside(fig2.plot(pd.DataFrame(rows)))
    rows = [
        dict(
            train_size=1000,
            method="AEVB",
            estimator=e,
            split=s,
            num_train_samples=v,
            log_marginal=-130 + np.log(v) + (2 if e == "appendix_d" else 0),
        )
        for e in ("appendix_d", "iw")
        for s in ("train", "test")
        for v in n
    ]
    fig = fig3.plot(pd.DataFrame(rows))
    assert _points_inside(fig)
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    # the legend says what the estimator registry declares each estimate to be
    assert estimators.get("appendix_d").bound == "neither" and estimators.get("iw").bound == "lower bound"
    assert (
        "appendix D (HMC): estimate, neither bound" in legend
        and "IW with the encoder: stochastic lower bound" in legend
    )


def test_tiles_have_gaps_and_one_colour_map():
    from ppl_vae.analysis.plots import IMAGE_CMAP, image_cmap, tile_images

    canvas = tile_images(np.ones((5, 2, 3)), ncols=3)
    assert canvas.shape == (2 * 2 + 1, 3 * 3 + 2)
    assert np.isnan(canvas[2]).all() and np.isnan(canvas[:, 3]).all()  # a gap row and column
    assert np.isnan(canvas[3:, 8:]).all()  # the missing sixth tile
    assert np.nansum(canvas) == 5 * 6
    assert image_cmap().name.startswith(IMAGE_CMAP)
    for module in (fig4, fig5):  # the figure modules draw through the shared helper, not their own map
        source = open(module.__file__).read()
        assert "show_images(" in source and "cmap=" not in source


def _overlapping_tick_labels(ax) -> list:
    """Pairs of x tick labels (major and minor, inside the view) whose drawn boxes overlap."""
    low, high = ax.get_xlim()
    labels = [
        t
        for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
        if t.get_visible() and t.get_text() and low <= t.get_position()[0] <= high
    ]
    boxes = [t.get_window_extent() for t in labels]
    return [
        (labels[i].get_text(), labels[j].get_text())
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]


@pytest.mark.parametrize("samples", [[500 * i for i in range(1, 11)], [100 * 2**i for i in range(12)]])
def test_fig2_tick_labels_do_not_run_into_each_other(samples):
    """QA: on the zoomed panel of a one-decade run, "3x10^3" and "4x10^3" were drawn over each other."""
    rows = [
        dict(dataset="digits", latent_dim=3, method=m, split=s, num_train_samples=v, lower_bound=-100 + np.log(v))
        for m in ("AEVB", "wake-sleep")
        for s in ("train", "test")
        for v in samples
    ]
    fig = fig2.plot(pd.DataFrame(rows))
    fig.canvas.draw()
    for ax in fig.axes:
        assert _overlapping_tick_labels(ax) == [], ax.get_title()
        shown = [t for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
        assert len(shown) >= 1, ax.get_title()  # every panel still has a scale
