"""The published 64x64 architectures (``chen_mlp``, ``conv64``): the papers' layer sizes and
parameter counts, extra leading batch dims, one training step moving both networks, the fast
path against Pyro's traces, and wrong image sizes refused with one line."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference.latents import check_fast_path
from ppl_vae.inference.training import METHODS
from ppl_vae.models import MODELS, build_vae

NAMES = ["chen_mlp", "conv64"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def binary(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 1, 64, 64, generator=torch.Generator().manual_seed(seed)) < 0.1).float()


def test_chen_mlp_has_the_papers_layers_and_parameter_count():
    spec = MODELS.get("chen_mlp")
    assert (spec.likelihood, spec.latent_dim, spec.hidden_dim) == ("bernoulli", 10, 1200)
    vae = build_vae("chen_mlp", (1, 64, 64))
    enc = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    dec = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in enc] == [(4096, 1200), (1200, 1200), (1200, 20)]
    assert [(m.in_features, m.out_features) for m in dec] == [(10, 1200), (1200, 1200), (1200, 1200), (1200, 4096)]
    assert any(isinstance(m, torch.nn.ReLU) for m in vae.encoder.modules())
    assert not any(isinstance(m, torch.nn.Tanh) for m in vae.encoder.modules())
    assert sum(isinstance(m, torch.nn.Tanh) for m in vae.decoder.modules()) == 3
    # weights and biases: 4096*1200 + 1200 + 1200*1200 + 1200 + 1200*20 + 20, and the decoder's
    assert count(vae.encoder) == 6_381_620 and count(vae.decoder) == 7_814_896
    assert vae.decoder.has_linear_head  # head(features(z)): the Bernoulli scorer may fuse it


def test_conv64_has_locatellos_layers_and_parameter_count():
    spec = MODELS.get("conv64")
    assert (spec.likelihood, spec.latent_dim, spec.hidden_dim) == ("bernoulli", 10, 256)
    vae = build_vae("conv64", (1, 64, 64))
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (4, 4), (2, 2)),
        (32, (4, 4), (2, 2)),
        (64, (2, 2), (2, 2)),  # disentanglement_lib's conv_encoder: 2x2 kernels in layers 3 and 4
        (64, (2, 2), (2, 2)),
    ]
    ups = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (64, (4, 4), (2, 2)),
        (32, (4, 4), (2, 2)),
        (32, (4, 4), (2, 2)),
        (1, (4, 4), (2, 2)),
    ]
    # encoder: convs 544 + 16,416 + 8,256 + 16,448, FC 1024x256 262,400, head 256x20 5,140;
    # decoder: FC 2,816 + 263,168, transposed convs 65,600 + 32,800 + 16,416 + 513
    assert count(vae.encoder) == 309_204 and count(vae.decoder) == 381_313
    assert not getattr(vae.decoder, "has_linear_head", False)  # ends in a transposed convolution


def test_conv64_takes_several_channels():
    vae = build_vae("conv64", (3, 64, 64), likelihood="gaussian", latent_dim=4, hidden_dim=16)
    loc, scale = vae.encoder(torch.rand(2, 3, 64, 64))
    assert loc.shape == scale.shape == (2, 4)
    assert [p.shape for p in vae.decoder(torch.randn(5, 2, 4))] == [(5, 2, 3, 64, 64)] * 2


@pytest.mark.parametrize("name", NAMES)
def test_networks_keep_extra_leading_batch_dims(name):
    torch.manual_seed(0)
    vae = build_vae(name, (1, 64, 64), hidden_dim=32)
    x = binary(5)
    loc, scale = vae.encoder(x)
    assert loc.shape == scale.shape == (5, 10) and (scale > 0).all()
    loc2, scale2 = vae.encoder(x.expand(2, 5, 1, 64, 64))  # a particle dim in front
    assert loc2.shape == scale2.shape == (2, 5, 10)
    torch.testing.assert_close(loc2[1], loc)
    z = torch.randn(3, 5, 10)
    (logits,) = vae.decoder(z)
    assert logits.shape == (3, 5, 1, 64, 64)
    torch.testing.assert_close(vae.decoder(z[2])[0], logits[2])
    (flat,) = vae.decoder(z[0, 0])  # a single z: no batch dim at all
    assert flat.shape == (1, 64, 64)


@pytest.mark.parametrize("name", NAMES)
def test_one_svi_step_moves_the_encoder_and_the_decoder(name, one_thread):
    torch.manual_seed(0)
    vae = build_vae(name, (1, 64, 64), hidden_dim=64)
    x = binary(6)
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    stepper = METHODS.get("svi")(vae, TrainConfig(lr=1e-2))
    loss = stepper.step(x, num_data=60)
    assert torch.isfinite(loss)
    still = [k for k, v in vae.named_parameters() if torch.equal(v, before[k])]
    assert not still, still
    assert any(k.startswith("encoder.") for k in before) and any(k.startswith("decoder.") for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_the_fast_path_equals_the_traced_model_and_guide(name):
    torch.manual_seed(0)
    vae = build_vae(name, (1, 64, 64), hidden_dim=32)
    assert vae.has_fast_path and vae.encoder_is_guide
    x = binary(4)
    # log p(x|z) is a sum over 4,096 pixels (about 2,800 nats here): float32 rounding of the
    # two summation orders is of order 1e-4, so the tolerance is set relative to that
    assert check_fast_path(vae, x, num_particles=3, atol=1e-3) < 1e-3
    vae.eval()  # eval mode scores in blocks, through the fused linear-head scorer where declared
    assert check_fast_path(vae, x, num_particles=3, atol=1e-3) < 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (64, 64), (4096,), (1, 64, 32), (1, 1, 64, 64)])
def test_a_wrong_image_size_is_a_one_line_error_naming_the_expected_shape(name, shape):
    with pytest.raises(ValueError) as info:
        build_vae(name, shape)
    message = str(info.value)
    assert "\n" not in message and "(1, 64, 64)" in message and repr(name) in message, message


def test_chen_mlp_takes_one_channel_only():
    with pytest.raises(ValueError, match=r"'chen_mlp' needs 64x64 images with event shape \(1, 64, 64\)"):
        build_vae("chen_mlp", (3, 64, 64))
