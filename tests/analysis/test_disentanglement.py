"""MIG and DCI on constructed codes with known answers; metrics of a VAE; latent traversals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppl_vae.analysis.disentanglement import dci, disentanglement_metrics, mig
from ppl_vae.analysis.generation import latent_traversal, plot_traversal
from ppl_vae.data import load_dataset
from ppl_vae.models import build_vae

N, F, L, BINS = 4000, 3, 10, 20


def _factors(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, L, (N, F)).astype(float)


def _plugin_mi_spread() -> tuple[float, float]:
    """Mean and sd of the plug-in MI of independent variables with BINS and L classes: about
    chi^2_dof / 2N with dof = (BINS-1)(L-1) (Miller 1955), in nats."""
    dof = (BINS - 1) * (L - 1)
    return dof / (2 * N), math.sqrt(2 * dof) / (2 * N)


def test_mig_of_the_factors_themselves_is_one_up_to_the_estimators_bias():
    f = _factors()
    result = mig(f, f, num_bins=BINS, factor_names=["a", "b", "c"])
    bias, sd = _plugin_mi_spread()
    entropy = result.factor_entropy.values
    assert np.allclose(entropy, math.log(L), atol=0.01)
    # the gap is H - I(other dim) >= H - (bias + 4 sd): within that of 1 for every factor
    assert (result.mig_per_factor.values > 1 - (bias + 4 * sd) / entropy).all()
    assert result.mutual_info.dims == ("latent", "factor") and list(result.factor.values) == ["a", "b", "c"]


def test_mig_of_an_independent_code_is_zero_within_the_plug_in_spread():
    f = _factors()
    code = np.random.default_rng(1).normal(size=(N, 4))
    result = mig(code, f, num_bins=BINS)
    bias, sd = _plugin_mi_spread()
    # the gap between two independent plug-in estimates is at most a few of their sd
    assert float(result.mig) < 4 * sd / math.log(L) and float(result.mig) >= 0
    assert float(result.mutual_info.max()) < bias + 5 * sd


def test_a_random_rotation_lowers_mig_and_dci_disentanglement():
    f = _factors()
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(F, F)))
    z = (f - f.mean(0)) / f.std(0)
    ident, rotated = mig(z, f), mig(z @ q, f)
    bias, sd = _plugin_mi_spread()
    assert float(ident.mig) > 1 - (bias + 4 * sd) / math.log(L)
    assert float(rotated.mig) < float(ident.mig) - 0.3
    half = N // 2
    d_id = dci(z[:half], f[:half], z[half:], f[half:], seed=0)
    d_rot = dci((z @ q)[:half], f[:half], (z @ q)[half:], f[half:], seed=0)
    assert float(d_id.dci_disentanglement) > 0.95 and float(d_id.dci_completeness) > 0.95
    assert (d_id.dci_informativeness.values > 0.95).all()
    assert float(d_rot.dci_disentanglement) < float(d_id.dci_disentanglement) - 0.3
    noise = rng.normal(size=(N, F))
    d_noise = dci(noise[:half], f[:half], noise[half:], f[half:], seed=0)
    # accuracy at chance (1/L): a binomial over the held-out half, 4 sd
    assert (np.abs(d_noise.dci_informativeness.values - 1 / L) < 4 * math.sqrt(0.1 * 0.9 / half)).all()


def test_mig_refuses_bad_input():
    f = _factors()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        mig(f[:, :1], f)
    with pytest.raises(ValueError, match="points"):
        mig(f[:10], f)


def _dsprites_vae():
    data = load_dataset("dsprites", num_images=120)
    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", data.event_shape, latent_dim=4, hidden_dim=16)
    return vae, data


def test_metrics_of_a_vae_on_dsprites_and_a_dataset_without_factors():
    vae, data = _dsprites_vae()
    state = torch.get_rng_state()
    result = disentanglement_metrics(vae, data, num_points=80, num_test_points=20, seed=1, num_trees=5)
    assert torch.equal(state, torch.get_rng_state())
    assert list(result.factor.values) == ["shape", "scale", "orientation", "pos_x", "pos_y"]
    assert result.mutual_info.dims == ("latent", "factor") and 0 <= float(result.mig) <= 1
    assert 0 <= float(result.dci_disentanglement) <= 1 and int(result.active_units) <= 4
    again = disentanglement_metrics(vae, data, num_points=80, num_test_points=20, seed=1, num_trees=5)
    assert float(again.mig) == float(result.mig) and float(again.dci_disentanglement) == float(
        result.dci_disentanglement
    )
    digits = load_dataset("digits")
    with pytest.raises(ValueError, match="factor labels"):
        disentanglement_metrics(vae, digits)


def test_traversal_sweeps_one_dimension_sorted_by_kl():
    vae, data = _dsprites_vae()
    with torch.no_grad():  # make dimension 2 the only informative one: the others' encoder output is the prior
        rows = [0, 1, 3, 4, 5, 7]  # loc and log-variance rows of dimensions 0, 1, 3: q = N(0, 1)
        vae.encoder.head.weight[rows] = 0
        vae.encoder.head.bias[rows] = 0
    x = data.train[:50]
    trav = latent_traversal(vae, x, num_steps=5, span=2.0)
    assert trav.image.dims == ("latent", "step", "channel", "row", "col")
    assert int(trav.latent.values[0]) == 2 and np.all(np.diff(trav.kl.values) <= 1e-9)
    assert trav.value.values.tolist() == pytest.approx([-2, -1, 0, 1, 2])
    # the images change along a row, and the fixed point decodes to the encoder's mean
    assert not np.allclose(trav.image.values[0, 0], trav.image.values[0, -1])
    z0 = vae.encode(x[:1])[0][0].clone()
    z0[2] = 0.0
    assert np.allclose(trav.image.sel(latent=2).values[2], vae.decode(z0[None]).detach().numpy()[0], atol=1e-6)
    fig = plot_traversal(trav)
    assert fig.__class__.__name__ == "Figure"
    # the title says the order it has (QA: "active units first" above an inactive unit listed first)
    assert trav.attrs["order"] == "by KL, largest first"
    assert fig.axes[0].get_title() == "latent traversals, sorted by KL, largest first"
    unsorted = latent_traversal(vae, x, num_steps=3, sort_by_kl=False)
    assert unsorted.attrs["order"] == "as given" and plot_traversal(unsorted).axes[0].get_title() == "latent traversals"
    with pytest.raises(ValueError, match="latent dimension.*do not exist.*0..3"):
        latent_traversal(vae, x, dims=[7])


def test_a_factor_constant_among_the_points_is_reported_as_undefined_and_left_out_of_the_mean():
    """MIG normalizes by the factor's entropy: a factor with one value among the points has none,
    so its MIG is undefined. The summary says "n/a" and over how many factors the mean runs,
    instead of printing "nan" beside a mean that silently dropped it."""
    import xarray as xr

    from ppl_vae.reports.disentanglement import DisentanglementReport

    factors = _factors()
    factors[:, 0] = 3.0  # one value
    ds = mig(factors.copy(), factors, factor_names=["shape", "scale", "pos"])
    assert math.isnan(float(ds.mig_per_factor[0]))
    assert float(ds.mig) == pytest.approx(float(ds.mig_per_factor[1:].mean()))
    ds["dci_disentanglement"] = 0.5
    ds["dci_completeness"] = 0.5
    ds["dci_informativeness"] = ("factor", np.full(3, 0.5))
    ds["active_units"] = 3
    ds.attrs.update(dataset="dsprites", num_points=N, num_test_points=7)
    line = DisentanglementReport(ds, xr.Dataset()).summary()
    assert "nan" not in line
    # what the numbers are: plug-in estimates, informativeness on held-out points (QA)
    assert "(mean accuracy on 7 held-out points)" in line and f"(plug-in estimates from {N} points of dsprites" in line
    assert "shape n/a" in line and f"one value among the {N} points, mean over the other 2 factors" in line


def test_traversal_ticks_show_the_values_exactly():
    """±2.25 and 0.75 are not rounded to one decimal (QA saw -2.2, 2.2 and 0.8)."""
    vae, data = _dsprites_vae()
    trav = latent_traversal(vae, data.train[:10], num_steps=7, span=2.25)
    fig = plot_traversal(trav)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["-2.25", "-1.5", "-0.75", "0", "0.75", "1.5", "2.25"]


def test_mutual_info_title_fits_in_the_figure_with_few_factors():
    """2 factors x 3 latents: the title was wider than the figure and clipped on the left."""
    import xarray as xr

    from ppl_vae.analysis.disentanglement import plot_mutual_info

    metrics = xr.Dataset(
        {
            "mutual_info": (("latent", "factor"), np.full((3, 2), 0.5)),
            "factor_entropy": ("factor", np.ones(2)),
            "mig_per_factor": ("factor", [0.028, 0.036]),
            "mig": 0.032,
        },
        coords={"latent": [0, 1, 2], "factor": ["posx", "posy"]},
    )
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_mutual_info(metrics)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box, page = fig.axes[0].title.get_window_extent(renderer), fig.bbox
    assert box.x0 >= page.x0 and box.x1 <= page.x1, (box, page)
    assert "MIG 0.032" in fig.axes[0].get_title()
