"""The `cvae` model (Doersch 2016): the contract with labels, exact log p(x|y) when the decoder
ignores z, samples that change with y, and planted classes recovered after brief training."""

from __future__ import annotations

import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.inference.importance import elbo_per_datapoint, iw_log_px
from ppl_vae.inference.training import train
from ppl_vae.models import MODELS, build_vae
from ppl_vae.models.cvae import ConditionalGaussianEncoder
from ppl_vae.models.networks import ACTIVATIONS

NUM_CLASSES = 3
SHAPE = (1, 8, 8)


def small_cvae(likelihood=None, **kw):
    return build_vae(
        "cvae", SHAPE, likelihood=likelihood, latent_dim=2, hidden_dim=32, data_info={"num_classes": NUM_CLASSES}, **kw
    )


def planted(n: int, seed: int):
    """Images whose class decides them: a fixed random binary template per class, 3% flipped."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(NUM_CLASSES, *SHAPE, generator=torch.Generator().manual_seed(123)) < 0.5).float()
    y = torch.randint(NUM_CLASSES, (n,), generator=g)
    x = templates[y]
    flips = torch.rand(x.shape, generator=g) < 0.03
    return torch.where(flips, 1 - x, x), y, templates


@pytest.fixture(scope="module")
def trained():
    """A cvae trained briefly (through the library's training loop) on planted classes."""
    torch.manual_seed(0)
    x, y, templates = planted(300, seed=1)
    x_test, y_test, _ = planted(60, seed=2)
    vae = small_cvae()
    data = Dataset("planted", x, x_test, y, y_test)
    history = train(vae, data, TrainConfig(epochs=10, batch_size=100, lr=2e-2), progress=False)
    vae.eval()
    return vae, history, templates, x_test, y_test


def test_cvae_is_registered_and_conditional():
    spec = MODELS.get("cvae")
    assert spec.likelihood == "bernoulli"
    vae = small_cvae()
    assert vae.num_classes == NUM_CLASSES


def test_building_without_labels_is_a_one_line_error():
    with pytest.raises(ValueError, match="needs labelled data") as info:
        build_vae("cvae", SHAPE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "laplace"])
def test_shapes_with_a_particle_dim_and_every_site_in_the_data_plate(likelihood):
    vae = small_cvae(likelihood)
    x, y = torch.rand(5, *SHAPE), torch.tensor([0, 1, 2, 1, 0])
    loc, scale = vae.encode(x, y)
    assert loc.shape == scale.shape == (5, 2)
    params = vae.decode_params(torch.randn(4, 5, 2), y)
    assert len(params) == vae.likelihood.num_params and all(p.shape == (4, 5, *SHAPE) for p in params)
    log_px = iw_log_px(vae.model, vae.guide, x, num_samples=6, y=y)
    assert log_px.shape == (5,) and torch.isfinite(log_px).all()
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, y, num_data=50)
    loss.backward()
    assert vae.decoder.net[0].weight.grad.abs().sum() > 0


def test_bad_labels_are_one_line_errors():
    vae = small_cvae()
    x = torch.rand(3, *SHAPE)
    for y, pattern in [
        (None, "needs labels"),
        (torch.tensor([0, 1, 3]), r"labels y must lie in \[0, 2\]"),
        (torch.tensor([0.0, 1.0, 2.0]), "must be integers"),
        (torch.tensor([0, 1]), r"must have shape \(3,\)"),
    ]:
        with pytest.raises(ValueError, match=pattern) as info:
            vae.model(x, y)
        assert "\n" not in str(info.value)


def test_iw_estimate_is_exact_when_the_decoder_ignores_z_and_the_guide_is_the_prior():
    """p(x|z,y) = Bernoulli(sigmoid(b_y)), q = p(z): every weight is p(x|y) = prod Bernoulli(x; b_y)."""
    vae = small_cvae()
    with torch.no_grad():
        last = vae.decoder.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.linspace(-1.5, 1.5, 64))
        vae.encoder.head.weight.zero_()
        vae.encoder.head.bias.zero_()
        # the label enters through the first layer; give each label its own output shift
        first = vae.decoder.net[0]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 2:] = torch.tensor([1.0, 2.0, 3.0])  # hidden unit 0 = relu(y + 1)
        last.weight[:, 0] = torch.linspace(-1.0, 1.0, 64)  # logits shift by (y + 1) * linspace
    # The decoder's middle layer: pass hidden unit 0 through unchanged.
    with torch.no_grad():
        mid = vae.decoder.net[2]
        mid.weight.zero_()
        mid.bias.zero_()
        mid.weight[0, 0] = 1.0
    x = torch.bernoulli(torch.full((6, *SHAPE), 0.4))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    logits = torch.linspace(-1.5, 1.5, 64) + (y[:, None] + 1.0) * torch.linspace(-1.0, 1.0, 64)
    exact = torch.distributions.Bernoulli(logits=logits).log_prob(x.flatten(1)).sum(-1)
    torch.testing.assert_close(iw_log_px(vae.model, vae.guide, x, num_samples=5, y=y), exact)
    torch.testing.assert_close(elbo_per_datapoint(vae.model, vae.guide, x, y=y), exact)


def test_decoded_mean_changes_with_y_for_the_same_z():
    vae = small_cvae()
    z = torch.randn(4, 2)
    means = torch.stack([vae.decode(z, c) for c in range(NUM_CLASSES)])
    for a in range(NUM_CLASSES):
        for b in range(a + 1, NUM_CLASSES):
            assert (means[a] - means[b]).abs().max() > 1e-3


def test_training_with_labels_improves_the_elbo(trained):
    vae, history, *_ = trained
    test_elbo = history["test_elbo"].values
    assert test_elbo[-1] > test_elbo[0] + 5


def test_conditional_samples_match_their_class(trained):
    """After training on data where y decides the image, samples given y are closest to the
    template of class y, for every class, and the same z gives different images per label."""
    vae, _, templates, *_ = trained
    torch.manual_seed(0)
    for c in range(NUM_CLASSES):
        samples = vae.sample(200, y=c)
        dist_to = ((samples.mean(0, keepdim=True) - templates) ** 2).flatten(1).sum(-1)
        assert int(dist_to.argmin()) == c, dist_to


def test_true_labels_score_higher_than_wrong_ones(trained):
    vae, _, _, x_test, y_test = trained
    right = elbo_per_datapoint(vae.model, vae.guide, x_test, y=y_test, num_particles=4)
    wrong = elbo_per_datapoint(vae.model, vae.guide, x_test, y=(y_test + 1) % NUM_CLASSES, num_particles=4)
    assert (right > wrong).float().mean() > 0.95


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_conditional_encoder_uses_the_activation_it_is_given(activation):
    """It used ReLU for "relu" and tanh for every other name."""
    encoder = ConditionalGaussianEncoder((6,), 3, 2, (5,), activation)
    assert type(encoder.act) is ACTIVATIONS[activation]
    assert all(type(m) is ACTIVATIONS[activation] for m in encoder.net if not isinstance(m, torch.nn.Linear))
