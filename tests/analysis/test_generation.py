"""Generation: inpainting against the closed-form conditional of a linear-Gaussian model, an
exactly known answer when the decoder ignores z, fixed z across frames, frames and GIF."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ppl_vae.analysis.generation import (
    MASKS,
    SampleGridRecorder,
    fixed_latents,
    inpaint,
    make_mask,
    plot_image_grid,
    plot_inpainting,
    sample_images,
)
from ppl_vae.models import build_vae
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


@pytest.mark.parametrize("proposal", ["prior", "encoder"])
def test_inpainting_matches_the_gaussian_conditional_of_a_linear_gaussian_model(proposal):
    """p(x) = N(b, C), C = W W^T + s^2 I: E[x_M | x_O] = b_M + C_MO C_OO^-1 (x_O - b_O) and
    p(x_O) = N(b_O, C_OO). Importance sampling from p(z) must reproduce both."""
    W = torch.tensor([[1.0, 0.5], [-0.8, 0.3], [0.2, -1.0], [0.7, 0.7], [-0.4, 0.9], [1.1, -0.2]])
    b = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5, -0.5])
    vae = LinearGaussianVAE(6, 2, sigma=0.5, W=W, b=b)
    C = W @ W.T + 0.25 * torch.eye(6)
    x = torch.distributions.MultivariateNormal(b, C).sample((3,))
    mask = torch.tensor([True, False, True, False, True, False])
    O, M = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)  # noqa: E741 (O, M: observed and missing, as in the math)
    gain = C[M][:, O] @ torch.linalg.inv(C[O][:, O])
    exact_mean = b[M] + (x[:, O] - b[O]) @ gain.T
    exact_log_px = torch.distributions.MultivariateNormal(b[O], C[O][:, O]).log_prob(x[:, O])

    if proposal == "encoder":  # a fitted encoder: the exact posterior's mean map, a wider scale
        with torch.no_grad():
            A = torch.linalg.solve(torch.eye(2) + W.T @ W / 0.25, W.T / 0.25)
            vae.encoder.linear.weight.copy_(A)
            vae.encoder.linear.bias.copy_(-A @ b)
    result = inpaint(vae, x, mask, num_samples=20000, num_draws=2, proposal=proposal)
    completion = torch.from_numpy(result["completion_mean"].values).reshape(3, 6)
    torch.testing.assert_close(completion[:, O], x[:, O])  # observed values kept as they are
    # Monte Carlo error of a self-normalized IS mean: about sd(W_M z | x_O) / sqrt(ESS), where
    # z | x_O ~ N(., (I + W_O^T W_O / s^2)^-1); allow 4 of those.
    post_cov = torch.linalg.inv(torch.eye(2) + W[O].T @ W[O] / 0.25)
    mc_sd = (W[M] @ post_cov @ W[M].T).diagonal().sqrt()
    ess = torch.from_numpy(result["ess"].values)
    assert (ess > 50).all()  # a point in the tail of p(x) gets few effective samples
    assert result.attrs["proposal"] == proposal
    assert ((completion[:, M] - exact_mean).abs() < 4 * mc_sd / ess[:, None].sqrt()).all()
    # log of an IS mean: relative error about sqrt(1/ESS - 1/K); allow 4 of those.
    log_err = (torch.from_numpy(result["log_evidence"].values) - exact_log_px).abs()
    assert (log_err < 4 * (1 / ess - 1 / 20000).sqrt()).all(), (log_err, ess)
    assert result.sizes["draw"] == 2


def test_inpainting_with_a_z_blind_decoder_is_the_likelihood_mean_and_weights_are_equal():
    vae = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=2, hidden_dim=8)
    logits = torch.linspace(-2, 2, 16)
    with torch.no_grad():
        vae.decoder.net[-1].weight.zero_()
        vae.decoder.net[-1].bias.copy_(logits)
    x = torch.bernoulli(torch.full((2, 1, 4, 4), 0.5))
    result = inpaint(vae, x, "top", num_samples=50)
    mask = make_mask("top", (1, 4, 4))
    expected = torch.where(mask, x, torch.sigmoid(logits).reshape(1, 4, 4))
    torch.testing.assert_close(torch.from_numpy(result["completion_mean"].values), expected)
    torch.testing.assert_close(torch.from_numpy(result["ess"].values), torch.full((2,), 50.0))
    exact = (torch.distributions.Bernoulli(logits=logits.reshape(1, 4, 4)).log_prob(x) * mask).flatten(1).sum(-1)
    torch.testing.assert_close(torch.from_numpy(result["log_evidence"].values), exact)


def test_masks_observe_the_named_part():
    assert MASKS.names() == ["bottom", "left", "quadrant", "right", "top"]
    top = make_mask("top", (1, 4, 6))
    assert top[0, :2].all() and not top[0, 2:].any()
    quad = make_mask("quadrant", (1, 4, 4))
    assert int(quad.sum()) == 4 and quad[0, :2, :2].all()
    with pytest.raises(ValueError, match="valid masks"):
        make_mask("diagonal", (1, 4, 4))


def test_unknown_label_gives_a_label_posterior():
    vae = build_vae("cvae", (1, 4, 4), latent_dim=2, hidden_dim=8, data_info={"num_classes": 3})
    result = inpaint(vae, torch.rand(2, 1, 4, 4), "left", num_samples=30)
    post = result["label_posterior"]
    assert post.dims == ("image", "label")
    torch.testing.assert_close(torch.from_numpy(post.sum("label").values), torch.ones(2))
    with pytest.raises(ValueError, match="conditional"):
        inpaint(build_vae("bernoulli_mlp", (1, 4, 4)), torch.rand(2, 1, 4, 4), "top", y=torch.tensor([0, 1]))


def test_fixed_latents_repeat_and_leave_the_global_rng_alone():
    vae = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=3, hidden_dim=8)
    state = torch.get_rng_state()
    z1, z2 = fixed_latents(vae, 5, seed=3), fixed_latents(vae, 5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(z1, z2) and not torch.equal(z1, fixed_latents(vae, 5, seed=4))


def test_conditional_grid_uses_the_same_z_in_each_column():
    vae = build_vae("cvae", (1, 4, 4), latent_dim=2, hidden_dim=8, data_info={"num_classes": 3})
    images = sample_images(vae, 5, seed=1)
    assert images.dims == ("label", "sample", "channel", "row", "col") and images.shape == (3, 5, 1, 4, 4)
    z = fixed_latents(vae, 5, seed=1)
    torch.testing.assert_close(torch.from_numpy(images.sel(label=2).values), vae.decode(z, 2).detach())
    fig = plot_image_grid(images)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        sample_images(vae, 2, labels=[5])
    with pytest.raises(ValueError, match="need a conditional model"):
        sample_images(build_vae("bernoulli_mlp", (1, 4, 4)), 2, labels=[0])


def test_recorder_writes_frames_and_an_animated_gif(tmp_path):
    vae = build_vae("bernoulli_mlp", (1, 6, 6), latent_dim=2, hidden_dim=8)
    recorder = SampleGridRecorder(tmp_path / "samples", num_samples=4, dpi=30)
    for epoch in range(3):
        recorder(epoch, vae)
        with torch.no_grad():
            for p in vae.decoder.parameters():
                p.add_(0.5)
    assert [p.name for p in recorder.frames()] == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    with Image.open(tmp_path / "samples.gif") as gif:
        assert gif.n_frames == 3
    fig = plot_inpainting(inpaint(vae, torch.rand(2, 1, 6, 6), "bottom", num_samples=10, num_draws=1))
    assert len(fig.axes) == 2 * 4  # original, observed, mean, one draw


def test_a_recorder_with_other_settings_refuses_the_frames_on_disk(tmp_path):
    """A second `animate --num-samples 16` over 4-sample frames rewrote a frame with other z and
    rebuilt the GIF from mismatched frames: the frames' settings are recorded beside them."""
    vae = build_vae("bernoulli_mlp", (1, 6, 6), latent_dim=2, hidden_dim=8)
    SampleGridRecorder(tmp_path / "samples", num_samples=4, dpi=30)(0, vae)
    before = {p.name: p.read_bytes() for p in (tmp_path / "samples").iterdir()}
    for other in (dict(num_samples=16), dict(num_samples=4, seed=1)):
        recorder = SampleGridRecorder(tmp_path / "samples", dpi=30, **other)
        with pytest.raises(ValueError, match="were drawn with num_samples 4, seed 0, not"):
            recorder.check_frames()
        with pytest.raises(ValueError, match="every frame of one animation decodes the same z"):
            recorder(1, vae)
    assert {p.name: p.read_bytes() for p in (tmp_path / "samples").iterdir()} == before
    SampleGridRecorder(tmp_path / "samples", num_samples=4, dpi=30)(1, vae)  # the same settings go on
    assert [p.name for p in SampleGridRecorder(tmp_path / "samples").frames()] == ["epoch_0000.png", "epoch_0001.png"]


# ---------------------------------------------------------------------------------------------
# Inpainting any model that keeps the contract: draws come from the model's own program

INFO = {"num_classes": 3, "num_train": 40, "num_labelled": 6}
IMAGE_MODELS = ["bernoulli_mlp", "one_layer", "two_layer", "ladder", "cvae", "m2", "gmvae", "relaxed_gmvae"]


@pytest.mark.parametrize("proposal", ["prior", "encoder"])
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_image_model_inpaints_and_keeps_the_observed_pixels(name, proposal):
    vae = build_vae(name, (1, 4, 4), latent_dim=2, hidden_dim=8, data_info=INFO)
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.4))
    state = torch.get_rng_state()
    result = inpaint(vae, x, "left", num_samples=40, num_draws=2, proposal=proposal, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    mask = make_mask("left", (1, 4, 4))
    completion = torch.from_numpy(result["completion_mean"].values)
    draws = torch.from_numpy(result["completion_draws"].values)
    assert completion.shape == (3, 1, 4, 4) and draws.shape == (3, 2, 1, 4, 4)
    assert torch.equal(completion[:, mask], x[:, mask])
    assert torch.equal(draws[:, :, mask], x[:, None].expand_as(draws)[:, :, mask])
    assert ((completion >= 0) & (completion <= 1)).all()  # Bernoulli means where pixels are missing
    assert torch.isfinite(torch.from_numpy(result["log_evidence"].values)).all()
    weights = result.attrs["num_weights"]
    assert weights == 40 * (3 if vae.num_classes is not None else 1)
    assert ((result["ess"].values >= 1 - 1e-6) & (result["ess"].values <= weights + 1e-6)).all()
    again = inpaint(vae, x, "left", num_samples=40, num_draws=2, proposal=proposal, seed=1)
    torch.testing.assert_close(torch.from_numpy(again["completion_mean"].values), completion)
    if vae.num_classes is not None:
        post = torch.from_numpy(result["label_posterior"].values)
        torch.testing.assert_close(post.sum(-1), torch.ones(3, dtype=post.dtype))
        given = inpaint(vae, x, "left", y=torch.tensor([0, 2, 1]), num_samples=40, proposal=proposal)
        assert list(given["label"].values) == [0, 2, 1] and given.attrs["num_weights"] == 40


@pytest.mark.parametrize("name", ["two_layer", "m2"])
def test_a_decoder_blind_to_the_latents_gives_the_likelihood_mean_with_equal_weights(name):
    """Where p(x | latents) does not depend on the latents, every weight is equal (ESS = K), the
    completion is the likelihood's mean and log p(x_obs) is exact: the weights come from the
    model's own observed site, whatever its latent sites are."""
    vae = build_vae(name, (1, 4, 4), latent_dim=2, hidden_dim=8, data_info=INFO)
    logits = torch.linspace(-2, 2, 16)
    with torch.no_grad():
        vae.decoder.net[-1].weight.zero_()
        vae.decoder.net[-1].bias.copy_(logits)
    x = torch.bernoulli(torch.full((2, 1, 4, 4), 0.5))
    result = inpaint(vae, x, "top", num_samples=50)
    mask = make_mask("top", (1, 4, 4))
    expected = torch.where(mask, x, torch.sigmoid(logits).reshape(1, 4, 4))
    torch.testing.assert_close(torch.from_numpy(result["completion_mean"].values), expected)
    weights = result.attrs["num_weights"]
    torch.testing.assert_close(torch.from_numpy(result["ess"].values), torch.full((2,), float(weights)))
    exact = (torch.distributions.Bernoulli(logits=logits.reshape(1, 4, 4)).log_prob(x) * mask).flatten(1).sum(-1)
    # for m2 the weights cover (z_k, y) pairs with a uniform p(y): the sum over y is still exact
    torch.testing.assert_close(torch.from_numpy(result["log_evidence"].values), exact)
    if vae.num_classes is not None:
        torch.testing.assert_close(torch.from_numpy(result["label_posterior"].values), torch.full((2, 3), 1 / 3))


def test_a_model_that_cannot_be_inpainted_is_refused_up_front_naming_it():
    vae = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=2, hidden_dim=8)
    vae.generates_images = False  # as the text models declare: x is not an image
    with pytest.raises(ValueError, match="inpainting needs a model whose datapoints are images; VAE's are not"):
        inpaint(vae, torch.rand(2, 1, 4, 4), "top", num_samples=10)

    class NoObservedX(type(vae)):  # type: ignore[misc]
        def model(self, x, y=None, **kwargs):
            return super().model(x, y, **kwargs) if False else None

    blind = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=2, hidden_dim=8)
    blind.__class__ = NoObservedX
    with pytest.raises(ValueError, match="model NoObservedX .*observed site 'x'"):
        inpaint(blind, torch.rand(2, 1, 4, 4), "top", num_samples=10)


def test_frames_from_before_the_settings_record_refuse_a_grid_of_another_size(tmp_path):
    """Frames drawn before frames.json existed: their settings are unknown, but a grid of another
    size is other settings (a default 16-sample animate over 4-sample frames was accepted)."""
    vae = build_vae("bernoulli_mlp", (1, 6, 6), latent_dim=2, hidden_dim=8)
    SampleGridRecorder(tmp_path / "samples", num_samples=4, dpi=30)(0, vae)
    (tmp_path / "samples" / "frames.json").unlink()  # as written before the record
    with pytest.raises(ValueError, match="were drawn with other settings than num_samples 16"):
        SampleGridRecorder(tmp_path / "samples", num_samples=16, dpi=30)(1, vae)
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["epoch_0000.png"]
    SampleGridRecorder(tmp_path / "samples", num_samples=4, dpi=30)(1, vae)  # the same size goes on
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
