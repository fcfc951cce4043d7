"""Disentanglement metrics of a code against known generative factors: MIG and DCI.

- MIG, the mutual information gap (Chen et al. 2018, eq. 6): for each factor v_k, the gap between
  the two latent dimensions that share most information with it, normalized by its entropy,
  (I(z_j*; v_k) - I(z_j'; v_k)) / H(v_k), averaged over factors. Codes are discretized into
  ``num_bins`` equal-width bins per dimension, as in disentanglement_lib (Locatello et al. 2019);
  the mutual informations are then plug-in estimates (biased upwards by about
  (bins - 1)(classes - 1) / 2N nats, Miller 1955).
- DCI (Eastwood & Williams 2018): a random forest predicts each factor from the code; its
  feature importances R (latent x factor) give *disentanglement* (1 - entropy of each latent's
  importance over factors, base F, weighted by the latent's share of importance), *completeness*
  (1 - entropy of each factor's importance over latents, base D) and *informativeness* (the
  forest's accuracy on held-out points).

Results are xarray Datasets with dims ``latent`` and ``factor``. :func:`disentanglement_metrics`
computes both from a VAE's encoder means on a dataset with factor labels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from ppl_vae.data.datasets import Dataset
from ppl_vae.inference.modes import eval_mode

__all__ = [
    "dci",
    "discretize",
    "disentanglement_metrics",
    "encode_means",
    "factor_classes",
    "mig",
    "mutual_info_matrix",
    "plot_mutual_info",
    "plot_objective_terms",
]

#: per-epoch history variables of the disentangling objectives that :func:`plot_objective_terms` draws
TERMS = ("kl", "mutual_info", "total_correlation", "dimwise_kl", "capacity")


def _as_2d(a, name: str) -> np.ndarray:
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-d array (num_points >= 2, dims), got shape {a.shape}")
    if a.dtype.kind not in "biuf" or not np.isfinite(a).all():
        raise ValueError(f"{name} must hold finite numbers")
    return a


def discretize(codes, num_bins: int = 20) -> np.ndarray:
    """Each column of ``codes`` ``(N, D)`` in ``num_bins`` equal-width bins over its range, ints ``(N, D)``."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    codes = _as_2d(codes, "codes").astype(np.float64)
    out = np.zeros(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], bins=num_bins)
        out[:, j] = np.digitize(codes[:, j], edges[1:-1])
    return out


def factor_classes(factors, num_bins: int = 20) -> np.ndarray:
    """Factors as class indices ``(N, F)``: integer-valued columns keep their distinct values
    (renumbered 0..L-1); others are binned like codes (:func:`discretize`)."""
    factors = _as_2d(factors, "factors")
    out = np.zeros(factors.shape, dtype=np.int64)
    for k in range(factors.shape[1]):
        col = factors[:, k]
        if np.array_equal(col, np.round(col)):
            out[:, k] = np.unique(col, return_inverse=True)[1]
        else:
            out[:, k] = discretize(col[:, None], num_bins)[:, 0]
    return out


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in I(a; b) in nats of two integer label arrays."""
    joint: np.ndarray = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1))
    joint = joint.reshape(a.max() + 1, b.max() + 1) / len(a)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def mutual_info_matrix(codes_d: np.ndarray, factors_d: np.ndarray) -> np.ndarray:
    """I(z_j; v_k) ``(D, F)`` in nats for discretized codes and factor classes."""
    return np.array(
        [
            [_mutual_info(codes_d[:, j], factors_d[:, k]) for k in range(factors_d.shape[1])]
            for j in range(codes_d.shape[1])
        ]
    )


def _coords(num_latent: int, factor_names: Optional[Sequence[str]], num_factors: int) -> dict:
    names = list(factor_names) if factor_names else [f"factor_{k}" for k in range(num_factors)]
    if len(names) != num_factors:
        raise ValueError(f"factor_names must name {num_factors} factors, got {len(names)}")
    return {"latent": np.arange(num_latent), "factor": names}


def mig(codes, factors, *, num_bins: int = 20, factor_names: Optional[Sequence[str]] = None) -> xr.Dataset:
    """The mutual information gap (Chen et al. 2018) of ``codes`` ``(N, D)`` for ``factors`` ``(N, F)``.

    Returns ``mig`` (scalar, in [0, 1]), ``mig_per_factor`` (factor), ``mutual_info`` (latent,
    factor, nats), ``factor_entropy`` (factor, nats). A factor with a single value (entropy 0)
    gets NaN and is left out of the mean. Needs D >= 2.
    """
    codes, factors = _as_2d(codes, "codes"), _as_2d(factors, "factors")
    if len(codes) != len(factors):
        raise ValueError(f"codes has {len(codes)} points but factors {len(factors)}")
    if codes.shape[1] < 2:
        raise ValueError("MIG needs a code of at least 2 dimensions (it is a gap between the top two)")
    codes_d, factors_d = discretize(codes, num_bins), factor_classes(factors, num_bins)
    mi = mutual_info_matrix(codes_d, factors_d)
    entropy = np.array([_entropy(factors_d[:, k]) for k in range(factors_d.shape[1])])
    top = np.sort(mi, axis=0)[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_factor = np.where(entropy > 0, (top[0] - top[1]) / entropy, np.nan)
    coords = _coords(codes.shape[1], factor_names, factors.shape[1])
    ds = xr.Dataset(
        {
            "mig": ((), float(np.nanmean(per_factor)) if np.isfinite(per_factor).any() else np.nan),
            "mig_per_factor": ("factor", per_factor),
            "mutual_info": (("latent", "factor"), mi),
            "factor_entropy": ("factor", entropy),
        },
        coords=coords,
        attrs={
            "num_bins": int(num_bins),
            "num_points": int(len(codes)),
            "reference": "Chen, Li, Grosse & Duvenaud (2018), Isolating sources of disentanglement in VAEs, eq. 6",
        },
    )
    ds["mig"].attrs["long_name"] = "mutual information gap, mean over factors"
    ds["mutual_info"].attrs.update({"long_name": "I(z_j; v_k), plug-in estimate on discretized codes", "units": "nats"})
    return ds


def dci(
    codes_train,
    factors_train,
    codes_test,
    factors_test,
    *,
    seed: int = 0,
    num_trees: int = 50,
    max_depth: Optional[int] = 8,
    factor_names: Optional[Sequence[str]] = None,
) -> xr.Dataset:
    """DCI disentanglement, completeness and informativeness (Eastwood & Williams 2018).

    A random forest (``num_trees`` trees, ``max_depth``, every feature considered at each split, so
    importance is not spread onto uninformative latents at random; ``random_state=seed``) per factor predicts
    its classes from the code on the training points; R[j, k] is latent j's impurity importance
    for factor k. Returns ``dci_disentanglement``, ``dci_completeness`` (scalars in [0, 1]),
    ``dci_informativeness`` (factor: test accuracy), ``importance`` (latent, factor),
    ``disentanglement_per_latent`` and ``completeness_per_factor``.
    """
    from sklearn.ensemble import RandomForestClassifier

    codes_train, codes_test = _as_2d(codes_train, "codes_train"), _as_2d(codes_test, "codes_test")
    f_all = factor_classes(
        np.concatenate([_as_2d(factors_train, "factors_train"), _as_2d(factors_test, "factors_test")])
    )
    f_train, f_test = f_all[: len(codes_train)], f_all[len(codes_train) :]
    if len(f_train) != len(codes_train) or len(f_test) != len(codes_test):
        raise ValueError("codes and factors must have the same number of points")
    num_latent, num_factors = codes_train.shape[1], f_all.shape[1]
    importance = np.zeros((num_latent, num_factors))
    accuracy = np.zeros(num_factors)
    for k in range(num_factors):
        forest = RandomForestClassifier(
            n_estimators=num_trees, max_depth=max_depth, max_features=None, random_state=seed, n_jobs=1
        )
        forest.fit(codes_train, f_train[:, k])
        importance[:, k] = np.abs(forest.feature_importances_)
        accuracy[k] = float((forest.predict(codes_test) == f_test[:, k]).mean())

    def one_minus_entropy(p: np.ndarray, base: int) -> np.ndarray:
        p = p / np.clip(p.sum(-1, keepdims=True), 1e-12, None)
        logs = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
        return 1.0 + (p * logs).sum(-1) / np.log(base) if base > 1 else np.ones(p.shape[0])

    dis = one_minus_entropy(importance, num_factors)
    comp = one_minus_entropy(importance.T, num_latent)
    weight = importance.sum(1) / max(importance.sum(), 1e-12)
    ds = xr.Dataset(
        {
            "dci_disentanglement": ((), float((dis * weight).sum())),
            "dci_completeness": ((), float(comp.mean())),
            "dci_informativeness": ("factor", accuracy),
            "importance": (("latent", "factor"), importance),
            "disentanglement_per_latent": ("latent", dis),
            "completeness_per_factor": ("factor", comp),
        },
        coords=_coords(num_latent, factor_names, num_factors),
        attrs={
            "num_trees": int(num_trees),
            "max_depth": -1 if max_depth is None else int(max_depth),
            "seed": int(seed),
            "reference": "Eastwood & Williams (2018), A framework for the quantitative evaluation of "
            "disentangled representations",
        },
    )
    ds["dci_informativeness"].attrs["long_name"] = "random-forest accuracy on held-out points"
    return ds


@torch.no_grad()
def encode_means(vae, x, batch_size: int = 1000) -> Tensor:
    """E_q[z|x] ``(N, latent_dim)`` from the encoder, in eval mode, on the VAE's device."""
    device = next(iter(vae.parameters())).device
    with eval_mode(vae):
        out = [vae.encode(x[i : i + batch_size].to(device))[0].cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def _subset(n: int, num_points: Optional[int], gen: np.random.Generator) -> np.ndarray:
    if num_points is None or num_points >= n:
        return np.arange(n)
    return np.sort(gen.choice(n, size=num_points, replace=False))


def disentanglement_metrics(
    vae,
    data: Dataset,
    *,
    num_points: Optional[int] = 10_000,
    num_test_points: Optional[int] = 5_000,
    num_bins: int = 20,
    seed: int = 0,
    num_trees: int = 50,
) -> xr.Dataset:
    """MIG and DCI of ``vae``'s encoder means on ``data``'s factor-labelled points.

    MIG and DCI's forests use a seeded subset of ``num_points`` training points, DCI's accuracy
    ``num_test_points`` test points (None: all). Also returns each latent's ``activity``
    Var_x(E_q[z_j|x]) and ``active_units`` (activity > 0.01, Burda et al. 2015). The global
    RNGs are not touched.
    """
    if data.train_factors is None or data.test_factors is None:
        raise ValueError(
            f"MIG and DCI need a dataset with factor labels (dsprites, or an .npz with 'factors'); "
            f"dataset {data.name!r} has none"
        )
    for name, value in (("num_points", num_points), ("num_test_points", num_test_points)):
        if value is not None and value < 2:
            raise ValueError(f"{name} must be >= 2 or None (all), got {value}")
    gen = np.random.default_rng(seed)
    tr = _subset(data.train.shape[0], num_points, gen)
    te = _subset(data.test.shape[0], num_test_points, gen)
    idx_tr, idx_te = torch.as_tensor(tr), torch.as_tensor(te)
    codes_tr = encode_means(vae, data.train[idx_tr.to(data.train.device)]).double().numpy()
    codes_te = encode_means(vae, data.test[idx_te.to(data.test.device)]).double().numpy()
    f_tr = data.train_factors.cpu()[idx_tr].double().numpy()
    f_te = data.test_factors.cpu()[idx_te].double().numpy()
    names = data.factor_names or None
    ds = mig(codes_tr, f_tr, num_bins=num_bins, factor_names=names)
    ds = ds.merge(dci(codes_tr, f_tr, codes_te, f_te, seed=seed, num_trees=num_trees, factor_names=names))
    activity = codes_tr.var(axis=0, ddof=1)
    on = f"the {len(tr)} training points the metrics use"
    ds["activity"] = ("latent", activity, {"description": "Var_x(E_q[z_j|x]) (plug-in estimate)", "data": on})
    ds["active_units"] = ((), int((activity > 0.01).sum()), {"description": "latents with activity > 0.01", "data": on})
    ds.attrs.update(
        {
            "dataset": data.name,
            "num_points": int(len(tr)),
            "num_test_points": int(len(te)),
            "seed": int(seed),
            "num_bins": int(num_bins),
        }
    )
    return ds


def plot_mutual_info(metrics: xr.Dataset):
    """Heat map of I(z_j; v_k) / H(v_k), latents by factors, with the MIG per factor. Returns a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns
    from matplotlib.figure import Figure

    normalized = (metrics["mutual_info"] / metrics["factor_entropy"]).transpose("latent", "factor")
    # wide enough for the two-line title and the colour bar's label with few factors
    fig = Figure(
        figsize=(max(3.6, 1.2 + 0.9 * metrics.sizes["factor"]), 1.2 + 0.35 * metrics.sizes["latent"]),
        constrained_layout=True,
    )
    ax = fig.add_subplot()
    sns.heatmap(
        normalized.values,
        ax=ax,
        vmin=0,
        vmax=1,
        cmap="Blues",
        annot=True,
        fmt=".2f",
        annot_kws={"fontsize": 7},
        cbar_kws={"label": "I(z_j; v_k) / H(v_k)"},
        xticklabels=[
            f"{f}\nMIG {float(m):.2f}" if np.isfinite(m) else f"{f}\nMIG n/a"
            for f, m in zip(metrics.factor.values, metrics.mig_per_factor.values)
        ],
        yticklabels=[f"z{int(j)}" for j in metrics.latent.values],
    )
    ax.tick_params(labelsize=7)
    mig = float(metrics.mig)
    ax.set_title(
        f"normalized mutual information\nMIG {mig:.3f}"
        if np.isfinite(mig)
        else "normalized mutual information\nMIG n/a",
        fontsize=9,
    )
    return fig


def plot_objective_terms(history: xr.Dataset):
    """The objective's terms per epoch (the KL and, for beta-TC, its three parts), or None when the
    history holds none of them. Returns a Figure."""
    present = [t for t in TERMS if t in history]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.2), constrained_layout=True)
    ax = fig.add_subplot()
    for name in present:
        ax.plot(history.epoch.values, history[name].values, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend(fontsize=7)
    ax.set_title("what the objective traded (epoch means)", fontsize=9)
    return fig
