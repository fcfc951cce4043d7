"""text_hybrid (Semeniuta et al. 2017): shapes, the end-of-text categorical, the auxiliary
term kept out of log p(x, z), and posterior collapse with and without that term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.analysis.text import (
    interpolate_sentences,
    kl_per_datapoint,
    num_scored_characters,
    sample_sentences,
    text_metrics,
)
from ppl_vae.data.text import VOCAB_SIZE, encode_text, text_dataset
from ppl_vae.errors import DataError
from ppl_vae.inference.importance import log_importance_weights
from ppl_vae.models import build_vae, make_likelihood
from ppl_vae.models.priors import make_prior
from ppl_vae.models.text import EndOfTextCategorical, build_text_hybrid

# Training in these tests runs several times faster on one thread on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*sentences: str, length: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.stack([encode_text(s, length) for s in sentences])).float()


def test_end_of_text_categorical_scores_up_to_the_first_end_token():
    logits = torch.randn(2, 5, 4)
    d = EndOfTextCategorical(logits, event_dims=1, end_index=0)
    value = torch.tensor([[2.0, 3.0, 0.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    log_p = torch.log_softmax(logits, -1)
    expected0 = log_p[0, 0, 2] + log_p[0, 1, 3] + log_p[0, 2, 0]  # padding after the end: unscored
    expected1 = log_p[1, :, 1].sum()  # no end token: every position scored
    assert torch.allclose(d.log_prob(value), torch.stack([expected0, expected1]))
    draws = d.sample((100,))
    ends = (draws == 0).long()
    after = (ends.cumsum(-1) - ends) > 0
    assert (draws[after] == 0).all()  # everything after an end token is padding
    # Sentences of length <= 2 over symbols {1,2,3} + end: probabilities sum to one.
    small = EndOfTextCategorical(torch.randn(3, 4), event_dims=1, end_index=0)
    seqs = [[0, 0, 0]] + [[a, 0, 0] for a in (1, 2, 3)] + [[a, b, 0] for a in (1, 2, 3) for b in (1, 2, 3)]
    seqs += [[a, b, c] for a in (1, 2, 3) for b in (1, 2, 3) for c in (1, 2, 3)]
    total = torch.logsumexp(small.log_prob(torch.tensor(seqs, dtype=torch.float)), 0)
    assert float(total) == pytest.approx(0.0, abs=1e-5)


def test_likelihood_support_needs_integer_symbols():
    lik = make_likelihood("categorical_text")
    assert lik.num_params == VOCAB_SIZE
    lik.check_support(_x("hello"))
    with pytest.raises(DataError, match="integer"):
        lik.check_support(torch.full((2, 16), 0.5))
    with pytest.raises(DataError, match=r"needs data in \[0, 96\]"):
        lik.check_support(torch.full((2, 16), 200.0))
    # QA: binary images read as texts: every pixel after a row's first 0 (the end symbol) went
    # unscored, and the ELBO came out 8 nats "better" than Bernoulli's. Refused, by its own name
    image = torch.tensor([[[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]])
    with pytest.raises(
        DataError, match="likelihood 'categorical_text' reads data as end-padded texts .* 'categorical'"
    ):
        lik.check_support(image)
    make_likelihood("categorical", num_categories=2, event_dims=2).check_support(image)  # no end symbol: fine
    padded = torch.stack([_x("hi"), _x("hello")])  # texts: end symbols only after the end
    assert bool((padded == 0).any())
    lik.check_support(padded)


@pytest.mark.parametrize("model", ["text_hybrid", "text_hybrid_noaux", "text_hybrid_historyless"])
def test_shapes_with_a_particle_dim(model):
    vae = build_vae(model, (16,), latent_dim=3, hidden_dim=8)
    x = _x("hello", "a longer one", "")
    loc, scale = vae.encode(torch.stack([x, x]))
    assert loc.shape == scale.shape == (2, 3, 3)
    log_w = log_importance_weights(vae.model, vae.guide, x, num_particles=5)
    assert log_w.shape == (5, 3) and torch.isfinite(log_w).all()
    assert vae.sample(4).shape == (4, 16)
    assert len(sample_sentences(vae, 3)) == 3
    steps = interpolate_sentences(vae, "hello", "world", num_steps=4)
    assert len(steps) == 4 and all(isinstance(s, str) for s in steps)


def test_auxiliary_term_is_a_training_objective_only():
    vae = build_vae("text_hybrid", (16,), latent_dim=3, hidden_dim=8)
    x = _x("hello", "world")
    import pyro.poutine as poutine

    vae.train()
    sites = poutine.trace(vae.model).get_trace(x).nodes
    assert "aux" in sites
    vae.eval()
    sites = poutine.trace(vae.model).get_trace(x).nodes
    assert "aux" not in sites and {"z", "x"} <= set(sites)


def test_historyless_decoder_ignores_previous_characters():
    vae = build_vae("text_hybrid_historyless", (16,), latent_dim=3, hidden_dim=8)
    z = torch.randn(2, 3)
    a, _ = vae.decoder.logits(z, _x("aaaa", "bbbb"))
    b, _ = vae.decoder.logits(z, _x("zzzz", "yyyy"))
    assert torch.allclose(a, b)
    with_history = build_vae("text_hybrid", (16,), latent_dim=3, hidden_dim=8)
    a, _ = with_history.decoder.logits(z, _x("aaaa", "bbbb"))
    b, _ = with_history.decoder.logits(z, _x("zzzz", "yyyy"))
    assert not torch.allclose(a, b)


def test_bad_shapes_and_likelihoods_are_one_line_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        build_vae("text_hybrid", (1, 28, 28))
    with pytest.raises(ValueError, match="categorical likelihood"):
        build_vae("text_hybrid", (16,), likelihood="gaussian")


def test_metrics_count_characters_and_end_tokens():
    x = _x("abc", "", "fifteen chars!!")
    assert num_scored_characters(x).tolist() == [4, 1, 16]
    vae = build_vae("text_hybrid", (16,), latent_dim=3, hidden_dim=8)
    m = text_metrics(vae, x, num_samples=3)
    # an untrained decoder is close to uniform over the alphabet: about log2(97) bits per symbol
    assert 0.5 * math.log2(VOCAB_SIZE) < float(m["bits_per_character_iw"]) <= float(m["bits_per_character_elbo"]) + 0.05
    assert float(m["kl"]) > 0
    assert all(math.isfinite(float(m[f"{v}_se"])) and float(m[f"{v}_se"]) >= 0 for v in ("bits_per_character_iw", "kl"))


def test_the_bits_per_character_se_is_the_ratio_estimators():
    """ratio_se (delta method) against the jackknife se of sum(a) / sum(c), an independent
    estimate of the same standard error; they agree to O(1/n) on 2,000 sentences."""
    from ppl_vae.analysis.text import ratio_se

    gen = torch.Generator().manual_seed(0)
    c = torch.randint(5, 60, (2000,), generator=gen).double()
    a = 4.5 * c + torch.randn(2000, generator=gen, dtype=torch.float64) * c.sqrt() * 3
    n = a.numel()
    leave_one_out = (a.sum() - a) / (c.sum() - c)
    jackknife = math.sqrt((n - 1) / n * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    assert ratio_se(a, c) == pytest.approx(jackknife, rel=0.02)
    assert math.isnan(ratio_se(a[:1], c[:1]))


def _repeated_letters(seed: int = 0, n: int = 240):
    """Sentences of one of 10 letters repeated 15 times: log(10) nats of information each."""
    rng = np.random.default_rng(seed)
    return [("abcdefghij"[i]) * 15 for i in rng.integers(0, 10, n)]


def test_auxiliary_term_prevents_posterior_collapse():
    """Same data, same schedule: with alpha = 1 the code keeps about log(10) nats per sentence
    (which letter); with alpha = 0 the LSTM copies the first letter and z is ignored."""
    x = text_dataset(_repeated_letters(), max_length=16).train
    kl = {}
    for alpha in (1.0, 0.0):
        torch.manual_seed(0)
        vae = build_text_hybrid(
            (16,), 4, 32, make_prior("standard_normal", 4), make_likelihood("categorical_text"), alpha=alpha
        )
        optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
        vae.train()
        for _ in range(75):
            batch = x[torch.randint(len(x), (50,))]
            loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        vae.eval()
        kl[alpha] = float(kl_per_datapoint(vae, x, num_samples=8).mean())
    assert kl[1.0] > 0.6 * math.log(10), kl
    assert kl[0.0] < 0.25 * math.log(10), kl


def test_a_text_variants_refusal_names_the_variant():
    """QA: text_hybrid_noaux and text_hybrid_historyless were refused as "model 'text_hybrid'"."""
    for name in ("text_hybrid_noaux", "text_hybrid_historyless"):
        with pytest.raises(ValueError, match=f"model '{name}' needs datapoints of shape \\(length,\\)"):
            build_vae(name, (1, 8, 8))
