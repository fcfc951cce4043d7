"""The estimators' one interface: calling convention, result type, registry, options.

Every registered estimator is called as ``(model, guide, x, *, seed, batch_size, progress=False,
<options>)`` and returns an :class:`~ppl_vae.inference.estimators.Estimate` whose dataset has
the same variable names and dims for every estimator; a registration that breaks the convention
or takes an undeclared option is refused at import; an option an estimator does not take is
refused in one line naming both. (The numbers are pinned in test_estimator_pins.py and checked
against closed forms in each estimator's own tests.)
"""

from __future__ import annotations

import inspect

import pytest
import torch

from ppl_vae.inference import estimators
from ppl_vae.inference.estimators import BOUNDS, ESTIMATORS, Estimate, register_estimator
from ppl_vae.inference.local_flows import fit_local_flow
from ppl_vae.inference.meanfield import fit_mean_field
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

SMALL = {
    "iw": dict(num_samples=20),
    "jackknife": dict(num_samples=20),
    "ais": dict(num_steps=5, num_chains=2),
    "bdmc": dict(num_steps=(3, 5), num_chains=2),
    "mis": dict(num_samples=20, mean_field_options={"max_steps": 20, "window": 10, "polish_steps": 5}),
    "appendix_d": dict(num_samples=10, warmup_steps=5, num_leapfrog_steps=2),
}


def test_every_builtin_estimator_is_registered_and_tested_here():
    assert set(estimators.names()) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_one_calling_convention_and_one_result_type(name):
    torch.manual_seed(0)
    vae = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5)
    x = torch.randn(3, 4)
    est = estimators.get(name)
    params = inspect.signature(est.fn).parameters
    assert [p for p in params if params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == ["model", "guide", "x"]
    assert params["progress"].default is False and params["seed"].default is None
    result = est(vae.model, vae.guide, x, seed=1, **SMALL[name])
    assert isinstance(result, Estimate) and result.estimator == name and result.bound == est.bound
    assert result.log_px.shape == result.log_px_stderr.shape == (3,)
    assert torch.isfinite(result.log_px).all()
    ds = result.to_dataset(datapoint=[7, 8, 9])
    assert ds["log_px"].dims == ("datapoint",) and ds["datapoint"].values.tolist() == [7, 8, 9]
    assert ds.attrs["estimator"] == name
    for v in ds.data_vars:
        assert ds[v].dims[-1] == "datapoint", v
        assert ds[v].attrs["bound"] in BOUNDS and ds[v].attrs["long_name"], v
    again = est(vae.model, vae.guide, x, seed=1, **SMALL[name])  # the seed fixes every number
    assert torch.equal(again.log_px, result.log_px)


def test_registration_refuses_a_broken_convention_and_undeclared_options(monkeypatch):
    monkeypatch.setattr(ESTIMATORS, "_entries", dict(ESTIMATORS._entries))
    monkeypatch.setattr(ESTIMATORS, "_docs", dict(ESTIMATORS._docs))
    with pytest.raises(TypeError, match=r"must take \(model, guide, x, \*, ...\), takes \(model, x\)"):

        @register_estimator("bad_order", title="t", bound="lower bound")
        def bad_order(model, x, *, seed=None, batch_size=1, progress=False): ...

    with pytest.raises(TypeError, match="options lr not declared"):

        @register_estimator("bad_option", title="t", bound="lower bound")
        def bad_option(model, guide, x, *, seed=None, batch_size=1, progress=False, lr=0.1): ...

    with pytest.raises(TypeError, match="progress must default to False"):

        @register_estimator("bad_progress", title="t", bound="lower bound")
        def bad_progress(model, guide, x, *, seed=None, batch_size=1, progress=True): ...

    with pytest.raises(ValueError, match="bound must be one of"):
        register_estimator("bad_bound", title="t", bound="lower")
    assert not {"bad_order", "bad_option", "bad_progress", "bad_bound"} & set(ESTIMATORS.names())


def test_options_an_estimator_does_not_take_are_refused_naming_both():
    with pytest.raises(
        ValueError, match=r"^--num-chains does not apply to estimator 'iw' \(it applies to ais, bdmc\)$"
    ):
        estimators.check_options("iw", {"num_chains": 4}, given=["num_chains"])
    with pytest.raises(ValueError, match="--num-samples must be >= 1, got 0"):
        estimators.check_options("iw", {"num_samples": 0}, given=["num_samples"])
    with pytest.raises(ValueError, match="--ais-steps 2000000 is far beyond"):
        estimators.check_options("ais", {"num_steps": [2_000_000]}, given=["num_steps"])
    with pytest.raises(ValueError, match="--schedule must be one of sigmoid, linear"):
        estimators.check_options("ais", {"schedule": "cosine"}, given=["schedule"])
    with pytest.raises(ValueError, match="AIS takes one number of temperatures"):
        torch.manual_seed(0)
        vae = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5)
        estimators.estimate("ais", vae.model, None, torch.randn(2, 4), num_steps=(3, 4))
    assert estimators.check_options("ais", {"num_steps": [5]}, given=["num_steps"]) == {"num_steps": [5]}


def test_the_old_argument_order_is_refused_in_one_line():
    vae = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5)
    x = torch.randn(3, 4)
    for fit in (fit_mean_field, fit_local_flow):
        with pytest.raises(TypeError, match=r"takes \(model, guide, x, \*, ...\) like every estimator"):
            fit(vae.model, x, vae.guide)
        with pytest.raises(TypeError, match="multiple values for argument 'guide'"):
            fit(vae.model, x, guide=vae.guide)


def test_the_estimates_say_what_they_bound():
    assert estimators.get("iw").bound == "lower bound"
    assert estimators.get("jackknife").bound == "neither"
    assert estimators.get("appendix_d").bound == "neither"
    assert {estimators.get(n).bound for n in estimators.names()} <= set(BOUNDS)


def test_a_per_datapoint_guide_is_sliced_with_its_batches():
    """A mean-field q* (one row per datapoint) scores in any batch size, the same as in one batch."""
    from ppl_vae.inference.importance import importance_estimate

    torch.manual_seed(0)
    vae = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5)
    x = torch.randn(7, 4)
    q_star = fit_mean_field(vae.model, vae.guide, x, max_steps=20, window=10, polish_steps=5, seed=0).guide()
    whole = importance_estimate(vae.model, q_star, x, num_samples=30, batch_size=7, seed=1)
    parts = importance_estimate(vae.model, q_star, x, num_samples=30, batch_size=3, seed=1)
    assert torch.isfinite(parts.log_px).all() and parts.log_px.shape == (7,)
    # the same rows of q* meet the same datapoints: within Monte Carlo error of each other
    assert ((parts.log_px - whole.log_px).abs() < 4 * (parts.log_px_stderr + whole.log_px_stderr) + 1e-6).all()
