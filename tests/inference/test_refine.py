"""Semi-amortized inference: :func:`refine` (K steps per datapoint, model frozen) against the
linear-Gaussian closed forms, and the training method ``sa`` (Kim et al. 2018) end to end.

The linear-Gaussian VAE here has a decoder W with orthogonal columns, so the posterior
precision I + W^T W / sigma^2 is diagonal: the exact posterior is a diagonal Gaussian, the best
q of the refined family, and its ELBO is log p(x) exactly. Tolerances are 4 Monte Carlo standard
errors of the quantity compared.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from ppl_vae.config import TrainConfig
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.latents import log_importance_weights
from ppl_vae.inference.refine import refine
from ppl_vae.inference.semi_amortized import SemiAmortizedStepper, gaussian_elbo
from ppl_vae.inference.stats import log_mean_exp_se_from_ess
from ppl_vae.models.closed_form import TwoLayerLinearGaussian
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from tests.conftest import one_line_error

Z = 4.0  # standard errors allowed


def _diagonal_posterior_vae(bad_encoder: bool = True):
    """A linear-Gaussian VAE whose exact posterior is diagonal, 40 datapoints, and an encoder far
    from it: loc 2 for every datapoint (the posterior means spread around 0), scale e (posterior
    scales 0.3 and 0.58)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 2))
    vae = LinearGaussianVAE(5, 2, sigma=0.5, W=q * torch.tensor([1.5, 0.7]), b=torch.randn(5) * 0.3)
    if bad_encoder:
        with torch.no_grad():
            vae.encoder.linear.weight.zero_()
            vae.encoder.linear.bias.fill_(2.0)
            vae.encoder.log_scale.fill_(1.0)
    return vae, torch.randn(40, 5) * 1.5


def _mean_and_se(values: torch.Tensor, ses: torch.Tensor):
    """The mean over datapoints and its standard error from the per-datapoint ones (independent)."""
    return float(values.mean()), float(ses.pow(2).sum().sqrt() / values.shape[0])


def test_refinement_from_a_bad_encoder_reaches_log_p_x(one_thread):
    vae, x = _diagonal_posterior_vae()
    log_p = vae.exact_log_marginal(x).detach()
    result = refine(
        vae.model, vae.guide, x, seed=0, num_steps=1000, lr=0.05, num_samples=8, average=True, num_eval_samples=1000
    )
    # the encoder starts tens of nats below log p(x) ...
    before, before_se = _mean_and_se(result.elbo_before - log_p, result.elbo_before_stderr)
    assert before < -20, before
    # ... and the refined q's ELBO estimate is log p(x) to within its Monte Carlo error
    after, after_se = _mean_and_se(result.elbo_after - log_p, result.elbo_after_stderr)
    assert abs(after) < Z * after_se, (after, after_se)
    assert ((result.elbo_after - log_p).abs() < Z * result.elbo_after_stderr).float().mean() >= 0.9
    # the estimates are the ELBOs of the reported (loc, scale): the closed form lies within 4 se
    with torch.no_grad():
        exact_after = vae.elbo_closed_form(x, result.loc, result.scale)
        exact_before = vae.elbo_closed_form(x, result.init_loc, result.init_scale)
    est, se = _mean_and_se(result.elbo_after - exact_after, result.elbo_after_stderr)
    assert abs(est) < Z * se, (est, se)
    est, se = _mean_and_se(result.elbo_before - exact_before, result.elbo_before_stderr)
    assert abs(est) < Z * se, (est, se)
    # and the gap, from paired draws, matches the closed-form gap within its own (smaller) se
    gap, gap_se = _mean_and_se(result.gap - (exact_after - exact_before), result.gap_stderr)
    assert abs(gap) < Z * gap_se, (gap, gap_se)
    assert float(result.gap_stderr.mean()) < float(result.elbo_before_stderr.mean())
    # the refined q is the exact posterior (diagonal here), up to the optimizer's own noise: the
    # ELBO is flat near its optimum, so a 10% error in a scale costs about 0.01 nats
    loc, cov = vae.exact_posterior(x)
    assert torch.allclose(result.scale, cov.diagonal().sqrt().expand_as(result.scale).detach(), rtol=0.15)
    assert torch.allclose(result.loc, loc.detach(), atol=0.1)
    assert result.num_steps.eq(1000).all()


def test_the_refined_guide_is_an_importance_proposal(one_thread):
    vae, x = _diagonal_posterior_vae()
    result = refine(vae.model, vae.guide, x[:10], seed=1, num_steps=600, lr=0.05, num_samples=8, average=True)
    k = 500
    estimate = importance_estimate(vae.model, result.guide(), x[:10], num_samples=k, seed=2)
    torch.manual_seed(2)
    log_w = log_importance_weights(vae.model, result.guide(), x[:10], num_particles=k).detach()
    iw = torch.logsumexp(log_w, 0) - math.log(k)
    log_p = vae.exact_log_marginal(x[:10]).detach()
    # near the exact posterior the weights are near-constant: the IW estimate is log p(x) within its se
    assert (estimate.ess > 0.9 * k).all()
    se = log_mean_exp_se_from_ess(estimate.ess, k)
    assert ((iw - log_p).abs() < Z * se + 1e-4).all(), (iw - log_p, se)
    first = importance_estimate(vae.model, result.initial_guide(), x[:10], num_samples=k, seed=2)
    assert (first.ess < 0.1 * k).all()  # the bad encoder's q(z|x) is a poor proposal


def test_fixed_steps_by_default_tol_stops_earlier_and_the_callers_rng_is_left_alone(one_thread):
    vae, x = _diagonal_posterior_vae()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fixed = refine(vae.model, vae.guide, x, seed=4, num_steps=400, lr=0.05, batch_size=20, window=20)
    assert torch.equal(torch.rand(3), expected)  # seeded: the caller's stream did not move
    assert fixed.num_steps.eq(400).all() and fixed.trace.shape == (2, 400)
    again = refine(vae.model, vae.guide, x, seed=4, num_steps=400, lr=0.05, batch_size=20, window=20)
    assert torch.equal(fixed.loc, again.loc) and torch.equal(fixed.elbo_after, again.elbo_after)
    early = refine(vae.model, vae.guide, x, seed=4, num_steps=400, lr=0.05, batch_size=20, window=20, tol=0.05)
    assert early.num_steps.lt(400).all(), early.num_steps
    ds = fixed.to_dataset()
    assert ds["gap"].attrs["bound"] == "neither" and ds["elbo_after"].attrs["bound"] == "lower bound"
    assert ds.sizes == {"datapoint": 40, "latent": 2}


def test_several_latent_sites_refine_as_one_diagonal_gaussian(one_thread):
    torch.manual_seed(3)
    pair = TwoLayerLinearGaussian()
    x = torch.randn(12, pair.x_dim)
    result = refine(pair.model, pair.guide, x, seed=0, num_steps=300, lr=0.05, num_samples=4, num_eval_samples=400)
    assert result.loc.shape == (12, pair.z2_dim + pair.z1_dim)
    # the refined ELBO rises above the (untrained) encoder's by many standard errors of the gap ...
    assert (result.gap > Z * result.gap_stderr).all()
    # ... and stays below log p(x): a diagonal q cannot reach this correlated posterior
    log_p = pair.exact_log_marginal(x).detach()
    assert (result.elbo_after < log_p + Z * result.elbo_after_stderr).all()


def test_a_flow_guides_refinement_says_its_start_is_a_gaussian_matched_to_it_not_the_guide(one_thread):
    """QA: calibrate --refine on an IAF guide printed 'ELBO of the encoder's q' and 'amortization
    gap closed' for q_0, the diagonal Gaussian with the guide's moments, whose ELBO is not the
    flow's. The start is now said, in the result, its dataset and the ELBO's long name."""
    from ppl_vae.inference.refine import GUIDE_ITSELF
    from ppl_vae.models import build_vae

    torch.manual_seed(0)
    flow = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8, guide="iaf").eval()
    x = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    result = refine(flow.model, flow.guide, x, seed=0, num_steps=2, num_eval_samples=10)
    assert result.start.startswith("the diagonal Gaussian with the guide's per-datapoint moments, not the guide")
    ds = result.to_dataset()
    assert (
        ds.attrs["start"] == result.start
        and "ELBO of q_0, the diagonal Gaussian" in ds["elbo_before"].attrs["long_name"]
    )
    plain = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8).eval()
    assert refine(plain.model, plain.guide, x, seed=0, num_steps=1).start == GUIDE_ITSELF


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_steps": 0}, "num_steps must be a positive integer, got 0"),
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"lr": -1e-2}, "lr must be a positive number, got -0.01"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"tol": -1.0}, "tol must be None"),
    ],
)
def test_bad_refine_options_are_one_line_errors(options, message):
    vae, x = _diagonal_posterior_vae()
    with pytest.raises(ValueError) as info:
        refine(vae.model, vae.guide, x, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The training method "sa"


def test_sa_gradient_is_the_derivative_through_the_unrolled_steps(one_thread):
    """Autograd's gradient of the SA loss equals central differences of the loss (same draws),
    for encoder and decoder parameters: both get the terms through the K steps (Kim et al.'s
    algorithm 1), which a first-order version (steps' gradients as constants) lacks."""
    torch.manual_seed(0)
    vae = LinearGaussianVAE(4, 2, sigma=0.5).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    stepper = SemiAmortizedStepper(vae, TrainConfig(method="sa"), sa_steps=3, sa_lr=0.05, sa_max_grad_norm=None)

    def loss() -> torch.Tensor:
        torch.manual_seed(5)  # the same draws at every evaluation: a deterministic function of the weights
        return stepper.loss(x, num_data=6)

    params = dict(vae.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(), list(params.values()))))
    for name, p in params.items():
        h, first = 1e-6, (0,) * p.dim()
        p.data[first] += h
        up = float(loss().detach())
        p.data[first] -= 2 * h
        down = float(loss().detach())
        p.data[first] += h
        assert math.isclose((up - down) / (2 * h), float(grads[name][first]), rel_tol=1e-6, abs_tol=1e-7), name


def test_sa_refined_loss_is_below_the_encoders(one_thread):
    """The loss is -ELBO at the refined parameters: on average over draws it is below -ELBO at the
    encoder's output (K = 0), by more than 4 standard errors of the difference."""
    vae, x = _diagonal_posterior_vae()
    refined = SemiAmortizedStepper(vae, TrainConfig(method="sa"), sa_steps=20, sa_lr=0.05)
    diffs = []
    for seed in range(30):
        torch.manual_seed(seed)
        with_steps = float(refined.loss(x, num_data=40).detach())
        torch.manual_seed(seed)
        loc, scale = vae.encoder(x)
        without = float(-gaussian_elbo(vae, x, loc, scale.log()).sum().detach())
        diffs.append(without - with_steps)
    d = torch.tensor(diffs)
    assert float(d.mean()) > Z * float(d.std() / math.sqrt(len(d))), diffs


FAST = ["--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--train-size", "100", "--batch-size", "50"]


def test_fit_method_sa_from_the_cli_moves_every_part(tmp_path, one_thread):
    from ppl_vae import pipeline, runs
    from ppl_vae.cli.main import cli

    out = tmp_path / "run"
    args = ["fit", "--model", "bernoulli_mlp", "--method", "sa", "--method-option", "sa_steps=2"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--no-progress", *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = runs.load_config(out)
    assert config.train.method == "sa" and config.train.method_options == {"sa_steps": 2}
    initial, _, _ = pipeline.prepare(config)  # the same seed builds the same untrained model
    trained = pipeline.load_run(out).vae
    start = dict(initial.named_parameters())
    moved = {name: not torch.equal(p, start[name]) for name, p in trained.named_parameters()}
    assert all(moved.values()), moved
    assert any(n.startswith("encoder.") for n in moved) and any(n.startswith("decoder.") for n in moved)
    history = pipeline.load_run(out).history
    assert math.isfinite(float(history["test_elbo"][-1]))


@pytest.mark.parametrize(
    "option, message",
    [
        ("sa_steps=0", "option 'sa_steps' must be an integer >= 1, got 0"),
        ("sa_lr=0", "option 'sa_lr' must be a finite number > 0, got 0"),
        ("sa_lr=-0.5", "option 'sa_lr' must be a finite number > 0, got -0.5"),
    ],
)
def test_bad_sa_options_are_one_line_errors_before_any_file(tmp_path, option, message):
    from ppl_vae.cli.main import cli

    out = tmp_path / "run"
    args = ["fit", "--model", "bernoulli_mlp", "--method", "sa", "--method-option", option, "--out", str(out), *FAST]
    line = one_line_error(CliRunner().invoke(cli, args), message)
    assert "method 'sa'" in line
    assert not out.exists()
