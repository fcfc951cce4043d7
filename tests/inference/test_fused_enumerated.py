"""The batched enumerated ELBO (M2, the GMVAE) against Pyro's TraceEnum_ELBO on the same model and
guide: equal losses and gradients at the same random state, for labelled and unlabelled points,
several particles and a KL weight; the training step takes it only where it is declared."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from ppl_vae.config import TrainConfig
from ppl_vae.inference.capabilities import offers
from ppl_vae.inference.fused import fused_enumerated_loss, supports_fused_elbo
from ppl_vae.inference.training import METHODS
from ppl_vae.models import build_vae
from ppl_vae.models.cvae import conditioned
from ppl_vae.models.discrete import ENUMERATED_FAST_PATH_MEMBERS, EnumeratedCategoricalVAE, GaussianMixtureVAE
from ppl_vae.models.networks import mlp

N = 12


def _model(name: str):
    torch.manual_seed(0)
    info = {"num_classes": 4, "num_train": N, "num_labelled": 5} if name == "m2" else {}
    vae = build_vae(name, (1, 8, 8), latent_dim=3, hidden_dim=16, data_info=info)
    x = torch.bernoulli(torch.full((N, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(1))
    # M2: five labelled points, the rest unlabelled (-1); in training mode the classifier term counts
    y = torch.tensor([0, 1, 2, 3, 1] + [-1] * (N - 5)) if name == "m2" else None
    return vae, x, y


def _loss_and_grads(fn, params):
    torch.manual_seed(5)
    loss = fn()
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", ["m2", "gmvae"])
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_the_batched_elbo_equals_trace_enum_elbo_at_the_same_random_state(name, num_particles, kl_weight):
    vae, x, y = _model(name)
    params = [p for p in vae.parameters() if p.requires_grad]
    kwargs = {} if y is None else {"y": y}
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=num_particles, vectorize_particles=num_particles > 1)
    pyro_loss, pyro_grads = _loss_and_grads(
        lambda: elbo.differentiable_loss(vae.model, vae.guide, x, num_data=100, kl_weight=kl_weight, **kwargs), params
    )
    loss, grads = _loss_and_grads(
        lambda: fused_enumerated_loss(vae, x, y=y, num_data=100, kl_weight=kl_weight, num_particles=num_particles),
        params,
    )
    assert torch.allclose(loss, pyro_loss, rtol=1e-6, atol=1e-3), (loss.item(), pyro_loss.item())
    for ours, theirs in zip(grads, pyro_grads):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-3 * theirs.abs().max().item() + 1e-6)
    # the random state mattered: another draw gives another loss (a check that cannot pass by accident)
    torch.manual_seed(6)
    other = fused_enumerated_loss(vae, x, y=y, num_data=100, kl_weight=kl_weight, num_particles=num_particles)
    assert not torch.allclose(other, loss)


def test_labelled_points_put_no_weight_off_their_label():
    vae, x, y = _model("m2")
    vae.eval()  # no classifier term: the ELBO of a labelled point is then L(x, y) alone
    torch.manual_seed(3)
    per_point = vae.enumerated_elbo(x, y)
    for i in range(5):  # each labelled point's ELBO is its clamped-to-y ELBO, whatever q(y|x) says
        torch.manual_seed(3)
        clamped = vae.enumerated_elbo(x, torch.full((N,), int(y[i])))
        assert torch.allclose(per_point[i], clamped[i], atol=1e-4)
    assert bool(torch.isfinite(per_point).all())


@pytest.mark.parametrize(
    "name, fused, expected",
    [("m2", True, True), ("gmvae", True, True), ("gmvae", False, False), ("relaxed_gmvae", True, False)],
)
def test_the_training_step_takes_the_batched_elbo_where_declared(name, fused, expected):
    info = {"num_classes": 10, "num_train": 50, "num_labelled": 10} if name == "m2" else {}
    vae = build_vae(name, (1, 8, 8), latent_dim=3, hidden_dim=16, data_info=info)
    stepper = METHODS.get("svi")(vae, TrainConfig(epochs=1, fused_elbo=fused))
    assert stepper._enumerated is expected
    # the relaxed model has no enumerated site: it trains through Pyro's Trace_ELBO
    assert offers(vae, "enumerated_fast_path") is (name != "relaxed_gmvae")


def test_a_step_through_the_batched_elbo_moves_every_part():
    vae, x, y = _model("gmvae")
    vae.mixture.logits.requires_grad_(True)  # p(c) trained too, to see it move
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    stepper = METHODS.get("svi")(vae, TrainConfig(epochs=1, lr=1e-2))
    assert stepper._enumerated
    stepper.step(x, num_data=N)
    moved = {k for k, v in vae.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert moved == set(before), set(before) - moved


@pytest.mark.parametrize("member", ENUMERATED_FAST_PATH_MEMBERS)
def test_overriding_a_member_drops_the_batched_elbo_and_re_declaring_keeps_it(member):
    def passthrough(self, *args, **kwargs):
        return getattr(super(type(self), self), member)(*args, **kwargs)

    dropped = type("Dropped", (GaussianMixtureVAE,), {member: passthrough})
    kept = type("Kept", (GaussianMixtureVAE,), {member: passthrough, "has_enumerated_fast_path": True})
    plain = type("Plain", (GaussianMixtureVAE,), {"extra": 1})
    assert not dropped.has_enumerated_fast_path and kept.has_enumerated_fast_path and plain.has_enumerated_fast_path
    assert not EnumeratedCategoricalVAE.has_enumerated_fast_path  # the base class declares no batched ELBO


def test_a_tempered_subclass_trains_as_the_program_it_wrote():
    base, x, _ = _model("gmvae")

    class Tempered(GaussianMixtureVAE):
        def model(self, x, y=None, **kwargs):
            with pyro.poutine.scale(scale=0.5):
                return super().model(x, y, **kwargs)

    user = Tempered(base.classifier, base.encoder, base.decoder, base.mixture, base.likelihood, base.event_shape)
    assert not supports_fused_elbo(user)
    stepper = METHODS.get("svi")(user, TrainConfig(epochs=1))
    assert not stepper._enumerated and not stepper.fused
    torch.manual_seed(5)
    tempered = stepper.loss(x, num_data=N)
    torch.manual_seed(5)
    full = fused_enumerated_loss(base, x, num_data=N)
    assert not torch.allclose(tempered, full)  # the scaled model is what trains, not the base class


def test_conditioned_equals_the_concatenation_it_replaces():
    torch.manual_seed(0)
    net = mlp([7 + 3, 5, 4], "relu")
    h = torch.randn(6, 7)
    onehot = torch.eye(3).unsqueeze(-2)  # (3, 1, 3): an enumerated site's values against 6 points
    cat = torch.cat([h.expand(3, 6, 7), onehot.expand(3, 6, 3)], -1)
    assert torch.allclose(conditioned(net, h, onehot), net(cat), atol=1e-6)


def test_hidden_dims_give_every_network_those_layers_and_the_batched_elbo_still_equals_pyros():
    """Rui Shu's GMVAE configuration is ``hidden_dims=[512, 512]`` with z = 64; here small."""
    torch.manual_seed(0)
    vae = build_vae("gmvae", (1, 8, 8), latent_dim=3, model_options={"hidden_dims": [8, 6]})
    widths = lambda m: [layer.out_features for layer in m.modules() if isinstance(layer, torch.nn.Linear)]  # noqa: E731
    assert (
        widths(vae.classifier) == [8, 6, 10] and widths(vae.encoder) == [8, 6, 6] and widths(vae.decoder) == [8, 6, 64]
    )
    x = torch.bernoulli(torch.full((N, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    pyro_loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x, num_data=100)
    torch.manual_seed(5)
    assert torch.allclose(fused_enumerated_loss(vae, x, num_data=100), pyro_loss, rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="hidden_dims"):
        build_vae("gmvae", (1, 8, 8), model_options={"hidden_dims": [8, 0]})
