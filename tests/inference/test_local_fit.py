"""Pinned numbers of the per-datapoint fits that share :mod:`ppl_vae.inference.local_fit`.

These are not Monte Carlo checks of an estimator (test_meanfield.py and test_local_flows.py do
that against closed forms): they pin, for fixed seeds on one CPU thread, what
:func:`fit_mean_field` and :func:`fit_local_flow` returned before their shared loop was factored
out, so that a change to the loop that changes any number shows here. The values were computed
by the code before the refactor; a deliberate change to the numbers must re-pin them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch

from ppl_vae.inference.local_flows import fit_local_flow
from ppl_vae.inference.meanfield import fit_mean_field
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.zoo import build_vae

REL = 1e-6
ABS = 1e-9  # for values that are (close to) zero


def _linear_gaussian():
    torch.manual_seed(1)
    W = torch.randn(4, 2)
    W[:, 1] += 0.8 * W[:, 0]
    vae = LinearGaussianVAE(4, 2, sigma=0.5, W=W, b=torch.randn(4))
    return vae, torch.randn(5, 4) * 2


def _bernoulli_mlp():
    torch.manual_seed(2)
    vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    return vae, torch.bernoulli(torch.full((5, 1, 8, 8), 0.4))


COMMON = dict(batch_size=3, window=20, tol=1e-2, num_lr_decays=1, num_eval_samples=50, progress=False, seed=3)


def _summary(result: Any) -> Dict[str, List[float]]:
    trace = result.trace
    last = [float(row[~torch.isnan(row)][-1]) for row in trace]
    out = {
        "elbo": result.estimate.elbo.tolist(),
        "log_px": result.estimate.log_px.tolist(),
        "elbo_stderr": result.estimate.elbo_stderr.tolist(),
        "num_steps": [float(v) for v in result.num_steps.tolist()],
        "converged": [float(v) for v in result.converged.tolist()],
        "trace_first": trace[:, 0].tolist(),
        "trace_last": last,
        "trace_len": [float((~torch.isnan(row)).sum()) for row in trace],
    }
    if hasattr(result, "loc"):
        out["loc"] = result.loc.flatten().tolist()
        out["scale"] = result.scale.flatten().tolist()
        out["grad_norm"] = [] if result.grad_norm is None else result.grad_norm.tolist()
    return out


def _run(case: str) -> Dict[str, List[float]]:
    if case == "mean_field_linear_gaussian":
        vae, x = _linear_gaussian()
        fit = fit_mean_field(vae.model, vae.guide, x, max_steps=150, polish_particles=16, polish_steps=50, **COMMON)
    elif case == "mean_field_linear_gaussian_trace_prior_no_polish":
        vae, x = _linear_gaussian()
        fit = fit_mean_field(
            vae.model, None, x, init="prior", elbo="trace", num_particles=2, max_steps=60, polish=False, **COMMON
        )
    elif case == "mean_field_bernoulli_mlp":
        vae, x = _bernoulli_mlp()
        fit = fit_mean_field(vae.model, vae.guide, x, max_steps=150, polish_particles=16, polish_steps=50, **COMMON)
    elif case == "local_flow_linear_gaussian":
        vae, x = _linear_gaussian()
        fit = fit_local_flow(vae.model, vae.guide, x, num_flows=1, max_steps=100, num_particles=4, **COMMON)
    elif case == "local_flow_linear_gaussian_given_start_no_stl":
        vae, x = _linear_gaussian()
        loc, scale = vae.optimal_mean_field(x)
        fit = fit_local_flow(vae.model, None, x, init_loc=loc, init_scale=scale, stl=False, max_steps=60, **COMMON)
    elif case == "local_flow_bernoulli_mlp":
        vae, x = _bernoulli_mlp()
        fit = fit_local_flow(vae.model, None, x, init="prior", max_steps=100, num_particles=4, **COMMON)
    else:
        raise AssertionError(case)
    return _summary(fit)


PINNED: Dict[str, Dict[str, List[float]]] = {
    "mean_field_linear_gaussian": {
        "elbo": [-16.335281372070312, -5.497072696685791, -59.22639846801758, -6.2763752937316895, -37.6907958984375],
        "log_px": [
            -16.19559097290039,
            -5.143447399139404,
            -59.01127624511719,
            -6.153093338012695,
            -37.460418701171875,
        ],
        "elbo_stderr": [
            0.07502855360507965,
            0.1115959957242012,
            0.08486078679561615,
            0.07321543991565704,
            0.11470162868499756,
        ],
        "num_steps": [162.0, 162.0, 162.0, 159.0, 159.0],
        "converged": [1.0, 1.0, 1.0, 1.0, 1.0],
        "trace_first": [-45.3973503112793, -78.5768051147461],
        "trace_last": [-33.0667724609375, -47.90456008911133],
        "trace_len": [150.0, 150.0],
        "loc": [
            -1.9501991271972656,
            3.259661912918091,
            0.5744303464889526,
            -1.11689293384552,
            -1.4079126119613647,
            1.6323611736297607,
            1.0918346643447876,
            -1.242582082748413,
            -0.4622786045074463,
            -0.8133262395858765,
        ],
        "scale": [
            0.27888375520706177,
            0.3288547396659851,
            0.27888378500938416,
            0.32885417342185974,
            0.27888089418411255,
            0.3288549482822418,
            0.2788309156894684,
            0.328843355178833,
            0.27880439162254333,
            0.32881924510002136,
        ],
        "grad_norm": [
            4.361569881439209e-05,
            8.207559585571289e-05,
            0.00013275444507598877,
            0.0005922317504882812,
            0.0009594261646270752,
        ],
    },
    "mean_field_linear_gaussian_trace_prior_no_polish": {
        "elbo": [-37.015987396240234, -10.766819953918457, -67.58071899414062, -13.431777954101562, -41.29966735839844],
        "log_px": [
            -22.967853546142578,
            -5.398436546325684,
            -57.79692459106445,
            -8.073911666870117,
            -37.07878494262695,
        ],
        "elbo_stderr": [
            1.9235098361968994,
            1.0703336000442505,
            0.9804670810699463,
            1.324108362197876,
            0.9472334980964661,
        ],
        "num_steps": [60.0, 60.0, 60.0, 60.0, 60.0],
        "converged": [0.0, 0.0, 0.0, 0.0, 0.0],
        "trace_first": [-38.13667297363281, -29.60881233215332],
        "trace_last": [-34.55879211425781, -24.40743064880371],
        "trace_len": [60.0, 60.0],
        "loc": [
            0.05568167567253113,
            0.4167226254940033,
            0.06603612005710602,
            -0.28672462701797485,
            -0.17743773758411407,
            0.21718330681324005,
            0.21353694796562195,
            -0.07689760625362396,
            -0.304307758808136,
            -0.3278079628944397,
        ],
        "scale": [
            0.7746976017951965,
            0.8624881505966187,
            0.746492326259613,
            0.7395899295806885,
            0.7194519639015198,
            0.7397108674049377,
            0.7178813219070435,
            0.7244433164596558,
            0.7158035039901733,
            0.7492807507514954,
        ],
        "grad_norm": [],
    },
    "mean_field_bernoulli_mlp": {
        "elbo": [-43.14653015136719, -44.24162292480469, -45.72837448120117, -45.17671203613281, -46.39631271362305],
        "log_px": [
            -43.13676834106445,
            -44.224998474121094,
            -45.726661682128906,
            -45.17247009277344,
            -46.3823356628418,
        ],
        "elbo_stderr": [
            0.020150629803538322,
            0.025079522281885147,
            0.008345413953065872,
            0.013126971200108528,
            0.02234206348657608,
        ],
        "num_steps": [106.0, 106.0, 106.0, 64.0, 64.0],
        "converged": [1.0, 1.0, 1.0, 1.0, 1.0],
        "trace_first": [-45.11103820800781, -45.09833908081055],
        "trace_last": [-43.70860290527344, -46.094947814941406],
        "trace_len": [100.0, 60.0],
        "loc": [
            -0.3644857108592987,
            -0.2365165799856186,
            -0.8469012379646301,
            0.23048405349254608,
            -0.29583826661109924,
            -0.20348691940307617,
            0.015020028688013554,
            0.20599406957626343,
            -0.7451263070106506,
            -0.44115543365478516,
        ],
        "scale": [
            0.7845065593719482,
            0.8946264982223511,
            0.7536956071853638,
            0.8983339071273804,
            0.9164727926254272,
            0.9445822834968567,
            0.8158260583877563,
            0.9245572686195374,
            0.8571164011955261,
            0.9191948175430298,
        ],
        "grad_norm": [
            0.0003393888473510742,
            0.00015792250633239746,
            3.0605122447013855e-05,
            0.0006898045539855957,
            0.0006904304027557373,
        ],
    },
    "local_flow_linear_gaussian": {
        "elbo": [-17.387168884277344, -4.93319034576416, -63.608726501464844, -7.653408050537109, -37.396095275878906],
        "log_px": [
            -16.09185028076172,
            -4.705540180206299,
            -58.88780212402344,
            -6.1811065673828125,
            -37.234222412109375,
        ],
        "elbo_stderr": [
            0.36638739705085754,
            0.10849740356206894,
            0.49921339750289917,
            0.281520813703537,
            0.09535589069128036,
        ],
        "num_steps": [100.0, 100.0, 100.0, 100.0, 100.0],
        "converged": [0.0, 0.0, 0.0, 0.0, 0.0],
        "trace_first": [-79.84285736083984, -49.837913513183594],
        "trace_last": [-29.488298416137695, -22.70137596130371],
        "trace_len": [100.0, 100.0],
    },
    "local_flow_linear_gaussian_given_start_no_stl": {
        "elbo": [-16.26639747619629, -5.005723476409912, -58.97932815551758, -5.905232906341553, -37.232967376708984],
        "log_px": [
            -16.178634643554688,
            -4.992557525634766,
            -58.84782028198242,
            -5.864212512969971,
            -37.21611404418945,
        ],
        "elbo_stderr": [
            0.06831929832696915,
            0.02268596924841404,
            0.06581276655197144,
            0.03929810971021652,
            0.02507694810628891,
        ],
        "num_steps": [60.0, 60.0, 60.0, 60.0, 60.0],
        "converged": [1.0, 1.0, 1.0, 1.0, 1.0],
        "trace_first": [-27.04529571533203, -21.88214111328125],
        "trace_last": [-26.80616569519043, -21.57488441467285],
        "trace_len": [60.0, 60.0],
    },
    "local_flow_bernoulli_mlp": {
        "elbo": [-43.132537841796875, -44.22021484375, -45.73636245727539, -45.16361999511719, -46.4077033996582],
        "log_px": [
            -43.12839889526367,
            -44.21305465698242,
            -45.73481750488281,
            -45.163204193115234,
            -46.40633010864258,
        ],
        "elbo_stderr": [
            0.013118923641741276,
            0.01639549620449543,
            0.007945862598717213,
            0.004133754409849644,
            0.007424693088978529,
        ],
        "num_steps": [60.0, 60.0, 60.0, 60.0, 60.0],
        "converged": [1.0, 1.0, 1.0, 1.0, 1.0],
        "trace_first": [-44.783329010009766, -45.99980926513672],
        "trace_last": [-44.320430755615234, -45.78927993774414],
        "trace_len": [60.0, 60.0],
    },
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_per_datapoint_fits_return_the_pinned_numbers(case, one_thread):
    got = _run(case)
    want = PINNED[case]
    assert sorted(got) == sorted(want)
    for key, values in want.items():
        assert len(got[key]) == len(values), key
        for i, (g, w) in enumerate(zip(got[key], values)):
            assert math.isclose(g, w, rel_tol=REL, abs_tol=ABS), f"{case} {key}[{i}]: got {g!r}, pinned {w!r}"
