"""AIS and BDMC against the linear-Gaussian VAE's exact log p(x) and posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae.inference.ais import (
    AISSettings,
    ais_log_likelihood,
    bdmc,
    linear_schedule,
    log_mean_exp_stats,
    sigmoid_schedule,
    simulate_data,
)
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


@pytest.fixture
def lg(one_thread):
    torch.manual_seed(5)
    vae = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.4)
    with torch.no_grad():
        z = torch.randn(8, 2)
        x = z @ vae.W.T + vae.b + 0.4 * torch.randn(8, 5)
        exact = vae.exact_log_marginal(x).double().numpy()
    return vae, x, exact


@pytest.mark.parametrize("schedule", [sigmoid_schedule, linear_schedule])
def test_schedules_run_from_zero_to_one_and_increase(schedule):
    betas = schedule(50)
    assert betas.shape == (51,) and float(betas[0]) == 0.0 and float(betas[-1]) == 1.0
    assert bool((betas[1:] > betas[:-1]).all())


def test_ais_from_the_prior_matches_exact_log_marginal_within_its_standard_error(lg):
    vae, x, exact = lg
    x, exact = x.repeat(2, 1), np.tile(exact, 2)  # 16 independent estimates
    ds = ais_log_likelihood(vae.model, None, x, num_steps=200, num_chains=16, seed=1)
    err = ds["log_px"].values - exact
    se = ds["log_px_stderr"].values
    z = err / se
    assert np.all(np.abs(z) < 4), (err, se)
    assert 0.5 < z.std() < 1.6  # the stated standard error matches the observed error
    assert abs(err.mean()) < 3 * np.sqrt((se**2).sum()) / len(se) + 0.01
    assert 0.5 < float(ds["accept_rate"].mean()) < 0.8  # adapted toward 0.65
    assert ds["log_px"].attrs["bound"] == "lower bound"
    assert all("bound" in ds[v].attrs for v in ds.data_vars)
    assert ds["log_weight"].dims == ("chain", "datapoint") and ds.sizes["chain"] == 16


def test_ais_error_shrinks_with_steps_and_short_runs_underestimate(lg):
    vae, x, exact = lg
    errors = {}
    for steps in (3, 300):
        ds = ais_log_likelihood(vae.model, None, x, num_steps=steps, num_chains=8, seed=2)
        errors[steps] = ds["log_px"].values - exact
    assert errors[3].mean() < -0.2  # a stochastic lower bound: few steps leave it well below
    assert np.abs(errors[300]).mean() < 0.25 * np.abs(errors[3]).mean()


@pytest.mark.parametrize("adaptation", ["pilot", "online", "none"])
def test_step_size_adaptation_modes(lg, adaptation):
    vae, x, _ = lg
    ds = ais_log_likelihood(vae.model, None, x, num_steps=40, num_chains=4, seed=7,
                            settings=AISSettings(step_size=0.02, adaptation=adaptation))
    assert ds.attrs["adaptation"] == adaptation
    if adaptation == "none":
        np.testing.assert_allclose(ds["step_size"].values, 0.02)
        assert float(ds["accept_rate"].mean()) > 0.95  # a tiny fixed step nearly always accepts
    else:  # the step grows from 0.02 toward 65 % acceptance
        assert float(ds["step_size"].min()) > 0.1 and float(ds["accept_rate"].mean()) < 0.9


def test_ais_from_exact_posterior_guide_is_exact_for_any_steps(lg):
    vae, x, exact = lg
    ds = ais_log_likelihood(vae.model, vae.exact_posterior_guide, x, num_steps=4, num_chains=3, seed=0)
    # f_beta = q p(x)^beta: every weight is p(x), whatever the chains do
    np.testing.assert_allclose(ds["log_px"].values, exact, atol=1e-4)
    np.testing.assert_allclose(ds["ess"].values, 3.0, rtol=1e-4)


def test_traced_model_path_gives_the_fast_path_result(lg):
    vae, x, _ = lg
    fast = ais_log_likelihood(vae.model, vae.guide, x, num_steps=6, num_chains=2, seed=3)
    traced = ais_log_likelihood(lambda x_, **kw: vae.model(x_, **kw), lambda x_, **kw: vae.guide(x_, **kw), x,
                                num_steps=6, num_chains=2, seed=3)
    np.testing.assert_allclose(fast["log_px"].values, traced["log_px"].values, atol=1e-4)


def test_simulate_data_draws_from_the_model(lg):
    vae, x, _ = lg
    x_sim, z_sim = simulate_data(vae.model, x.repeat(50, 1))
    assert x_sim.shape == (400, 5) and z_sim.shape == (400, 2)
    resid = x_sim - z_sim @ vae.W.T.detach() - vae.b.detach()
    assert abs(float(resid.std()) - 0.4) < 0.03
    assert abs(float(z_sim.std()) - 1.0) < 0.1


@pytest.mark.slow
def test_bdmc_sandwiches_exact_log_marginal_and_closes_with_steps(lg):
    vae, x, _ = lg
    torch.manual_seed(11)
    x_sim, z_sim = simulate_data(vae.model, x)
    exact = vae.exact_log_marginal(x_sim).detach().double().numpy()
    ds = bdmc(vae.model, None, x_sim, z_sim, step_counts=(3, 30, 300), num_chains=8, seed=4)
    lower, upper = ds["lower"].values, ds["upper"].values  # (num_steps, datapoint)
    slack = 3 * np.sqrt(ds["lower_stderr"].values ** 2 + 1e-4)
    assert np.all(lower.mean(1) <= exact.mean() + slack.mean(1))
    slack_up = 3 * np.sqrt(ds["upper_stderr"].values ** 2 + 1e-4)
    assert np.all(upper.mean(1) >= exact.mean() - slack_up.mean(1))
    gap = ds["gap"].mean("datapoint").values
    assert gap[0] > 0.5 and gap[0] > gap[1] > gap[2] and gap[2] < 0.1, gap
    assert ds["upper"].attrs["bound"] == "upper bound" and ds["lower"].attrs["bound"] == "lower bound"


def test_bdmc_from_the_guide_with_exact_posterior_start(lg):
    vae, x, exact = lg
    loc, cov = vae.exact_posterior(x)
    z_exact = torch.distributions.MultivariateNormal(loc, cov).sample().detach()
    ds = bdmc(vae.model, vae.guide, x, z_exact, step_counts=(2, 100), num_chains=8, seed=6)
    gap = ds["gap"].mean("datapoint").values
    assert gap[1] < 0.1 * gap[0] and gap[1] < 0.3
    last = ds.isel(num_steps=1)
    n = x.shape[0]
    se_lower = float(np.sqrt((last["lower_stderr"] ** 2).sum())) / n
    se_upper = float(np.sqrt((last["upper_stderr"] ** 2).sum())) / n
    assert float(last["lower"].mean()) <= exact.mean() + 3 * se_lower + 0.02
    assert float(last["upper"].mean()) >= exact.mean() - 3 * se_upper - 0.02


def test_log_mean_exp_stats_of_known_weights():
    log_w = torch.tensor([[0.0, 0.0], [0.0, -1e9]], dtype=torch.float64)
    log_mean, se, ess = log_mean_exp_stats(log_w)
    np.testing.assert_allclose(log_mean.numpy(), [0.0, np.log(0.5)])
    np.testing.assert_allclose(ess.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(se.numpy(), [0.0, 1.0])  # sqrt((1/1 - 1/2) * 2 / 1)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_steps": 0}, "num_steps must be an integer >= 1"),
    ({"num_chains": 0}, "num_chains must be an integer >= 1"),
    ({"schedule": "cosine"}, "schedule must be one of sigmoid, linear"),
    ({"step_size": -1.0}, "step_size must be"),
    ({"target_accept_prob": 1.0}, "target_accept_prob must lie in (0, 1)"),
    ({"adaptation": "dual"}, "adaptation must be one of pilot, online, none"),
    ({"pilot_chains": 0}, "pilot_chains must be an integer >= 1"),
])
def test_bad_arguments_name_the_argument(lg, kwargs, message):
    vae, x, _ = lg
    fields = set(AISSettings.__dataclass_fields__)
    settings = AISSettings(**{k: v for k, v in kwargs.items() if k in fields})
    direct = {k: v for k, v in kwargs.items() if k not in fields}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ais_log_likelihood(vae.model, None, x, settings=settings, **{"num_steps": 2, **direct})
