"""Disentangling objectives against closed forms and identities; their steps, resume and errors."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import ppl_vae
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.disentangle import (
    beta_vae_loss,
    capacity_at,
    capacity_loss,
    free_bits_loss,
    latent_terms,
    tc_decomposition,
)
from ppl_vae.inference.fused import fused_elbo_loss
from ppl_vae.inference.training import make_stepper, validate_train_config
from ppl_vae.models import build_vae

OBJECTIVE_NAMES = ("beta_vae", "capacity", "beta_tc", "free_bits")


def _vae(prior: str = "standard_normal", latent_dim: int = 3):
    torch.manual_seed(0)
    opts = {"num_components": 3} if prior == "mixture_of_gaussians" else {}
    return build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=latent_dim, hidden_dim=16, prior=prior, prior_options=opts)


def _x(n: int = 32) -> torch.Tensor:
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_beta_one_and_a_zero_floor_are_the_elbo(analytic_kl):
    vae, x = _vae(), _x()
    losses = []
    for fn in (
        lambda: fused_elbo_loss(vae, x, num_data=100, analytic_kl=analytic_kl, kl_weight=0.7),
        lambda: beta_vae_loss(vae, x, beta=1.0, num_data=100, analytic_kl=analytic_kl, kl_weight=0.7)[0],
        lambda: free_bits_loss(vae, x, free_bits=0.0, num_data=100, analytic_kl=analytic_kl, kl_weight=0.7)[0],
    ):
        torch.manual_seed(5)  # the same draw of z: the identity is exact, not statistical
        losses.append(fn())
    assert torch.allclose(losses[1], losses[0], rtol=1e-6) and torch.allclose(losses[2], losses[0], rtol=1e-6)
    torch.manual_seed(5)
    beta4 = beta_vae_loss(vae, x, beta=4.0, num_data=100, analytic_kl=analytic_kl)[0]
    torch.manual_seed(5)
    terms = latent_terms(vae, x, analytic_kl=analytic_kl)
    expected = -100 / 32 * (terms["log_lik"] - 4 * terms["kl"]).sum()
    assert float(beta4.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_zero_capacity_with_unit_gamma_is_the_elbo_and_the_floor_binds_below_lambda():
    vae, x = _vae(), _x()
    torch.manual_seed(2)
    elbo = fused_elbo_loss(vae, x, num_data=64, analytic_kl=True)
    torch.manual_seed(2)
    cap, _ = capacity_loss(vae, x, capacity=0.0, gamma=1.0, num_data=64, analytic_kl=True)
    assert torch.allclose(cap, elbo, rtol=1e-6)  # the analytic KL is >= 0, so |KL - 0| = KL
    torch.manual_seed(2)
    floored, t = free_bits_loss(vae, x, free_bits=50.0, num_data=64, analytic_kl=True)
    # every dimension's KL is far below 50 nats: the penalty is exactly D * 50, no gradient to the encoder
    assert float(t["kl_dims"].detach().mean(0).max()) < 50
    expected = -(t["log_lik"].sum() - 32 * 3 * 50.0) * 2
    assert torch.allclose(floored, expected, rtol=1e-6)
    floored.backward()
    enc_grads = [p.grad for p in vae.encoder.parameters()]
    dec_grads = [p.grad for p in vae.decoder.parameters()]
    assert all(g is not None for g in dec_grads) and any(float(g.abs().sum()) > 0 for g in dec_grads)
    # the encoder's gradient is the reconstruction's only (through z), not the KL's
    assert all(g is not None for g in enc_grads)


def test_capacity_rises_linearly_between_its_epochs():
    kw = dict(capacity_max=20.0, start_epoch=1.0, end_epoch=3.0)
    assert [capacity_at(s, 10, **kw) for s in (0, 10, 15, 20, 30, 45)] == [0.0, 0.0, 5.0, 10.0, 20.0, 20.0]


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_beta_tc_terms_sum_to_the_minibatch_kl(estimator):
    vae, x = _vae(), _x(40)
    torch.manual_seed(3)
    t = latent_terms(vae, x, num_particles=2)
    parts = tc_decomposition(t["z"], t["loc"], t["scale"], t["log_prior"], num_data=1000, estimator=estimator)
    total = parts["mutual_info"] + parts["total_correlation"] + parts["dimwise_kl"]
    assert torch.allclose(total, (t["log_q"] - t["log_prior"]).mean(0), atol=1e-4)
    assert torch.allclose(total, t["kl"], atol=1e-4)


def _gaussian_draws(loc: torch.Tensor, scale: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (loc + scale * torch.randn(loc.shape, generator=g)).unsqueeze(0)


def test_dimension_wise_kl_of_a_factorized_q_matches_the_closed_form():
    """q(z|x) = N(m, s^2) for every x: q(z) = N(m, s^2) exactly, so MI = TC = 0 and the dimension-wise
    KL is sum_j KL(N(m_j, s_j^2) || N(0, 1)). Under mws every log q carries -log N (Chen et al.'s
    normalization), so its dimension-wise term is the closed form minus D log N."""
    n, m, s = 500, torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.8, 1.5, 0.3])
    loc, scale = m.expand(n, 3), s.expand(n, 3)
    z = _gaussian_draws(loc, scale, seed=11)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    closed = float(
        torch.distributions.kl_divergence(torch.distributions.Normal(m, s), torch.distributions.Normal(0.0, 1.0)).sum()
    )
    for estimator, num_data, offset in (("mss", n, 0.0), ("mss", 10 * n, 0.0), ("mws", n, -3 * math.log(n))):
        parts = tc_decomposition(z, loc, scale, log_prior, num_data=num_data, estimator=estimator)
        dimwise = parts["dimwise_kl"]
        se = float(dimwise.std()) / math.sqrt(n)
        assert abs(float(dimwise.mean()) - (closed + offset)) < 3 * se, estimator
        if estimator == "mss":
            assert float(parts["mutual_info"].abs().max()) < 1e-4
            assert float(parts["total_correlation"].abs().max()) < 1e-4


def test_total_correlation_of_correlated_codes_matches_the_gaussian_closed_form():
    """loc_i = (u_i, u_i) with u at the quantiles of N(0, a^2), scale s: q(z) is (to the mixture's
    resolution: 1500 components spaced far closer than s) N(0, [[a^2+s^2, a^2], [a^2, a^2+s^2]]), so
    TC = -log(1 - rho^2)/2 with rho = a^2/(a^2+s^2), MI = log(det Sigma / s^4)/2 and the dimension-wise
    KL is 2 KL(N(0, a^2+s^2) || N(0, 1)). (Under mws each term would be off by its multiple of log N.)"""
    n, a, s = 1500, 1.0, 0.5
    u = a * torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n) + 0.5) / n)
    loc, scale = torch.stack([u, u], -1), torch.full((n, 2), s)
    z = _gaussian_draws(loc, scale, seed=4)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    parts = tc_decomposition(z, loc, scale, log_prior, num_data=n, estimator="mss")
    v = a**2 + s**2
    rho = a**2 / v
    for name, closed in (
        ("total_correlation", -0.5 * math.log(1 - rho**2)),
        ("mutual_info", 0.5 * math.log((v**2 - a**4) / s**4)),
        ("dimwise_kl", 2 * 0.5 * (v - 1 - math.log(v))),
    ):  # q(z_j) = N(0, v) against N(0, 1)
        values = parts[name]
        se = float(values.std()) / math.sqrt(n)
        assert abs(float(values.mean()) - closed) < 3 * se, (name, float(values.mean()), closed)


def _config(objective: str, epochs: int = 2, **train) -> RunConfig:
    weights = {  # each objective's own settings only: another's is refused as not applying
        "beta_vae": dict(beta=4.0),
        "beta_tc": dict(tc_beta=6.0),
        "free_bits": dict(free_bits=0.5),
        "capacity": dict(capacity_max=5.0, capacity_end_epoch=3.0, gamma=10.0),
    }
    defaults = dict(
        epochs=epochs, batch_size=50, lr=3e-3, device="cpu", objective=objective, **weights.get(objective, {})
    )
    defaults.update(train)
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=3, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200),
        train=TrainConfig(**defaults),
    )


@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
@pytest.mark.parametrize("prior", ["standard_normal", "mixture_of_gaussians"])
def test_each_objective_takes_a_step_that_changes_parameters(objective, prior):
    vae, x = _vae(prior), _x()
    # per-dimension KL needs a diagonal Normal prior (free_bits_groups applies to free_bits alone)
    groups = {"free_bits_groups": 1} if prior == "mixture_of_gaussians" and objective == "free_bits" else {}
    config = _config(objective, **groups).train
    validate_train_config(config)
    stepper = make_stepper(vae, config)
    stepper.begin(0, 4)
    before = [p.detach().clone() for p in vae.parameters()]
    loss = stepper.step(x, num_data=200)
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, vae.parameters())]
    assert all(changed[:2]) and sum(changed) >= len(changed) - 2  # prior buffers aside
    terms = stepper.epoch_terms()
    assert {"kl", "reconstruction"} <= set(terms) and all(math.isfinite(v) for v in terms.values())
    if objective == "beta_tc":
        assert terms["mutual_info"] + terms["total_correlation"] + terms["dimwise_kl"] == pytest.approx(
            terms["kl"], abs=1e-3
        )
    assert stepper.epoch_terms() == ({"capacity": pytest.approx(5.0 / 12)} if objective == "capacity" else {})


def test_free_bits_per_dimension_refuses_a_prior_without_independent_dimensions():
    vae = _vae("mixture_of_gaussians")
    with pytest.raises(ValueError, match="free_bits_groups=1"):
        free_bits_loss(vae, _x(), free_bits=0.5)


def test_capacity_run_resumed_equals_an_uninterrupted_one_and_records_its_terms(tmp_path):
    straight = ppl_vae.fit(_config("capacity", epochs=4), tmp_path / "a", progress=False)
    ppl_vae.fit(_config("capacity", epochs=2), tmp_path / "b", progress=False)
    resumed = ppl_vae.resume(tmp_path / "b", epochs=4, progress=False)
    for (k, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), k
    h, r = straight.history, resumed.history
    assert r.capacity.values.tolist() == h.capacity.values.tolist() == pytest.approx([5 / 3, 10 / 3, 5.0, 5.0])
    assert r.kl.values.tolist() == h.kl.values.tolist()
    assert ppl_vae.load_run(tmp_path / "b").config.train.objective == "capacity"


def test_beta_tc_history_records_the_three_parts(tmp_path):
    run = ppl_vae.fit(_config("beta_tc", epochs=1, tc_estimator="mss"), tmp_path / "run", progress=False)
    h = run.history
    for name in ("kl", "reconstruction", "mutual_info", "total_correlation", "dimwise_kl"):
        assert h[name].dims == ("epoch",) and h[name].attrs["description"]
    total = h.mutual_info + h.total_correlation + h.dimwise_kl
    assert float(abs(total - h.kl).max()) < 1e-3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta", 0.0, "train.beta must be a positive"),
        ("beta", float("nan"), "train.beta must be a finite number > 0, got nan"),
        ("tc_beta", -1.0, "train.tc_beta must be a positive"),
        ("free_bits", -0.1, "train.free_bits must be a finite number >= 0"),
        ("capacity_end_epoch", -1.0, "train.capacity_end_epoch"),
        ("tc_estimator", "exact", "train.tc_estimator must be one of mws, mss"),
        ("objective", "vampire", "train.objective must be one of"),
    ],
)
def test_bad_objective_settings_are_refused_naming_the_field(field, value, message):
    objective = {
        "beta": "beta_vae",
        "tc_beta": "beta_tc",
        "free_bits": "free_bits",
        "tc_estimator": "beta_tc",
        "capacity_end_epoch": "capacity",
        "objective": "elbo",
    }[field]
    config = _config(objective).train
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=message):
        validate_train_config(config)


def test_a_capacity_schedule_ending_before_it_starts_and_another_method_are_refused():
    with pytest.raises(ConfigError, match="would end before it starts"):
        validate_train_config(_config("capacity", capacity_start_epoch=5.0, capacity_end_epoch=2.0).train)
    with pytest.raises(ConfigError, match=r"replaces the loss of method\(s\) \'svi\' only; train.method is \'iwae\'"):
        make_stepper(_vae(), _config("beta_vae", method="iwae").train)


def test_fit_cli_records_the_objective_and_refuses_bad_weights(tmp_path):
    runner = CliRunner()
    args = [
        "fit",
        "--model",
        "bernoulli_mlp",
        "--latent-dim",
        "2",
        "--hidden-dim",
        "8",
        "--train-size",
        "100",
        "--epochs",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    ok = runner.invoke(cli, [*args, "--objective", "beta_tc", "--tc-beta", "6", "--out", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    config = ppl_vae.load_run(tmp_path / "r").config.train
    assert (config.objective, config.tc_beta) == ("beta_tc", 6.0)
    for flags, text in (
        (["--objective", "beta_vae", "--beta", "nan"], "--beta must be a finite number > 0"),
        (["--objective", "free_bits", "--free-bits", "-1"], "--free-bits must be"),
        (
            ["--objective", "capacity", "--capacity-start-epoch", "4", "--capacity-end-epoch", "1"],
            "would end before it starts",
        ),
    ):
        bad = runner.invoke(cli, [*args, *flags, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 1 and text in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
    assert not (tmp_path / "bad").exists()
