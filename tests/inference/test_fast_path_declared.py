"""A subclass that overrides the Pyro program without re-declaring the fast path is scored as the
program it wrote: the issue's tempered model (the joint scaled by 0.5, a power posterior)."""

from __future__ import annotations

import math
import types

import pyro
import pytest
import torch

from ppl_vae.inference.fused import supports_fused_elbo
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.latents import fast_pair
from ppl_vae.models import build_vae
from ppl_vae.models.vae import ENCODER_GUIDE_MEMBERS, FAST_PATH_MEMBERS, VAE


def _pair():
    torch.manual_seed(0)
    base = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=16)

    class Tempered(type(base)):  # type: ignore[misc]
        def model(self, x, y=None, *, num_data=None, kl_weight=1.0):
            with pyro.poutine.scale(scale=0.5):
                return super().model(x, y, num_data=num_data, kl_weight=kl_weight)

    user = Tempered(base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape)
    x = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    return base, user, x


def test_the_tempered_subclass_is_scored_as_the_program_it_wrote():
    base, user, x = _pair()
    assert base.has_fast_path and not user.has_fast_path
    assert fast_pair(user.model, user.guide) is None and not supports_fused_elbo(user)
    est_base = importance_estimate(base.model, base.guide, x, num_samples=200, seed=0)
    est_user = importance_estimate(user.model, user.guide, x, num_samples=200, seed=0)
    # same weights, same seed: with the tempered joint the log weights are 0.5 log p(x,z) - log q(z|x),
    # so the estimates differ by far more than their Monte Carlo error (they were equal before)
    base_v, user_v = (e.log_px for e in (est_base, est_user))
    base_se, user_se = (e.log_px_stderr for e in (est_base, est_user))
    assert bool(((base_v - user_v).abs() > 10 * (base_se + user_se)).all())
    # and the traced numbers are the tempered program's: through the base model's traces by hand
    traced = importance_estimate(lambda x, **k: _scaled(base.model, x, **k), base.guide, x, num_samples=200, seed=0)
    assert torch.allclose(traced.log_px, user_v, atol=1e-4)


def _scaled(model, x, **kwargs):
    with pyro.poutine.scale(scale=0.5):
        return model(x, **kwargs)


@pytest.mark.parametrize("member", FAST_PATH_MEMBERS)
def test_overriding_any_member_drops_the_declaration_and_re_declaring_keeps_it(member):
    def passthrough(self, *args, **kwargs):
        return getattr(super(type(self), self), member)(*args, **kwargs)

    dropped = type("Dropped", (VAE,), {member: passthrough})
    kept = type("Kept", (VAE,), {member: passthrough, "has_fast_path": True})
    plain = type("Plain", (VAE,), {"extra": 1})
    assert not dropped.has_fast_path and kept.has_fast_path and plain.has_fast_path


def test_a_member_from_a_mixin_or_set_on_the_instance_is_not_covered_by_the_declaration():
    """The declaration covers the members as the declaring class had them. A mixin earlier in the
    MRO (class MyVAE(Tempered, VAE)) supplied a tempered `model` that kept has_fast_path, so
    `fit --model` of such a plugin trained and scored the base model; a `model` set on the
    instance was scored as the base's too. Both now go through the program written."""
    base, user, x = _pair()

    class TemperedMixin:
        def model(self, x, y=None, **kwargs):
            return _scaled(lambda *a, **k: VAE.model(self, *a, **k), x, y=y, **kwargs)

    class Mixed(TemperedMixin, type(base)):  # type: ignore[misc]
        pass

    class Subclass(type(base)):  # type: ignore[misc]  (inherits the declaration with its members)
        pass

    mixed = Mixed(base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape)
    assert not Mixed.has_fast_path and Subclass.has_fast_path
    assert fast_pair(mixed.model, mixed.guide) is None and not supports_fused_elbo(mixed)
    est = importance_estimate(mixed.model, mixed.guide, x, num_samples=200, seed=0)
    assert torch.allclose(est.log_px, importance_estimate(user.model, user.guide, x, num_samples=200, seed=0).log_px)

    patched = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=16)
    patched.load_state_dict(base.state_dict())
    patched.model = types.MethodType(TemperedMixin.model, patched)
    assert patched.has_fast_path and fast_pair(patched.model, patched.guide) is None
    assert not supports_fused_elbo(patched)
    est = importance_estimate(patched.model, patched.guide, x, num_samples=200, seed=0)
    assert torch.allclose(est.log_px, importance_estimate(user.model, user.guide, x, num_samples=200, seed=0).log_px)


def test_a_mixin_member_drops_the_batched_enumerated_elbo_too():
    from ppl_vae.models.discrete import ENUMERATED_FAST_PATH_MEMBERS, GaussianMixtureVAE

    for member in ENUMERATED_FAST_PATH_MEMBERS:
        mixin = type("Mixin", (), {member: lambda self, *a, **k: None})
        mixed = type("Mixed", (mixin, GaussianMixtureVAE), {})
        assert not mixed.has_enumerated_fast_path, member
    assert type("Plain", (GaussianMixtureVAE,), {}).has_enumerated_fast_path


class Lying(VAE):
    """Tempers the joint (a power posterior) and declares the fast path again: a promise it breaks."""

    has_fast_path = True

    def model(self, x, y=None, *, num_data=None, kl_weight=1.0):
        with pyro.poutine.scale(scale=0.5):
            return super().model(x, y, num_data=num_data, kl_weight=kl_weight)


def _register_lying(monkeypatch) -> None:
    """Model "lying": gaussian_mlp built as :class:`Lying`, registered for the test only."""
    import dataclasses

    from ppl_vae.models.zoo import MODELS

    spec = MODELS.get("gaussian_mlp")

    def build_lying(*args, **kwargs):
        vae = spec.build(*args, **kwargs)
        vae.__class__ = Lying
        return vae

    monkeypatch.setitem(MODELS._entries, "lying", dataclasses.replace(spec, build=build_lying))


def test_a_user_class_that_re_declares_the_fast_path_is_verified_before_training(tmp_path, monkeypatch, one_thread):
    """A subclass overriding `model` and declaring has_fast_path again trained as its base class:
    a user's class that declares the fast path is now checked against its Pyro program on a few
    test points before any file is written; one that keeps its promise trains as before, on the
    same random numbers."""
    import ppl_vae
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.inference.training import train

    class Honest(VAE):
        has_fast_path = True  # the same program: the declaration holds

    data = ppl_vae.load_dataset("digits", train_size=100)
    config = TrainConfig(epochs=1, batch_size=50, device="cpu", train_eval_size=50)

    def built(cls):
        torch.manual_seed(0)
        vae = build_vae("gaussian_mlp", data.event_shape, latent_dim=2, hidden_dim=8)
        return cls(vae.encoder, vae.decoder, vae.prior, vae.likelihood, vae.event_shape)

    with pytest.raises(ValueError, match="the fast path of Lying differs from its model/guide"):
        train(built(Lying), data, config, progress=False)
    histories = []
    for cls in (VAE, Honest):
        torch.manual_seed(1)
        histories.append(train(built(cls), data, config, progress=False))
    assert histories[0].train_loss.values.tolist() == histories[1].train_loss.values.tolist()

    # through fit and a registered model: refused before the run directory is made
    _register_lying(monkeypatch)
    run = RunConfig(ModelConfig(model="lying", latent_dim=2, hidden_dim=8), DataConfig(train_size=100), config)
    with pytest.raises(ValueError, match="the fast path of Lying differs"):
        ppl_vae.fit(run, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_scoring_a_run_checks_the_declared_fast_path_too(tmp_path, monkeypatch, one_thread):
    """A run trained before the check (or a plugin edited since) was scored by evaluate and
    compare as its base class; a class whose fast path cannot run at all (a cvae's encoder needs y)
    gave a raw TypeError. Both are one-line ValueErrors now, wherever a run's data is read."""
    import ppl_vae
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.inference import latents
    from ppl_vae.inference.training import train
    from ppl_vae.models.cvae import ConditionalVAE
    from ppl_vae.reports.common import select_datapoints

    _register_lying(monkeypatch)
    config = RunConfig(
        ModelConfig(model="lying", latent_dim=2, hidden_dim=8),
        DataConfig(train_size=100),
        TrainConfig(epochs=1, batch_size=50, device="cpu", train_eval_size=50),
    )
    with monkeypatch.context() as before_the_check:
        before_the_check.setattr(latents, "verify_declared_fast_path", lambda *a, **k: None)
        ppl_vae.fit(config, tmp_path / "run", progress=False)
    run = ppl_vae.load_run(tmp_path / "run", history=False)
    with pytest.raises(ValueError, match="the fast path of Lying differs from its model/guide"):
        select_datapoints(run, "test", 10)

    class DeclaredCVAE(ConditionalVAE):
        has_fast_path = True  # the base VAE's protocol calls the encoder without y: it cannot run

    data = ppl_vae.load_dataset("digits", train_size=100)
    vae = build_vae("cvae", data.event_shape, latent_dim=2, hidden_dim=8, data_info=data.data_info)
    vae.__class__ = DeclaredCVAE
    with pytest.raises(ValueError, match="DeclaredCVAE declares has_fast_path, but its fast path fails on 8 points"):
        train(vae, data, config.train, progress=False)


class _WideGuide(VAE):
    """QA's subclass: q widened x3 in both `guide` and `sample_guide`, the fast path re-declared
    (the two sides are in step), `encoder_is_guide` inherited. The methods and analyses that call
    the encoder directly trained and scored the base class's narrower q (compare printed an
    approximation gap of -0.25 ± 0.01 nats, impossible in expectation)."""

    has_fast_path = True

    def guide(self, x, y=None, *, num_data=None, kl_weight=1.0):
        from ppl_vae.models.vae import data_plate

        with data_plate(x, num_data):
            loc, scale = self.encoder(x)
            with pyro.poutine.scale(scale=kl_weight):
                return pyro.sample("z", pyro.distributions.Normal(loc, 3.0 * scale).to_event(1))

    def sample_guide(self, x, num_particles=None, y=None):
        loc, scale = self.encoder(x)
        return self.sample_gaussian_guide(loc, 3.0 * scale, num_particles)


@pytest.mark.parametrize("member", ENCODER_GUIDE_MEMBERS)
def test_overriding_the_guide_drops_encoder_is_guide_unless_re_declared(member):
    def passthrough(self, *args, **kwargs):
        return getattr(super(type(self), self), member)(*args, **kwargs)

    dropped = type("Dropped", (VAE,), {member: passthrough})
    kept = type("Kept", (VAE,), {member: passthrough, "encoder_is_guide": True})
    assert not dropped.encoder_is_guide and kept.encoder_is_guide and VAE.encoder_is_guide
    assert not _WideGuide.encoder_is_guide and _WideGuide.has_fast_path


@pytest.mark.parametrize(
    "setting, refused",
    [
        (dict(method="wake-sleep"), "method 'wake-sleep'"),
        (dict(method="sa"), "method 'sa'"),
        (dict(method="mcem"), "method 'mcem'"),
    ],
)
def test_methods_that_call_the_encoder_refuse_a_guide_that_is_not_its_gaussian(setting, refused):
    from ppl_vae.config import TrainConfig
    from ppl_vae.errors import ConfigError
    from ppl_vae.inference.capabilities import check_compatible

    torch.manual_seed(0)
    base = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    wide = _WideGuide(base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape)
    with pytest.raises(ConfigError, match=refused) as caught:
        check_compatible(wide, TrainConfig(device="cpu", **setting))
    assert "\n" not in str(caught.value) and "encoder" in str(caught.value)
    check_compatible(base, TrainConfig(device="cpu", **setting))  # the base class is accepted


def test_the_disentangling_objectives_take_their_terms_from_the_widened_guide():
    """beta-VAE's terms read the encoder's (loc, scale) for an encoder guide; for the widened
    guide they now come from its own draws: log q is the x3-wider density at z drawn from it."""
    from ppl_vae.inference.disentangle import latent_terms

    torch.manual_seed(0)
    base = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    wide = _WideGuide(base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape)
    x = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    terms = latent_terms(wide, x, num_particles=4000)
    _, scale = base.encoder(x)
    # E_q[log q] is minus the entropy of N(loc, (3 scale)^2): log 3 = 1.1 nats per dimension below
    # the encoder's own Gaussian's
    neg_entropy = -(torch.log(3.0 * scale).sum(-1) + scale.shape[-1] * 0.5 * (1 + math.log(2 * math.pi)))
    log_q = terms["log_q"]
    se = log_q.std(0) / math.sqrt(log_q.shape[0])
    assert bool(((log_q.mean(0) - neg_entropy).abs() < 4 * se).all()), (log_q.mean(0), neg_entropy, se)


def test_the_gap_decomposition_scores_the_widened_guide_it_was_given(one_thread):
    """MIS draws q from the subclass's own guide and scores q* draws under it: the approximation
    gap log p̂ − L[q*] is >= 0 in expectation, and the fast path (which read the encoder) is not
    taken for it."""
    from ppl_vae.analysis.gaps import _fast_mixture_pair, mixture_estimates
    from ppl_vae.inference.meanfield import fit_mean_field

    torch.manual_seed(0)
    base = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=16)
    wide = _WideGuide(base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape).eval()
    x = (torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    q_star = fit_mean_field(wide.model, wide.guide, x, max_steps=200, seed=0).guide()
    assert _fast_mixture_pair(wide.model, wide.guide, q_star, {}) is None
    est = mixture_estimates(wide.model, wide.guide, q_star, x, num_samples=2000, seed=0)
    gap, se = est["approximation_gap"], est["approximation_gap_stderr"]
    mean, mean_se = float(gap.mean()), float((se**2).sum().sqrt()) / len(gap)
    assert mean > -3 * mean_se, (mean, mean_se)
    # and log q at q*'s draws is the widened density: L[q] is the subclass's own ELBO, below the
    # base encoder's by the KL cost of the wider q on average (checked against Pyro's Trace_ELBO)
    from ppl_vae.inference.importance import elbo_per_datapoint

    traced = elbo_per_datapoint(wide.model, wide.guide, x, num_particles=2000)
    diff = est["elbo_amortized"] - traced  # two estimates from 2000 draws of the same q: se sqrt(2) times each's
    assert bool((diff.abs() < 4 * math.sqrt(2) * est["elbo_amortized_stderr"]).all()), diff


def test_the_python_estimators_check_a_declared_fast_path_on_first_use(one_thread):
    """QA: fit and the run commands check a user's re-declared fast path, but the Python API's
    estimators trusted it and returned the base class's numbers (IW -49.8 for a tempered model
    whose own program scores -25.0). Each now checks the class on the data it is given, once."""
    from ppl_vae.inference import estimators
    from ppl_vae.inference.importance import elbo_per_datapoint
    from ppl_vae.inference.latents import _VERIFIED

    torch.manual_seed(0)
    base = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    x = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    calls = [
        lambda m: estimators.estimate("iw", m.model, m.guide, x, seed=0, num_samples=50),
        lambda m: estimators.estimate("ais", m.model, m.guide, x, seed=0, num_steps=3, num_chains=2),
        lambda m: elbo_per_datapoint(m.model, m.guide, x, num_particles=5),
    ]
    for call in calls:
        lying = Lying(base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape).eval()
        with pytest.raises(ValueError, match="the fast path of Lying differs from its model/guide"):
            call(lying)
    honest = type("Honest", (VAE,), {"has_fast_path": True})(
        base.encoder, base.decoder, base.prior, base.likelihood, base.event_shape
    ).eval()
    rng = torch.get_rng_state()
    got = estimators.estimate("iw", honest.model, honest.guide, x, seed=0, num_samples=50).log_px
    assert honest in _VERIFIED and torch.equal(torch.get_rng_state(), rng)
    base.eval()
    assert torch.equal(got, estimators.estimate("iw", base.model, base.guide, x, seed=0, num_samples=50).log_px)
