"""The fused likelihood scorer and the blocked scoring give the generic path's numbers (issue 28).

Without autograd and in eval mode, :meth:`VAE.log_likelihood` scores draws a block at a time, and
where the decoder declares a linear head and the likelihood a fused scorer (Bernoulli), through
that scorer. Every estimate must equal the generic path's (the decoder's output scored by the
likelihood's ``log_prob``) and the traced path's to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.latents import check_fast_path
from ppl_vae.models import build_vae
from ppl_vae.models.likelihoods import BernoulliLikelihood, _softplus_sum_, make_likelihood
from ppl_vae.models.networks import MLPDecoder

REL = 1e-5


def _bernoulli(event_shape=(1, 6, 6), n=7):
    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", event_shape, latent_dim=3, hidden_dim=16).eval()
    return vae, torch.bernoulli(torch.full((n, *event_shape), 0.3))


def _generic_log_likelihood(vae, x, z):
    return vae.likelihood.log_prob(x, *vae.decoder(z))


@pytest.mark.parametrize("block", [1, 5, 7, 512])
def test_fused_bernoulli_scorer_equals_the_generic_log_prob(block):
    vae, x = _bernoulli()
    assert vae.likelihood.fuses_linear_head and vae.decoder.has_linear_head
    vae.score_block_samples = block  # per thread: blocks of one draw, part of a batch, several draws
    z = torch.randn(11, x.shape[0], 3)
    with torch.no_grad():
        fused = vae.log_likelihood(x, {"z": z})
        generic = _generic_log_likelihood(vae, x, z)
        one = vae.log_likelihood(x, {"z": z[0]})  # no draw dim
    assert fused.shape == generic.shape == (11, x.shape[0])
    assert torch.allclose(fused, generic, rtol=REL, atol=1e-5)
    assert torch.allclose(one, generic[0], rtol=REL, atol=1e-5)


def test_grey_levels_and_a_linear_head_without_bias():
    vae, _ = _bernoulli()
    x = torch.rand(4, 1, 6, 6)  # grey levels score as cross-entropy on both paths
    vae.decoder.net[-1].bias = None
    z = torch.randn(3, 4, 3)
    with torch.no_grad():
        assert torch.allclose(vae.log_likelihood(x, {"z": z}), _generic_log_likelihood(vae, x, z), rtol=REL, atol=1e-5)


def _estimates(vae, x, **kw):
    est = importance_estimate(vae.model, vae.guide, x, num_samples=60, batch_size=3, seed=4, **kw)
    return est


@pytest.mark.parametrize("path", ["generic", "traced"])
def test_importance_estimate_through_the_fused_scorer_equals_the_generic_and_traced_paths(path):
    vae, x = _bernoulli()
    fused = _estimates(vae, x)
    if path == "generic":
        vae.likelihood.fuses_linear_head = False  # the instance's declaration: no fused scorer
    else:
        vae.has_fast_path = False  # Pyro's traces
    other = _estimates(vae, x)
    for name in ("log_px", "log_px_stderr", "elbo", "elbo_stderr", "ess"):
        assert torch.allclose(getattr(fused, name), getattr(other, name), rtol=REL, atol=1e-6), name
    # PSIS k-hat fits the weights' tail: float rounding of log w (~1e-5 nats) moves it by ~1e-4
    assert torch.allclose(fused.khat, other.khat, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "gaussian", "gaussian_fixed", "laplace"])
def test_other_likelihoods_offer_no_scorer_and_blocks_give_the_same_numbers(likelihood):
    torch.manual_seed(1)
    vae = build_vae("gaussian_mlp", (1, 5, 5), likelihood=likelihood, latent_dim=2, hidden_dim=8).eval()
    assert not vae.likelihood.fuses_linear_head
    head = vae.decoder.head
    assert vae.likelihood.linear_head_scorer(torch.rand(3, 1, 5, 5), head.weight, head.bias, (1, 5, 5)) is None
    vae.score_block_samples = 4
    x, z = torch.rand(6, 1, 5, 5), torch.randn(9, 6, 2)
    with torch.no_grad():
        assert torch.allclose(vae.log_likelihood(x, {"z": z}), _generic_log_likelihood(vae, x, z), rtol=REL, atol=1e-5)
    check_fast_path(vae, x)


def test_event_smaller_than_a_datapoint_is_scored_by_log_prob():
    lik = BernoulliLikelihood(event_dims=1)
    weight, bias = torch.randn(12, 4), torch.randn(12)
    assert lik.linear_head_scorer(torch.rand(2, 3, 4), weight, bias, (3, 4)) is None
    assert make_likelihood("bernoulli", event_dims=2).linear_head_scorer(torch.rand(2, 3, 4), weight, bias, (3, 4))


def test_with_gradients_or_in_training_mode_the_decoder_output_is_scored_whole():
    vae, x = _bernoulli()
    z = torch.randn(2, x.shape[0], 3, requires_grad=True)
    vae.log_likelihood(x, {"z": z}).sum().backward()  # autograd: the generic path, differentiable
    assert z.grad is not None
    vae.train()
    calls = []
    vae.likelihood.linear_head_scorer = lambda *a: calls.append(a)  # type: ignore[method-assign]
    with torch.no_grad():
        vae.log_likelihood(x, {"z": z.detach()})
    assert calls == []  # batch norm's statistics would depend on the block


def test_overriding_what_the_scorer_relies_on_drops_the_declarations():
    class Tempered(BernoulliLikelihood):
        def log_prob(self, x, logits):
            return 0.5 * super().log_prob(x, logits)

    class Redeclared(BernoulliLikelihood):
        fuses_linear_head = True

        def log_prob(self, x, logits):
            return super().log_prob(x, logits)

    class Shifted(MLPDecoder):
        def forward(self, z):
            return tuple(p + 1 for p in super().forward(z))

    assert not Tempered.fuses_linear_head and Redeclared.fuses_linear_head
    assert not Shifted.has_linear_head and MLPDecoder.has_linear_head

    vae, x = _bernoulli()
    tempered = Tempered(event_dims=3)
    vae.likelihood = tempered
    z = torch.randn(4, x.shape[0], 3)
    with torch.no_grad():
        assert torch.allclose(vae.log_likelihood(x, {"z": z}), tempered.log_prob(x, *vae.decoder(z)))


#: float32's unit roundoff
U32 = torch.finfo(torch.float32).eps / 2


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 8, 31, 33, 64, 97, 784, 4096])
def test_softplus_sum_is_the_sum_of_softplus_to_float32_rounding(width):
    """The scorer's grouped sum (one log per 32 sigmoid(|l|)) against float64, within float32
    rounding: 16 u relative to the sum, plus 2 u absolute per value (the log of a product
    near 1 is off by about as many u as it has factors), a bound torch's own float32 softplus
    sum meets too. Every value's softplus is at least 2.4e-3; up to width 97 the bound is
    below that, so a value left out or counted twice fails, and the widths cover every
    odd/even halving; wider rows hold one logit of 40 at the start, middle and end."""
    g = torch.Generator().manual_seed(width)
    logits = (torch.rand(6, width, generator=g) * 14 - 6).to(torch.float32)
    if width > 97:
        logits[0, 0] = logits[1, width // 2] = logits[2, -1] = 40.0
    exact = torch.nn.functional.softplus(logits.double()).sum(-1)
    tol = 16 * U32 * exact + 2 * U32 * width
    if width <= 97:
        assert tol.max() < torch.nn.functional.softplus(torch.tensor(-6.0)).item()
    torch_f32 = torch.nn.functional.softplus(logits).sum(-1).double()
    assert ((torch_f32 - exact).abs() <= tol).all()
    ours = _softplus_sum_(logits.clone()).double()
    assert ((ours - exact).abs() <= tol).all(), (ours - exact).abs().max().item()


def test_softplus_sum_at_extreme_logits():
    values = [0.0, 17.0, -17.0, 30.0, -30.0, 100.0, -100.0, 1e30, -1e30]
    logits = torch.tensor([values], dtype=torch.float32)
    exact = sum(torch.nn.functional.softplus(torch.tensor(v, dtype=torch.float64)).item() for v in values)
    # sigmoid(|l|) rounds to 1 above |l| = 17: each such value drops log1p(exp(-|l|)) < 4.2e-8
    assert abs(_softplus_sum_(logits.clone()).item() - exact) <= 16 * U32 * exact + 8 * 4.2e-8
    assert _softplus_sum_(torch.tensor([[1.0, float("inf")]])).item() == float("inf")
    assert _softplus_sum_(torch.tensor([[-float("inf"), 0.0]])).item() == pytest.approx(math.log(2), rel=1e-7)
    assert torch.isnan(_softplus_sum_(torch.tensor([[1.0, float("nan"), 2.0]]))).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_softplus_sum_on_cuda_is_softplus_then_sum():
    logits = torch.randn(6, 784, device="cuda") * 4
    want = torch.nn.functional.softplus(logits).sum(-1)
    assert torch.allclose(_softplus_sum_(logits.clone()), want, rtol=1e-6, atol=1e-5)
