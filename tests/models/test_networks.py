"""The networks' activations: the library's tanh against torch's."""

import pytest
import torch

from ppl_vae.models.cvae import ConditionalGaussianEncoder
from ppl_vae.models.networks import GaussianMLPEncoder, MLPDecoder, Tanh, tanh

#: 1.5 ulp of 1 in float32: 2 sigmoid(2x) - 1 rounds at the scale of 1, not of tanh(x)
FLOAT32_ABS_TOL = 1.5 * torch.finfo(torch.float32).eps


def _grid(dtype) -> torch.Tensor:
    mags = torch.logspace(-12, 2, 4001, dtype=torch.float64)
    special = torch.tensor([0.0, 1e30, float("inf")], dtype=torch.float64)
    return torch.cat([mags, -mags, special, -special]).to(dtype)


def test_tanh_is_torch_tanh_to_float32_rounding_and_torch_tanh_under_autograd():
    x = _grid(torch.float32)
    y = tanh(x)
    exact = torch.tanh(x.double())
    assert (y.double() - exact).abs().max().item() <= FLOAT32_ABS_TOL
    assert y[-6:].tolist() == [0.0, 1.0, 1.0, -0.0, -1.0, -1.0]
    assert torch.isnan(tanh(torch.tensor([float("nan")]))).all()
    # where a graph is recorded it is torch.tanh, value and gradient, bit for bit
    xg = x.clone().requires_grad_()
    yg = tanh(xg)
    assert torch.equal(yg, torch.tanh(x))
    (grad,) = torch.autograd.grad(yg.sum(), xg)
    (want,) = torch.autograd.grad(torch.tanh(xg).sum(), xg)
    assert torch.equal(grad, want)
    with torch.no_grad():
        assert torch.equal(tanh(xg), y)


def test_tanh_outside_cpu_float32_is_torch_tanh_bit_for_bit():
    x = _grid(torch.float64)
    assert torch.equal(tanh(x), torch.tanh(x))
    xb = x.to(torch.bfloat16)
    assert torch.equal(tanh(xb), torch.tanh(xb))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_tanh_on_cuda_is_torch_tanh():
    x = _grid(torch.float32).cuda()
    assert torch.equal(tanh(x), torch.tanh(x))


def test_tanh_networks_skip_torch_tanh_on_cpu_float32(monkeypatch):
    """Every tanh MLP scores through the sigmoid form without autograd (torch.tanh is 1.3-2.5 ns
    a value on CPU, the form 0.6): the encoder, decoder and the conditional encoder."""
    torch.manual_seed(0)
    nets = [
        GaussianMLPEncoder((6,), 2, (5,), "tanh"),
        MLPDecoder(2, (6,), 1, (5, 4), "tanh"),
        ConditionalGaussianEncoder((6,), 3, 2, (5,), "tanh"),
    ]
    inputs = [(torch.rand(4, 6),), (torch.randn(4, 2),), (torch.rand(4, 6), torch.eye(3)[[0, 1, 2, 0]])]
    with torch.no_grad():
        before = [net(*args) for net, args in zip(nets, inputs)]

    def no_torch_tanh(*args, **kwargs):
        raise AssertionError("torch.tanh called on CPU float32")

    monkeypatch.setattr(torch, "tanh", no_torch_tanh)
    with torch.no_grad():
        for net, args, ref in zip(nets, inputs, before):
            assert any(isinstance(m, Tanh) for m in net.modules())
            for a, b in zip(net(*args), ref):
                assert torch.equal(a, b)
