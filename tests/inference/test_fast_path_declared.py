"""A subclass that overrides the Pyro program without re-declaring the fast path is scored as the
program it wrote: the issue's tempered model (the joint scaled by 0.5, a power posterior)."""

from __future__ import annotations

import types

import pyro
import pytest
import torch

from ppl_vae.inference.fused import supports_fused_elbo
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.latents import fast_pair
from ppl_vae.models import build_vae
from ppl_vae.models.vae import FAST_PATH_MEMBERS, VAE


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
