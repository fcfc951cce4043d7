"""The `conv` model (TensorFlow's CVAE tutorial): shapes with extra batch dims, likelihood
support, an exact log p(x) when the decoder ignores z, image-size errors, and training."""

from __future__ import annotations

import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.errors import DataError
from ppl_vae.inference.importance import elbo_per_datapoint, iw_log_px
from ppl_vae.models import MODELS, build_vae
from ppl_vae.models.conv import ConvDecoder, ConvEncoder


def test_conv_is_registered_with_the_tutorials_defaults():
    spec = MODELS.get("conv")
    assert (spec.likelihood, spec.latent_dim, spec.hidden_dim) == ("bernoulli", 2, 32)
    vae = build_vae("conv", (1, 28, 28))
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2)]
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in vae.decoder.modules())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_networks_keep_extra_leading_batch_dims(likelihood):
    vae = build_vae("conv", (1, 28, 28), likelihood=likelihood, latent_dim=3, hidden_dim=4)
    x = torch.rand(5, 1, 28, 28)
    loc, scale = vae.encoder(x)
    assert loc.shape == scale.shape == (5, 3) and (scale > 0).all()
    # A particle dim in front gives the same numbers per copy, not a reshuffled batch.
    loc2, _ = vae.encoder(x.expand(2, 5, 1, 28, 28))
    assert loc2.shape == (2, 5, 3)
    torch.testing.assert_close(loc2[1], loc)
    z = torch.randn(4, 5, 3)
    params = vae.decoder(z)
    assert len(params) == vae.likelihood.num_params
    assert all(p.shape == (4, 5, 1, 28, 28) for p in params)
    torch.testing.assert_close(vae.decoder(z[2])[0], params[0][2])
    # the IW estimator puts the particle dim in front; per-datapoint results come back
    log_px = iw_log_px(vae.model, vae.guide, torch.rand(5, 1, 28, 28), num_samples=3)
    assert log_px.shape == (5,) and torch.isfinite(log_px).all()


def test_several_channels():
    enc, dec = ConvEncoder((3, 28, 28), 2, 4), ConvDecoder(2, (3, 28, 28), num_params=2, hidden_dim=4)
    assert enc(torch.rand(6, 3, 28, 28))[0].shape == (6, 2)
    assert [p.shape for p in dec(torch.randn(6, 2))] == [(6, 3, 28, 28)] * 2


def test_bernoulli_support_is_checked():
    vae = build_vae("conv", (1, 28, 28), latent_dim=2, hidden_dim=4)
    with pytest.raises(DataError, match=r"needs data in \[0, 1\]"):
        vae.likelihood.check_support(torch.full((2, 1, 28, 28), 2.0))
    vae.likelihood.check_support(torch.rand(2, 1, 28, 28))


def test_iw_estimate_is_exact_when_the_decoder_ignores_z_and_the_guide_is_the_prior():
    """p(x|z) = Bernoulli(sigmoid(b)) for every z and q(z|x) = p(z): every importance weight is
    p(x) = prod_i Bernoulli(x_i; sigmoid(b_i)), so the IW estimate equals it for any K."""
    vae = build_vae("conv", (1, 28, 28), latent_dim=2, hidden_dim=4)
    bias = torch.linspace(-2.0, 2.0, 784).reshape(1, 28, 28)
    with torch.no_grad():
        vae.decoder.project[0].weight.zero_()
        last = vae.decoder.body[-1]
        last.weight.zero_()
        last.bias.zero_()
        vae.encoder.head.weight.zero_()
        vae.encoder.head.bias.zero_()  # loc 0, log-variance 0
    # The decoder's last layer has one bias per channel, so plant the per-pixel bias in front of it.
    vae.decoder.register_forward_hook(lambda mod, inp, out: tuple(o + bias for o in out))
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    exact = torch.distributions.Bernoulli(logits=bias).log_prob(x).flatten(1).sum(-1)
    torch.testing.assert_close(iw_log_px(vae.model, vae.guide, x, num_samples=7), exact)
    torch.testing.assert_close(elbo_per_datapoint(vae.model, vae.guide, x, num_particles=3), exact)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 20), (28, 28), (784,), (1, 32, 32)])
def test_wrong_image_size_is_a_one_line_error_naming_the_expected_shape(shape):
    with pytest.raises(ValueError) as info:
        build_vae("conv", shape)
    message = str(info.value)
    assert "\n" not in message
    assert "(channels, 28, 28)" in message and str(tuple(shape)) in message


def _blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """Binary 28x28 images: a bright square whose corner is one of 4 planted places."""
    x = torch.zeros(n, 1, 28, 28)
    corners = torch.randint(4, (n,), generator=generator)
    for i, c in enumerate(corners.tolist()):
        r, k = divmod(c, 2)
        x[i, 0, 4 + 12 * r : 12 + 12 * r, 4 + 12 * k : 12 + 12 * k] = 1.0
    flips = torch.rand(x.shape, generator=generator) < 0.02
    return torch.where(flips, 1 - x, x)


def test_conv_trains_on_28x28_blobs():
    g = torch.Generator().manual_seed(0)
    x = _blobs(32, g)
    vae = build_vae("conv", (1, 28, 28), latent_dim=2, hidden_dim=4)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    elbo = Trace_ELBO()
    losses = []
    for _ in range(20):
        loss = elbo.differentiable_loss(vae.model, vae.guide, x) / len(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Starts at a few hundred nats (784 log 2 = 543 for logits at 0); the planted blobs need
    # about log 4 + 784 H(0.02) = 78 nats, and 20 steps already get well on the way there.
    assert losses[0] > 300
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
