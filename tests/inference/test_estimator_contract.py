"""What every estimator promises beyond its numbers: it runs on a float64 model and returns
float64, and a call with a seed leaves the caller's global random state as it found it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ppl_vae.analysis.diagnostics import collapse_diagnostics, kl_per_dimension
from ppl_vae.analysis.gaps import gap_decomposition
from ppl_vae.inference.ais import ais_log_px, bdmc, simulate_data
from ppl_vae.inference.importance import elbo_per_datapoint, importance_estimate
from ppl_vae.inference.local_flows import fit_local_flow
from ppl_vae.inference.marginal import hmc_log_marginal
from ppl_vae.inference.meanfield import fit_mean_field
from ppl_vae.models.closed_form import TwoLayerLinearGaussian
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


def _vae64():
    torch.manual_seed(0)
    vae = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5).double()
    return vae, torch.randn(5, 4, dtype=torch.float64)


def _hier64():
    torch.manual_seed(0)
    model = TwoLayerLinearGaussian(x_dim=4, z1_dim=2, z2_dim=1, dtype=torch.float64)
    return model, torch.randn(5, 4, dtype=torch.float64)


def _estimators(model, x):
    """name -> a call returning one tensor or array of per-datapoint results."""
    m, g = model.model, model.guide
    return {
        "elbo": lambda: elbo_per_datapoint(m, g, x, num_particles=4, seed=1),
        "kl": lambda: torch.from_numpy(kl_per_dimension(m, g, x, seed=1).values),
        "iw": lambda: importance_estimate(m, g, x, num_samples=30, seed=1).log_px,
        "mean_field": lambda: (
            fit_mean_field(
                m, g, x, max_steps=20, window=10, polish_steps=20, num_eval_samples=10, progress=False, seed=1
            ).loc
        ),
        "local_flow": lambda: fit_local_flow(m, g, x, max_steps=10, window=5, num_eval_samples=10, seed=1).elbo,
        "gaps": lambda: torch.from_numpy(
            gap_decomposition(
                m,
                g,
                x,
                num_samples=30,
                seed=1,
                progress=False,
                mean_field_options={"max_steps": 20, "window": 10, "polish_steps": 20, "progress": False},
            )["estimate"].values
        ),
        "ais": lambda: torch.from_numpy(ais_log_px(m, g, x, num_steps=5, num_chains=2, seed=1)["log_px"].values),
        "bdmc": lambda: torch.from_numpy(
            bdmc(m, None, *simulate_data(m, x, seed=2), step_counts=(3,), num_chains=2, seed=1)["upper"].values
        ),
        "appendix_d": lambda: hmc_log_marginal(m, None, x, num_samples=20, warmup_steps=10, seed=1),
        "diagnostics": lambda: torch.from_numpy(collapse_diagnostics(m, g, x)["activity"].values),
    }


@pytest.mark.parametrize("build", [_vae64, _hier64], ids=["vae", "hierarchy"])
@pytest.mark.parametrize("name", list(_estimators(*_vae64())))
def test_every_estimator_runs_in_float64(build, name, one_thread):
    model, x = build()
    out = _estimators(model, x)[name]()
    out = torch.as_tensor(out)
    assert out.dtype == torch.float64, out.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(_estimators(*_vae64())))
def test_a_seeded_call_leaves_the_callers_random_state_alone(name, one_thread):
    """Every one, the per-datapoint ELBO and the KL per dimension included (QA: with seed= they
    passed it on to the guide, TypeError, and without one they advanced the caller's stream)."""
    model, x = _hier64()
    call = _estimators(model, x)[name]
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = torch.as_tensor(call())
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.manual_seed(999)  # another caller state: the seeded result does not depend on it
    second = torch.as_tensor(call())
    torch.testing.assert_close(first, second, rtol=0, atol=0, equal_nan=True)


def test_an_unknown_keyword_is_refused_naming_the_estimator_and_its_options():
    """estimate("iw", ..., num_chains=3) passed AIS's option on to the model, which raised a
    TypeError from inside Pyro (and a model taking **kwargs would have ignored it)."""
    import pyro
    from pyro import distributions as dist

    from ppl_vae.inference import estimators
    from ppl_vae.models import build_vae

    vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.3))
    with pytest.raises(ValueError, match="estimator 'iw' has no option 'num_chains'.*its options: num_samples"):
        estimators.estimate("iw", vae.model, vae.guide, x, seed=0, num_chains=3)

    def model(x, **kwargs):  # a hand-written pair taking any keyword
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    xs = torch.randn(3, 1)
    with pytest.raises(ValueError, match="has no option 'num_sample'"):
        estimators.estimate("iw", model, guide, xs, seed=0, num_sample=5)
    est = estimators.estimate("iw", model, guide, xs, seed=0, num_samples=5, y=torch.zeros(3))  # a tensor: the model's
    assert est.log_px.shape == (3,)
