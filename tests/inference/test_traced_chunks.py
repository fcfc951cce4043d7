"""Traced scoring sizes its chunks by what it scores: the polish of mean-field VI by the values a
draw scores with the summed-out discrete sites expanded (M2's p(x | z, y) over its classes), and
the IW / MIS draws of a pair without a fast path by a smaller budget of samples than the fast
path's, whose scorer blocks its own work."""

from __future__ import annotations

import pytest
import torch

import ppl_vae.analysis.gaps as gaps
import ppl_vae.inference.importance as importance
import ppl_vae.inference.meanfield as mf
from ppl_vae.inference.latents import model_layout, scored_by_traces, scored_values_per_draw
from ppl_vae.models import build_vae

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)  # 64 values of x
CLASSES = 5
PARTICLES = 64  # the polish's (fit_mean_field's polish_particles)


def _m2():
    torch.manual_seed(0)
    info = {"num_classes": CLASSES, "num_train": 60, "num_labelled": 10}
    return build_vae("m2", SHAPE, latent_dim=2, hidden_dim=8, data_info=info).eval()


def _gmvae():
    torch.manual_seed(0)
    return build_vae(
        "gmvae",
        SHAPE,
        latent_dim=2,
        hidden_dim=8,
        prior="mixture_of_gaussians",
        prior_options={"num_components": CLASSES},
    ).eval()


def _x(n=6):
    return (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1)) < 0.5).float()


def test_scored_values_count_the_summed_out_values_that_x_depends_on():
    """M2's p(x | z, y) is scored at every class (5 x 64 values a draw); the GMVAE's p(x | z) once
    (its components expand p(z | c) alone); a one-site MLP VAE scores x. The caller's random
    stream is left alone."""
    x = _x()
    expected = {"m2": CLASSES * 64, "gmvae": 64}
    for name, vae in (("m2", _m2()), ("gmvae", _gmvae())):
        layout = model_layout(vae.model, x)
        assert layout.enumerated, name
        state = torch.get_rng_state()
        assert scored_values_per_draw(vae.model, x, layout) == expected[name], name
        assert torch.equal(torch.get_rng_state(), state)
    mlp = build_vae("bernoulli_mlp", SHAPE, latent_dim=2, hidden_dim=8).eval()
    assert scored_values_per_draw(mlp.model, x, model_layout(mlp.model, x)) == 64


def test_the_polish_of_m2_holds_as_many_draws_per_pass_as_its_enumerated_values_allow(monkeypatch):
    """With room for 2 datapoints' enumerated values (64 particles x 5 classes x 64 values) per
    pass, no pass of M2's polish holds more than 2 datapoints; counted by x's size alone the
    same budget would hold all 6 in one pass. Chunks change no datapoint's objective: the fit
    equals the one in a single pass to float rounding."""
    vae, x = _m2(), _x()
    widths = []
    real = mf._flat_log_joint

    def spy(model_, xb, z, layout, kw):
        if z.shape[0] == PARTICLES:  # the polish's particles (Adam's phase draws 1)
            widths.append(xb.shape[0])
        return real(model_, xb, z, layout, kw)

    monkeypatch.setattr(mf, "_flat_log_joint", spy)
    results = []
    for budget in (10**9, 2 * PARTICLES * CLASSES * 64):
        monkeypatch.setattr(mf, "POLISH_CHUNK_VALUES", budget)
        widths.clear()
        results.append(
            mf.fit_mean_field(vae.model, vae.guide, x, max_steps=5, polish_steps=5, polish_particles=PARTICLES, seed=0)
        )
        assert widths and max(widths) == (x.shape[0] if budget == 10**9 else 2), widths
    whole, chunked = results
    assert torch.allclose(whole.loc, chunked.loc, atol=1e-4) and torch.allclose(whole.scale, chunked.scale, atol=1e-4)


def test_traced_pairs_draw_4096_samples_a_chunk_and_fast_pairs_65536(monkeypatch):
    """IW and the MIS of compare: a pair scored through Pyro's traces (M2) draws
    TRACED_CHUNK_SAMPLES // batch_size particles a chunk, a fast pair 65,536 // batch_size."""
    x = _x(8)
    m2, mlp = _m2(), build_vae("bernoulli_mlp", SHAPE, latent_dim=2, hidden_dim=8).eval()
    assert scored_by_traces(m2.model, m2.guide) and not scored_by_traces(mlp.model, mlp.guide)
    assert importance.TRACED_CHUNK_SAMPLES == 4096
    chunks = []
    real = importance.log_importance_weights

    def spy(model, guide, xb, *args, num_particles=1, **kw):
        chunks.append(num_particles)
        return real(model, guide, xb, *args, num_particles=num_particles, **kw)

    monkeypatch.setattr(importance, "log_importance_weights", spy)
    for vae, expected in ((m2, 4096 // 8), (mlp, 5000)):  # 65,536 // 8 > K: one chunk
        chunks.clear()
        importance.importance_estimate(vae.model, vae.guide, x, num_samples=5000, batch_size=8, seed=0)
        assert max(chunks) == expected, (type(vae).__name__, chunks)
        assert sum(chunks) == 5000

    drawn = []
    real_draws = gaps._draws

    def spy_draws(model, guide, other, xb, k, kw):
        drawn.append(k)
        return real_draws(model, guide, other, xb, k, kw)

    monkeypatch.setattr(gaps, "_draws", spy_draws)
    fit = mf.fit_mean_field(m2.model, m2.guide, x, max_steps=2, polish=False, seed=0)
    gaps.mixture_estimates(m2.model, m2.guide, fit.guide(), x, num_samples=1200, batch_size=8, seed=0)
    assert drawn and max(drawn) == 4096 // 8 and sum(drawn) == 1200  # each call: k of q, then k of q*
