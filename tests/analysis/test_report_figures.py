"""Figures of compare's report: the image rows (prior samples, reconstructions) are one tiled
canvas per titled row, drawn by one imshow, holding exactly the images given, in order; the
training curves show the series the run recorded."""

from __future__ import annotations

import numpy as np
import torch

from ppl_vae.analysis import plots


def _drawn(ax) -> np.ndarray:
    (image,) = ax.get_images()
    return np.ma.filled(image.get_array().astype(float), np.nan)


def test_prior_samples_are_one_canvas_of_every_sample_in_order():
    torch.manual_seed(0)
    samples = torch.rand(30, 1, 6, 5)
    fig = plots.plot_samples(samples)
    (ax,) = fig.axes
    want = plots.tile_images(samples[:, 0].numpy(), 10)
    assert want.shape == (3 * 7 - 1, 10 * 6 - 1)
    np.testing.assert_array_equal(np.isnan(_drawn(ax)), np.isnan(want))
    np.testing.assert_allclose(_drawn(ax)[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)
    assert fig._suptitle.get_text() == "Decoded prior draws: E[x|z] for z ~ p(z) (means, not draws of x)"


def test_reconstructions_are_two_labelled_rows():
    torch.manual_seed(1)
    x, r = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    fig = plots.plot_reconstructions(x, r)
    assert [ax.get_ylabel() for ax in fig.axes] == ["data", "reconstruction"]
    for ax, batch in zip(fig.axes, (x, r)):
        want = plots.tile_images(batch[:, 0].numpy(), 4)
        np.testing.assert_allclose(_drawn(ax)[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)


def test_rows_that_are_not_images_are_drawn_as_lines():
    fig = plots.plot_reconstructions(torch.rand(3, 7), torch.rand(3, 7))  # 7 features: no square image
    assert len(fig.axes) == 3 and not any(ax.get_images() for ax in fig.axes)
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)


def test_training_curves_draw_only_the_series_the_run_recorded():
    import xarray as xr

    epochs = np.arange(1, 4)
    history = xr.Dataset(
        {
            "train_elbo": ("epoch", [-3.0, -2.0, -1.5]),
            "test_elbo": ("epoch", [-3.2, -2.1, -1.7]),
            "val_elbo": ("epoch", [np.nan] * 3),  # no validation split
        },
        coords={"epoch": epochs},
    )
    fig = plots.plot_training_curves(history)
    (ax,) = fig.axes
    # named in words, said to be estimates of bounds, whole epochs on the axis (QA: raw names, 1.5 epochs)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
    assert ax.get_legend().get_title().get_text() == "ELBO on"
    assert ax.get_title() == "Training curves (Monte Carlo estimates of lower bounds)"
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), [-3.2, -2.1, -1.7])
