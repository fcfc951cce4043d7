"""Multi-sample objectives (IWAE, DReG, STL, RWS) against the linear-Gaussian closed forms."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference import objectives
from ppl_vae.inference.objectives import dreg_loss, iwae_loss, rws_loss, stl_loss
from ppl_vae.inference.training import METHODS
from ppl_vae.models import build_vae
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

OBJECTIVES = {"iwae": iwae_loss, "dreg": dreg_loss, "stl": stl_loss, "rws": rws_loss}


def _set_encoder(vae: LinearGaussianVAE, x_dim: int, *, exact_diagonal: bool = False) -> None:
    """Encoder = the amortized optimal mean-field q: posterior mean, variances 1/diag(precision)."""
    W, b, s2 = vae.W.detach(), vae.b.detach(), vae.sigma**2
    precision = torch.eye(W.shape[1]) + W.T @ W / s2
    cov = torch.linalg.inv(precision)
    A = cov @ W.T / s2
    with torch.no_grad():
        vae.encoder.linear.weight.copy_(A)
        vae.encoder.linear.bias.copy_(-A @ b)
        vae.encoder.log_scale.copy_(-0.5 * precision.diagonal().log())
    if exact_diagonal:
        assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-6)


def _correlated_vae(x_dim: int = 4, latent_dim: int = 2) -> LinearGaussianVAE:
    torch.manual_seed(1)
    W = torch.randn(x_dim, latent_dim)
    W[:, 1] += 0.8 * W[:, 0]  # correlated columns: a correlated posterior
    return LinearGaussianVAE(x_dim, latent_dim, sigma=0.5, W=W, b=torch.randn(x_dim))


def test_iwae_loss_tends_to_minus_log_evidence_with_k():
    vae = _correlated_vae()
    _set_encoder(vae, 4)
    x = torch.randn(16, 4) * 2
    exact = -vae.exact_log_marginal(x).sum().item()
    means, stderrs = [], []
    with torch.no_grad():
        for k in (1, 10, 100, 1000):
            draws = torch.stack([iwae_loss(vae.model, vae.guide, x, num_particles=k) for _ in range(10)])
            means.append(draws.mean().item())
            stderrs.append(draws.std().item() / 10**0.5)
    # upper bounds on -log p(x), falling with K (Burda et al. 2015, theorem 1)
    for (m1, s1), (m2, s2) in zip(zip(means, stderrs), zip(means[1:], stderrs[1:])):
        assert m2 < m1 + 3 * (s1**2 + s2**2) ** 0.5
    assert means[0] > exact + 1.0  # the ELBO's gap is real here (correlated posterior)
    assert abs(means[-1] - exact) < 4 * stderrs[-1] + 0.02


@pytest.mark.parametrize("k", [1, 3, 10])
def test_exact_posterior_guide_gives_exact_evidence_for_every_k(k):
    vae = _correlated_vae()
    x = torch.randn(8, 4)
    loss = iwae_loss(vae.model, vae.exact_posterior_guide, x, num_particles=k, num_data=80)
    assert loss.item() == pytest.approx(-10 * vae.exact_log_marginal(x).sum().item(), rel=1e-5)


def _grads(vae, loss_fn, x, k, seed):
    torch.manual_seed(seed)
    vae.zero_grad(set_to_none=True)
    loss_fn(vae.model, vae.guide, x, num_particles=k).backward()
    enc = torch.cat([p.grad.flatten() for p in vae.encoder.parameters()])
    dec = torch.cat([p.grad.flatten() for p in vae.decoder.parameters()])
    return enc, dec


@pytest.mark.slow
def test_dreg_gradient_is_unbiased_for_iwae_and_has_lower_encoder_variance():
    vae = _correlated_vae()
    _set_encoder(vae, 4)
    with torch.no_grad():  # move away from the optimum so the expected gradient is not ~0
        vae.encoder.linear.bias.add_(0.3)
        vae.encoder.log_scale.add_(0.2)
    x = torch.randn(4, 4)
    k, draws = 10, 150
    iw = [_grads(vae, iwae_loss, x, k, seed) for seed in range(draws)]
    dr = [_grads(vae, dreg_loss, x, k, seed) for seed in range(draws)]
    # same draws: the decoder (model) gradient of DReG is exactly IWAE's
    for (_, d1), (_, d2) in zip(iw[:5], dr[:5]):
        assert torch.allclose(d1, d2, rtol=1e-5, atol=1e-5)
    enc_iw = torch.stack([g for g, _ in iw])
    enc_dr = torch.stack([g for g, _ in dr])
    diff = enc_dr - enc_iw  # paired by seed: same z draws, so the difference's error is small
    z_scores = diff.mean(0) / (diff.std(0) / draws**0.5)
    assert z_scores.abs().max() < 4.5, z_scores
    assert enc_iw.mean(0).abs().max() > 10 * (enc_iw.std(0) / draws**0.5).min()  # a real signal
    ratio = (enc_dr.var(0).sum() / enc_iw.var(0).sum()).item()
    print(f"encoder gradient variance, DReG / IWAE (K={k}, {draws} draws): {ratio:.3f}")
    assert ratio < 0.8


def test_stl_gradient_is_zero_at_the_exact_posterior_but_the_elbo_gradient_is_not():
    torch.manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(4, 2))
    vae = LinearGaussianVAE(4, 2, sigma=0.5, W=q * torch.tensor([2.0, 0.7]), b=torch.randn(4))
    _set_encoder(vae, 4, exact_diagonal=True)  # orthogonal columns: the posterior is diagonal
    x = torch.randn(6, 4)
    for seed in range(5):
        enc, _ = _grads(vae, stl_loss, x, 3, seed)
        assert enc.abs().max() < 1e-4, enc
    plain = torch.stack([_grads(vae, iwae_loss, x, 1, seed)[0] for seed in range(5)])  # the ELBO
    assert plain.std(0).max() > 0.1


def test_detached_rescoring_by_rerun_matches_the_fast_path(monkeypatch):
    vae = _correlated_vae()
    x = torch.randn(5, 4)
    fast = _grads(vae, dreg_loss, x, 4, 0)
    monkeypatch.setattr(objectives, "_detached_distribution", lambda fn: None)  # force the rerun
    slow = _grads(vae, dreg_loss, x, 4, 0)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rws_steps_improve_the_iwae_bound():
    vae = _correlated_vae()
    x = vae.b.detach() + torch.randn(64, 4) @ torch.diag(torch.tensor([1.5, 1.0, 0.7, 1.2]))
    with torch.no_grad():
        vae.decoder.linear.weight.mul_(0.2)

    def bound() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return -iwae_loss(vae.model, vae.guide, x, num_particles=200).item()

    before = bound()
    stepper = METHODS.get("rws")(vae, TrainConfig(num_particles=5, lr=0.05))
    for _ in range(50):
        stepper.step(x, num_data=64)
    after = bound()
    assert after > before + 5.0, (before, after)
    assert after < vae.exact_log_marginal(x).sum().item() + 1.0  # still a lower bound (up to MC error)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_method_takes_a_step_that_changes_parameters(name):
    vae = build_vae("bernoulli_mlp", (1, 4, 4), latent_dim=3, hidden_dim=8)
    x = torch.bernoulli(torch.rand(6, 1, 4, 4))
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    stepper = METHODS.get(name)(vae, TrainConfig(num_particles=3, lr=1e-2))
    loss = stepper.step(x, num_data=60, y=torch.zeros(6))  # labels are accepted and ignored
    assert torch.isfinite(loss) and not loss.requires_grad
    changed = {k for k, v in vae.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_value_is_the_negative_bound_scaled_to_num_data(name):
    vae = _correlated_vae()
    x = torch.randn(5, 4)
    torch.manual_seed(0)
    value = OBJECTIVES[name](vae.model, vae.guide, x, num_particles=4, num_data=50).item()
    torch.manual_seed(0)
    expected = iwae_loss(vae.model, vae.guide, x, num_particles=4, num_data=50).item()
    if name == "stl":  # the K-sample ELBO, not the IWAE bound
        torch.manual_seed(0)
        expected = 10 * -objectives._weights(vae.model, vae.guide, x, (), {}, 4, 1.0)[2].log_weight.mean(0).sum().item()
    assert value == pytest.approx(expected, rel=1e-5)


def test_bad_num_particles_is_a_value_error():
    vae = _correlated_vae()
    with pytest.raises(ValueError, match="num_particles must be an integer >= 1"):
        iwae_loss(vae.model, vae.guide, torch.randn(3, 4), num_particles=0)
    with pytest.raises(ValueError, match="num_data must be >="):
        dreg_loss(vae.model, vae.guide, torch.randn(3, 4), num_particles=2, num_data=2)
