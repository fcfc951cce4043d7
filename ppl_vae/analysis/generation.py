"""Generation from a trained VAE: sample grids, grids saved as training goes (frames and an
animated GIF), generation conditioned on a label, and inpainting.

Sample grids decode E[x | z] for draws z ~ p(z) (Kingma & Welling 2013, fig. 4); the grids
saved during training use the same draws at every epoch, as TensorFlow's CVAE tutorial does,
so the frames show one set of latent points coming into focus. A conditional model
(``vae.num_classes`` set, e.g. ``cvae``, Doersch 2016 sec. 4) decodes the same z under every label:
rows are labels, columns are z, so a column keeps its "style" across classes.

Inpainting (:func:`inpaint`) completes an image from an observed part. The trained model is
reused as it is; the missing pixels are inferred, not predicted by a separate network:
self-normalized importance sampling with the prior as proposal, z_k ~ p(z), weights
w_k ∝ p(x_obs | z_k, y) where the likelihood is restricted to the observed pixels (the
pixels are independent given z, so masking is exact). The completion is
E[x_miss | x_obs] ≈ Σ_k w_k E[x_miss | z_k, y]; posterior draws pick z_k with probability w_k.
For a conditional model with an unknown label, every label is enumerated with a uniform
p(y), which also gives p(y | x_obs). The effective sample size (Σ w)² / Σ w² says how well
the prior covered the posterior (Owen 2013, ch. 9). ``proposal="encoder"`` adds a second
pass whose proposal mixes p(z) with the encoder's q(z | x_completed, y) at the first pass's
completion (a defensive mixture, Hesterberg 1995), for posteriors much narrower than the prior.
Here z stands for all of a model's latent sites (z1 and z2 of a hierarchy, a mixture component
c with its z): draws and densities come from running the model's and guide's own Pyro programs
(traced, with the particles in the data plate), so any pair that keeps the contract of
:mod:`ppl_vae.models.vae` can be inpainted, and no decoder is called directly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import xarray as xr
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vae import io
from ppl_vae.inference.modes import eval_mode
from ppl_vae.models.vae import VAE
from ppl_vae.registry import Registry

IMAGE_DIMS = ("channel", "row", "col")

# ---------------------------------------------------------------------------------------------
# Observation masks for inpainting: name -> (rows, cols) -> bool tensor, True where observed.

MASKS: Registry[Callable[[int, int], Tensor]] = Registry("mask")


def _observed(row_part: str, col_part: str) -> Callable[[int, int], Tensor]:
    """A mask builder observing the given part ("first" half, "last" half, "all") of rows and cols."""
    parts = {"first": lambda n: slice(0, n // 2), "last": lambda n: slice(n // 2, None), "all": lambda n: slice(None)}

    def build(rows: int, cols: int) -> Tensor:
        m = torch.zeros(rows, cols, dtype=torch.bool)
        m[parts[row_part](rows), parts[col_part](cols)] = True
        return m

    return build


MASKS.register("top", doc="the top half is observed; complete the bottom half")(_observed("first", "all"))
MASKS.register("bottom", doc="the bottom half is observed; complete the top half")(_observed("last", "all"))
MASKS.register("left", doc="the left half is observed; complete the right half")(_observed("all", "first"))
MASKS.register("right", doc="the right half is observed; complete the left half")(_observed("all", "last"))
# Pyro's CVAE tutorial observes one quarter and predicts the rest.
MASKS.register("quadrant", doc="the top-left quarter is observed; complete the other three")(
    _observed("first", "first")
)


def make_mask(name: str, event_shape: Sequence[int]) -> Tensor:
    """The named observation mask as a bool tensor of ``event_shape`` (channels share it)."""
    event_shape = tuple(event_shape)
    if len(event_shape) < 2:
        raise ValueError(f"inpainting masks need image data (channel, row, col), got event shape {event_shape}")
    rows, cols = event_shape[-2:]
    return MASKS.get(name)(rows, cols).expand(event_shape).clone()


# ---------------------------------------------------------------------------------------------
# Sampling


def _device(vae: VAE) -> torch.device:
    return next(vae.parameters()).device


def fixed_latents(vae: VAE, num_samples: int, seed: int = 0) -> Tensor:
    """``num_samples`` draws z ~ p(z), ``(num_samples, latent_dim)``, the same for the same seed.

    The global RNG state is left as it was, so saving grids does not change training.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = _device(vae)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return vae.prior().sample((num_samples,))


def _check_labels(vae: VAE, labels: Optional[Sequence[int]]) -> Optional[List[int]]:
    if vae.num_classes is None:
        if labels is not None:
            raise ValueError(
                f"labels need a conditional model (cvae, m2); this model ({type(vae).__name__}) takes none"
            )
        return None
    num_classes = int(vae.num_classes)  # type: ignore[attr-defined]
    labels = list(range(num_classes)) if labels is None else [int(c) for c in labels]
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad or not labels:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got {labels}")
    return labels


@torch.no_grad()
def sample_images(
    vae: VAE,
    num_samples: int = 16,
    *,
    labels: Optional[Sequence[int]] = None,
    seed: int = 0,
    z: Optional[Tensor] = None,
) -> xr.DataArray:
    """Decoded means E[x | z] for z ~ p(z) (the draws ``fixed_latents(vae, num_samples, seed)``).

    Unconditional models give dims ``(sample, channel, row, col)``. Conditional models decode
    the same z under each label (default: every class) and add a leading dim ``label``.
    """
    labels = _check_labels(vae, labels)
    with eval_mode(vae):
        z = fixed_latents(vae, num_samples, seed) if z is None else z.to(_device(vae))
        dims: Tuple[str, ...]
        coords: Dict[str, Any]
        if labels is None:
            images = vae.decode(z)
            dims, coords = ("sample", *IMAGE_DIMS), {"sample": np.arange(len(z))}
        else:
            images = torch.stack([vae.decode(z, c) for c in labels])  # type: ignore[call-arg]
            dims, coords = ("label", "sample", *IMAGE_DIMS), {"label": labels, "sample": np.arange(len(z))}
    images = images.reshape(*images.shape[: images.dim() - len(vae.event_shape)], *_image_shape(vae.event_shape))
    return xr.DataArray(
        images.cpu().numpy(),
        dims=dims,
        coords=coords,
        name="mean",
        attrs={"description": "E[x | z] for z ~ p(z)", "seed": seed},
    )


def sample_grid_title(images: xr.DataArray) -> str:
    """What a grid of :func:`sample_images` shows, for its title."""
    if "label" in images.dims:
        return "samples E[x | z, y], z ~ p(z)\none row per label y, the same z in each column"
    return "samples E[x | z], z ~ p(z)"


def _image_shape(event_shape: Sequence[int]) -> tuple:
    event_shape = tuple(event_shape)
    if len(event_shape) == 3:
        return event_shape
    if len(event_shape) == 2:
        return (1, *event_shape)
    if len(event_shape) == 1:  # vectors are shown as one-pixel-high strips
        return (1, 1, *event_shape)
    raise ValueError(f"images need at most 3 dims (channel, row, col), got event shape {event_shape}")


# ---------------------------------------------------------------------------------------------
# Figures


def _tile(images: np.ndarray, ncols: int) -> np.ndarray:
    """``(n, C, H, W)`` images tiled with gaps (:func:`ppl_vae.analysis.plots.tile_images`), one
    canvas per channel, stacked last: ``(rows, cols, C)``."""
    from ppl_vae.analysis.plots import tile_images

    return np.stack([tile_images(images[:, k], ncols) for k in range(images.shape[1])], axis=-1)


def _show(ax, tiled: np.ndarray) -> None:
    """One channel in the library's one colour map (:func:`ppl_vae.analysis.plots.show_images`,
    gaps coloured); several as RGB with white gaps."""
    from ppl_vae.analysis.plots import show_images

    if tiled.shape[-1] == 1:
        show_images(ax, tiled[..., 0])
        return
    ax.imshow(np.clip(np.nan_to_num(tiled, nan=1.0), 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_grid(
    images: Union[xr.DataArray, np.ndarray, Tensor],
    ncols: Optional[int] = None,
    title: Optional[str] = None,
    cell_inches: float = 0.6,
):
    """A grid of images; a DataArray with a ``label`` dim gets one labelled row per label.

    ``images``: ``(n, C, H, W)`` or a DataArray from :func:`sample_images`. Returns a Figure.
    Dark pixels are high values (the library's one colour map, ``plots.IMAGE_CMAP``), as in the
    AEVB figures; tiles are separated by coloured gaps.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    labels = None
    if isinstance(images, xr.DataArray):
        if "label" in images.dims:
            labels = [int(c) for c in images["label"].values]
            ncols = images.sizes["sample"]
            array = images.transpose("label", "sample", *IMAGE_DIMS).values
            array = array.reshape(-1, *array.shape[2:])
        else:
            array = images.values
    else:
        array = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if array.ndim != 4 or len(array) == 0:
        raise ValueError(f"images must have shape (n, channel, row, col), got {array.shape}")
    ncols = ncols or math.ceil(math.sqrt(len(array)))
    tiled = _tile(array, ncols)
    nrows = math.ceil(len(array) / ncols)
    fig = Figure(
        figsize=(max(2.0, ncols * cell_inches + (0.5 if labels else 0)), max(2.0, nrows * cell_inches + 0.4)),
        constrained_layout=True,
    )
    ax = fig.add_subplot()
    _show(ax, tiled)
    if labels is not None:
        h = array.shape[2] + 1
        ax.set_yticks([i * h + (h - 1) / 2 for i in range(len(labels))])
        ax.set_yticklabels([str(c) for c in labels])
        ax.set_ylabel("label y")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_inpainting(result: xr.Dataset, max_images: int = 8):
    """Rows: the original, the observed part (missing pixels shaded), the posterior-mean
    completion, then posterior draws; one column per image. Returns a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = min(max_images, result.sizes["image"])
    mask = result["mask"].values.astype(bool)
    observed = result["original"].values[:n].copy()
    # Missing pixels shown mid-grey, so they read as "unknown", not as "off".
    observed = np.where(mask[None], observed, 0.5)
    rows = [
        ("original", result["original"].values[:n]),
        ("observed", observed),
        ("completion\n(posterior mean)", result["completion_mean"].values[:n]),
    ]
    for j in range(result.sizes["draw"]):
        rows.append((f"draw {j + 1}", result["completion_draws"].values[:n, j]))
    fig = Figure(figsize=(1.0 + 0.9 * n, 0.9 * len(rows) + 0.6), constrained_layout=True)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            _show(ax, imgs[i].transpose(1, 2, 0))
            if i == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0:
                title = f"ESS {float(result['ess'][i]):.0f}"
                if "label_posterior" in result:
                    post = result["label_posterior"].values[i]
                    title = f"y={int(post.argmax())} ({post.max():.2f})\n" + title
                elif "label" in result:
                    title = f"y={int(result['label'][i])}\n" + title
                ax.set_title(title, fontsize=6)
    fig.suptitle(f"inpainting, mask {result.attrs.get('mask', '')!r}, K={result.attrs.get('num_samples')}", fontsize=8)
    return fig


def save_figure(fig, path: Union[str, Path], dpi: int = 100) -> Path:
    """Write a Figure atomically; the format follows the file's suffix (default PNG)."""
    return io.write_figure(fig, Path(path), dpi=dpi)


# ---------------------------------------------------------------------------------------------
# Grids saved as training goes


def check_images(vae: Any, what: str, hint: str = "") -> None:
    """Refuse (ValueError, one line) ``what`` (sample grids, an inpainting) for a model whose
    datapoints are not images (``generates_images`` False: a text VAE's rows of character
    indices, whose grid would be a 1-pixel strip per sample saying nothing)."""
    if not getattr(vae, "generates_images", True):
        raise ValueError(
            f"{what} needs a model whose datapoints are images; {type(vae).__name__}'s are not "
            f"(generates_images is False){hint}"
        )


class SampleGridRecorder:
    """Saves a grid of samples from fixed z after each epoch, and an animated GIF of them.

    Call it as ``recorder(epoch, vae)`` (the signature of an ``on_epoch_end`` hook): it writes
    ``out_dir/epoch_NNNN.png`` and rewrites ``out_dir/../samples.gif`` (``gif_path``) from every
    frame in ``out_dir``, in epoch order. The z draws depend only on ``seed``, so frames
    written by separate calls or processes show the same latent points.
    """

    def __init__(
        self,
        out_dir: Union[str, Path],
        *,
        num_samples: int = 16,
        seed: int = 0,
        labels: Optional[Sequence[int]] = None,
        gif_path: Union[str, Path, None] = None,
        frame_ms: int = 500,
        dpi: int = 80,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.out_dir = Path(out_dir)
        self.gif_path = Path(gif_path) if gif_path is not None else self.out_dir.parent / "samples.gif"
        self.num_samples = num_samples
        self.seed = seed
        self.labels = labels
        self.frame_ms = frame_ms
        self.dpi = dpi

    def frame_path(self, epoch: int) -> Path:
        return self.out_dir / f"epoch_{epoch:04d}.png"

    @property
    def settings_path(self) -> Path:
        """What the frames in ``out_dir`` were drawn with (written beside them with the first)."""
        return self.out_dir / "frames.json"

    def settings(self) -> Dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "labels": None if self.labels is None else list(self.labels),
        }

    def check_settings(self) -> None:
        """A one-line ValueError when the frames on disk were drawn with other settings: one
        animation must decode the same z in every frame (a second `animate --num-samples 16`
        rewrote a frame of a 4-sample animation and rebuilt the GIF from mismatched frames)."""
        import json

        if not self.settings_path.is_file():
            return
        try:
            saved = json.loads(self.settings_path.read_text())
        except (OSError, ValueError, RecursionError):
            raise ValueError(
                f"{self.settings_path} is damaged; remove {self.out_dir} to draw the frames afresh"
            ) from None
        if saved != self.settings():

            def words(s: Dict[str, Any]) -> str:
                return ", ".join(f"{k} {v}" for k, v in s.items() if v is not None) if isinstance(s, dict) else str(s)

            raise ValueError(
                f"the frames in {self.out_dir} were drawn with {words(saved)}, not {words(self.settings())}: "
                "every frame of one animation decodes the same z; give the same settings, or remove the folder"
            )

    def __call__(self, epoch: int, vae: VAE) -> Path:
        import json

        self.check_settings()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        earlier = self.frames()
        legacy = bool(earlier) and not self.settings_path.is_file()  # frames from before the record
        if not legacy and not self.settings_path.is_file():
            io.write_text(self.settings_path, json.dumps(self.settings()))
        images = sample_images(vae, self.num_samples, labels=self.labels, seed=self.seed)
        fig = plot_image_grid(images, title=f"epoch {epoch}")
        if legacy:  # their settings are unknown, but a grid of another size is other settings
            self._check_size_against(fig, earlier[0])
        path = save_figure(fig, self.frame_path(epoch), dpi=self.dpi)
        self.write_gif()
        return path

    def frames(self) -> List[Path]:
        return sorted(self.out_dir.glob("epoch_*.png"))

    def _check_size_against(self, fig: Any, frame: Path) -> None:
        """Refuse a grid whose image size differs from ``frame``'s (frames written before the
        settings were recorded: another --num-samples or set of labels gives another size)."""
        import io as bytes_io

        from PIL import Image

        buffer = bytes_io.BytesIO()
        fig.savefig(buffer, format="png", dpi=self.dpi)
        with Image.open(buffer) as new, Image.open(frame) as old:
            new_size, old_size = new.size, old.size
        if new_size != old_size:
            raise ValueError(
                f"the frames in {self.out_dir} were drawn with other settings than num_samples {self.num_samples}"
                f" (their grids are {old_size[0]}x{old_size[1]} pixels, this one {new_size[0]}x{new_size[1]}): "
                "every frame of one animation decodes the same z; give the same settings, or remove the folder"
            )

    def check_frames(self) -> None:
        """A one-line ValueError naming the first frame on disk that is not a readable image, or
        when the frames were drawn with other settings (:meth:`check_settings`)."""
        from PIL import Image

        self.check_settings()
        for p in self.frames():
            if p.is_symlink() or not p.is_file():  # a pipe hung the reader; a link put another file in the GIF
                raise ValueError(
                    f"{p} is not a regular file (a link, a pipe or a folder), so no animation takes it; remove "
                    "it (the frame is saved again when its epoch is trained)"
                )
            try:
                with Image.open(p) as im:
                    im.convert("RGB")
            except (OSError, ValueError, SyntaxError):  # PIL's UnidentifiedImageError is an OSError
                raise ValueError(
                    f"{p} is not a readable image, so no animation can hold it; remove it (the frame "
                    "is saved again when its epoch is trained)"
                ) from None

    def write_gif(self) -> Optional[Path]:
        """Rewrite the GIF from the frames on disk; None when there are none."""
        from PIL import Image

        self.check_frames()
        frames = []
        for p in self.frames():
            with Image.open(p) as im:
                frames.append(im.convert("RGB"))
        if not frames:
            return None
        # Frames of one size: the figure size is fixed, but guard against a changed layout.
        size = frames[0].size
        frames = [f if f.size == size else f.resize(size) for f in frames]
        return io.write_with(
            self.gif_path,
            lambda tmp: frames[0].save(
                tmp, format="GIF", save_all=True, append_images=frames[1:], duration=self.frame_ms, loop=0
            ),
        )


class EveryFewEpochs:
    """``recorder(epoch, vae)`` every ``every`` epochs and at ``last`` (a picklable epoch callback)."""

    def __init__(self, recorder: SampleGridRecorder, every: int, last: int):
        self.recorder, self.every, self.last = recorder, every, last

    def __call__(self, epoch: int, vae: VAE) -> None:
        if epoch and (epoch % self.every == 0 or epoch == self.last):
            self.recorder(epoch, vae)


# ---------------------------------------------------------------------------------------------
# Inpainting


class _Program:
    """One run of a model's own program (its Pyro ``model``) on ``n`` particles: the latent draws
    (every unobserved sample site, by name), their log density and the observed site ``"x"``.

    The particles sit in the model's data plate (``n`` placeholder datapoints: the observed
    values are never scored), so a draw of the whole prior, every latent site of any model that
    keeps the contract, costs one run. ``latents`` conditions the program on given values (to
    score draws made elsewhere); ``labels`` fixes a conditional model's label: passed as ``y``
    and, where the model samples it as a site ``"y"``, observed there."""

    def __init__(self, vae: VAE, n: int, labels: Optional[Tensor], latents: Optional[Dict[str, Tensor]] = None):
        param = next(vae.parameters())
        placeholder = param.new_zeros((n, *vae.event_shape))
        data = dict(latents or {})
        if labels is not None:
            data["y"] = labels
        program = poutine.condition(vae.model, data=data) if data else vae.model
        trace = poutine.trace(program).get_trace(placeholder, labels)
        site = trace.nodes.get("x")
        if site is None or site["type"] != "sample" or not site["is_observed"]:
            raise ValueError(
                f"model {type(vae).__name__} cannot be inpainted: its program has no observed site 'x' "
                "(the contract of ppl_vae.models.vae)"
            )
        # the latent sites, in the program's order: unobserved, or observed only because conditioned here
        self.sites = [
            name
            for name, node in trace.nodes.items()
            if node["type"] == "sample"
            and not site_is_subsample(node)  # the data plate's own record
            and (name in (latents or {}) or not node["is_observed"])
        ]
        # pyro.sample takes a (torch) distribution: the observed site's fn is the likelihood's
        self.trace, self.n = trace, n
        self.x_dist = cast(torch.distributions.Distribution, site["fn"])
        self.vae_name = type(vae).__name__

    @property
    def latents(self) -> Dict[str, Tensor]:
        return {name: _site_value(self.trace, name) for name in self.sites}

    def log_density(self, sites: Sequence[str]) -> Tensor:
        """Sum over ``sites`` of each one's log density at its value, ``(n,)``."""
        return _log_density(self.trace, sites, self.n, self.vae_name)

    def mean(self) -> Tensor:
        """E[x | latents], ``(n, *event)``."""
        return self.x_dist.mean

    def masked_log_lik(self, x: Tensor, mask: Tensor) -> Tensor:
        """log p(x_obs | latents), ``(n,)``: the likelihood's per-element terms where ``mask`` is 1
        (exact when the elements are independent given the latents, which is checked)."""
        d = self.x_dist
        while isinstance(d, torch.distributions.Independent):
            d = d.base_dist
        log_p = d.log_prob(x.expand(self.n, *x.shape))
        if tuple(log_p.shape) != (self.n, *x.shape):
            raise ValueError(
                f"model {self.vae_name} cannot be inpainted: its likelihood does not score each element "
                f"of a datapoint on its own (per-element log-probabilities of shape {tuple(log_p.shape)}, "
                f"expected {(self.n, *x.shape)})"
            )
        return (log_p * mask).flatten(start_dim=1).sum(-1)


def _site_value(trace: Any, name: str) -> Tensor:
    """The value of the sample site ``name`` of ``trace`` (a traced sample site always has one)."""
    value = trace.nodes[name]["value"]
    assert value is not None, f"sample site {name!r} has no value"
    return value


def _log_density(trace: Any, sites: Sequence[str], n: int, vae_name: str) -> Tensor:
    total: Any = 0.0
    for name in sites:
        node = trace.nodes[name]
        log_p = node["fn"].log_prob(node["value"])
        if tuple(log_p.shape) != (n,):
            raise ValueError(
                f"model {vae_name} cannot be inpainted: site {name!r} has log-density shape "
                f"{tuple(log_p.shape)}, not one value per datapoint of the data plate ({n},)"
            )
        total = total + log_p
    return total


def _guide_trace(vae: VAE, x: Tensor, n: int, labels: Optional[Tensor], latents: Optional[Dict[str, Tensor]] = None):
    """A run of the guide on ``n`` copies of one datapoint ``x`` ``(1, *event)``, conditioned
    on ``latents`` when given."""
    guide = poutine.condition(vae.guide, data=latents) if latents else vae.guide
    return poutine.trace(guide).get_trace(x.expand(n, *x.shape[1:]), labels)


PROPOSALS = ("prior", "encoder")


def _weighted(log_w: Tensor, means: Tensor, x: Tensor, mask: Tensor, num_draws: int, gen: torch.Generator) -> dict:
    """Summaries of one image's weighted sample: ``log_w`` ``(H, K)`` over hypotheses (labels)
    and particles, ``means`` ``(H, K, *event)`` the matching E[x | z, y]."""
    flat = log_w.flatten()
    w = torch.softmax(flat, 0)
    mean_stack = means.flatten(0, 1)
    completion = torch.where(mask, x, torch.tensordot(w, mean_stack, dims=1))
    if num_draws:
        idx = torch.multinomial(w.cpu(), num_draws, replacement=True, generator=gen).to(x.device)
        draws = torch.where(mask, x, mean_stack[idx])
    else:
        draws = x.new_zeros((0, *x.shape))
    return {
        "completion": completion,
        "draws": draws,
        "log_evidence": torch.logsumexp(flat, 0) - math.log(log_w.shape[1]),
        "ess": 1.0 / (w**2).sum(),
        "label_posterior": torch.softmax(torch.logsumexp(log_w, 1), 0),
    }


@torch.no_grad()
def inpaint(
    vae: VAE,
    x: Tensor,
    mask: Union[str, Tensor],
    *,
    y: Optional[Tensor] = None,
    num_samples: int = 2000,
    num_draws: int = 4,
    proposal: str = "prior",
    seed: int = 0,
) -> xr.Dataset:
    """Complete images ``x`` ``(N, *event_shape)`` from the pixels where ``mask`` is True.

    Self-normalized importance sampling (see the module docstring) with ``num_samples``
    particles. ``proposal="prior"``: z_k ~ p(z) (every latent site, drawn by the model's program;
    a conditional model's program runs once per label), shared by all images. ``proposal="encoder"``:
    a second pass that runs the guide on each image completed by the first pass and draws half the
    particles from that q(z | x_completed, y) and half from p(z) (a defensive mixture, so the
    weights p(x_obs | z) p(z) / q_mix(z) stay bounded); it raises the effective sample size
    when the posterior is much narrower than the prior. For a conditional model, ``y`` gives
    the labels ``(N,)``; when None, every label is tried with a uniform p(y) and the result
    holds ``label_posterior`` p(y | x_obs) (the weights then cover ``num_samples * num_classes``
    pairs (z_k, y), attribute ``num_weights``). Returns a Dataset with dims ``image``, ``draw``,
    ``channel``, ``row``, ``col`` (and ``label``): ``original``, ``mask``, ``completion_mean``
    (observed pixels kept, missing ones E[x_miss | x_obs]), ``completion_draws`` (decoded z drawn
    from the weighted sample), ``log_evidence`` (the importance-sampling estimate of
    log p(x_obs)) and ``ess`` (effective sample size of the weights). A model whose datapoints
    are not images, whose program has no observed site ``"x"`` or whose likelihood does not
    score each element on its own is refused with a ValueError naming it. The global RNG state
    is left as it was.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if num_draws < 0:
        raise ValueError(f"num_draws must be >= 0, got {num_draws}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {', '.join(PROPOSALS)}, got {proposal!r}")
    event_shape = tuple(vae.event_shape)
    if tuple(x.shape[1:]) != event_shape:
        raise ValueError(f"x must have shape (N, {', '.join(map(str, event_shape))}), got {tuple(x.shape)}")
    mask_name = mask if isinstance(mask, str) else "custom"
    mask_t = make_mask(mask, event_shape) if isinstance(mask, str) else mask.to(torch.bool)
    if tuple(mask_t.shape) != event_shape:
        raise ValueError(f"mask must have the datapoints' shape {event_shape}, got {tuple(mask_t.shape)}")
    check_images(vae, "inpainting")
    device = _device(vae)
    x, mask_t = x.to(device), mask_t.to(device)
    maskf = mask_t.to(x.dtype)
    conditional = vae.num_classes is not None
    if not conditional and y is not None:
        raise ValueError(f"y needs a conditional model (cvae, m2); this model ({type(vae).__name__}) takes no labels")
    classes: List[Optional[int]] = [None]
    if conditional:
        labelled = list(range(int(cast(int, vae.num_classes)))) if y is None else sorted({int(c) for c in y.tolist()})
        _check_labels(vae, labelled)
        classes = list(labelled)
    log_p_y = -math.log(len(classes)) if conditional and y is None else 0.0  # uniform p(y)

    def labels(c: Optional[int], n: int) -> Optional[Tensor]:
        return None if c is None else torch.full((n,), c, dtype=torch.long, device=device)

    def hypotheses(n: int) -> list:
        return [None] if not conditional else (classes if y is None else [int(y[n])])

    devices = [device.index or 0] if device.type == "cuda" else []
    with eval_mode(vae), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # Pass 1, proposal p(latents): one run of the model's program per hypothesis (label),
        # ``num_samples`` particles shared by all images.
        prior_runs = {c: _Program(vae, num_samples, labels(c, num_samples)) for c in classes}
        means = {c: run.mean() for c, run in prior_runs.items()}
        results = []
        for n in range(x.shape[0]):
            hyps = hypotheses(n)
            log_w = torch.stack([prior_runs[c].masked_log_lik(x[n], maskf) for c in hyps]) + log_p_y
            results.append(_weighted(log_w, torch.stack([means[c] for c in hyps]), x[n], mask_t, num_draws, gen))
        if proposal == "encoder":
            # Pass 2: half the particles from the pass-1 prior draws, half from the guide at the
            # pass-1 completion; each weighted against the mixture of the two densities.
            half = num_samples // 2
            for n in range(x.shape[0]):
                x_fill = results[n]["completion"][None]
                log_ws, mean_list = [], []
                for c in hypotheses(n):
                    sites = prior_runs[c].sites
                    drawn = _guide_trace(vae, x_fill, num_samples - half, labels(c, num_samples - half))
                    missing = [s for s in sites if s not in drawn.nodes]
                    if missing:
                        raise ValueError(
                            f"model {type(vae).__name__} cannot be inpainted with proposal 'encoder': its guide "
                            f"does not sample the latent site(s) {', '.join(map(repr, missing))}"
                        )
                    latents = {
                        s: torch.cat([_site_value(prior_runs[c].trace, s)[:half], drawn.nodes[s]["value"]])
                        for s in sites
                    }
                    run = _Program(vae, num_samples, labels(c, num_samples), latents)
                    log_prior = run.log_density(sites)
                    scored = _guide_trace(vae, x_fill, num_samples, labels(c, num_samples), latents)
                    log_guide = _log_density(scored, sites, num_samples, type(vae).__name__)
                    log_q = torch.logaddexp(log_prior, log_guide) - math.log(2.0)
                    log_ws.append(run.masked_log_lik(x[n], maskf) + log_prior - log_q + log_p_y)
                    mean_list.append(run.mean())
                results[n] = _weighted(torch.stack(log_ws), torch.stack(mean_list), x[n], mask_t, num_draws, gen)
    completion_mean = [r["completion"] for r in results]
    draws = [r["draws"] for r in results]
    log_evidence = [r["log_evidence"] for r in results]
    ess = [r["ess"] for r in results]
    label_post = [r["label_posterior"] for r in results]

    shape = _image_shape(event_shape)
    as_img = lambda t: t.reshape(*t.shape[: t.dim() - len(event_shape)], *shape).cpu().numpy()  # noqa: E731
    data_vars: Dict[str, tuple] = {
        "original": (("image", *IMAGE_DIMS), as_img(x)),
        "mask": (IMAGE_DIMS, as_img(mask_t)),
        "completion_mean": (
            ("image", *IMAGE_DIMS),
            as_img(torch.stack(completion_mean)),
            {"description": "observed pixels kept; missing ones E[x_miss | x_obs] (self-normalized IS)"},
        ),
        "completion_draws": (
            ("image", "draw", *IMAGE_DIMS),
            as_img(torch.stack(draws)),
            {"description": "E[x | z] for z drawn from the weighted sample, observed pixels kept"},
        ),
        "log_evidence": (
            "image",
            torch.stack(log_evidence).cpu().numpy(),
            {
                "description": "log p(x_obs) estimated as log (1/K) sum_k w_k, nats (a stochastic lower bound)",
                "bound": "lower bound",
            },
        ),
        "ess": ("image", torch.stack(ess).cpu().numpy(), {"description": "effective sample size of the K weights"}),
    }
    if conditional and y is None:
        data_vars["label_posterior"] = (
            ("image", "label"),
            torch.stack(label_post).cpu().numpy(),
            {"description": "p(y | x_obs) under a uniform p(y)"},
        )
    elif conditional:
        assert y is not None  # the branch above took y None
        data_vars["label"] = ("image", y.cpu().numpy())
    num_weights = num_samples * (len(classes) if conditional and y is None else 1)
    ds = xr.Dataset(
        data_vars,
        attrs={
            "mask": mask_name,
            "num_samples": num_samples,
            "num_weights": num_weights,
            "seed": seed,
            "proposal": proposal,
            "method": "self-normalized importance sampling",
        },
    )
    return ds


# ---------------------------------------------------------------------------------------------
# Latent traversals


@torch.no_grad()
def latent_traversal(
    vae: VAE,
    x: Optional[Tensor] = None,
    *,
    dims: Optional[Sequence[int]] = None,
    num_steps: int = 9,
    span: float = 3.0,
    sort_by_kl: bool = True,
) -> xr.Dataset:
    """Decoded means E[x|z] as each latent dimension j sweeps ``num_steps`` values in
    [-``span``, ``span``] with the others fixed (Higgins et al. 2017, fig. 7).

    The fixed point is the encoder's mean for ``x[0]`` when ``x`` is given, else the prior's
    mean (zero). ``x`` (a batch) also gives each dimension's mean KL(q(z_j|x) || p(z_j)) (closed form
    for a diagonal Normal prior; else NaN) and activity Var_x E_q[z_j|x]; with ``sort_by_kl`` the
    rows come in decreasing KL (activity where KL is unknown); the ``order`` attribute says which.
    KL and activity usually agree, but not always: a unit below the activity threshold can have more
    KL than an active one.
    ``dims``: the latent dimensions to traverse (default all). Returns ``image`` with dims
    ``(latent, step, channel, row, col)``, ``value`` (step), ``kl`` and ``activity`` (latent).
    """
    from ppl_vae.analysis.diagnostics import collapse_diagnostics

    latent_dim = int(vae.latent_dim)
    dims = list(range(latent_dim)) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < latent_dim]
    if bad or not dims:
        raise ValueError(
            f"dims: latent dimension(s) {bad or dims} do not exist; the model's z has {latent_dim} "
            f"dimensions (0..{latent_dim - 1})"
        )
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not (span > 0 and math.isfinite(span)):
        raise ValueError(f"span must be a positive number, got {span}")
    device = _device(vae)
    with eval_mode(vae):
        kl = np.full(latent_dim, np.nan)
        activity = np.full(latent_dim, np.nan)
        if x is not None:
            x = x.to(device)
            base = vae.encode(x[:1])[0][0]
            if x.shape[0] >= 2:
                diag = collapse_diagnostics(vae.model, vae.guide, x)
                kl, activity = diag["kl"].values, diag["activity"].values
        else:
            base = torch.zeros(latent_dim, device=device)
        order = "as given"
        if sort_by_kl:
            key = np.where(np.isfinite(kl), kl, np.where(np.isfinite(activity), activity, 0.0))
            dims = sorted(dims, key=lambda d: -key[d])
            known = np.isfinite(kl[dims]).all(), np.isfinite(activity[dims]).all()
            order = "by KL, largest first" if known[0] else "by activity, largest first" if known[1] else "as given"
        values = torch.linspace(-span, span, num_steps, device=device)
        z = base.repeat(len(dims), num_steps, 1)
        for i, d in enumerate(dims):
            z[i, :, d] = values
        images = vae.decode(z.reshape(-1, latent_dim))
    frames = images.reshape(len(dims), num_steps, *_image_shape(vae.event_shape)).cpu().numpy()
    return xr.Dataset(
        {
            "image": (("latent", "step", *IMAGE_DIMS), frames),
            "value": ("step", values.cpu().numpy()),
            "kl": ("latent", kl[dims]),
            "activity": ("latent", activity[dims]),
        },
        coords={"latent": dims, "step": np.arange(num_steps)},
        attrs={
            "description": "E[x|z] with z_j swept and the other dimensions fixed",
            "fixed_point": "encoder mean of the first datapoint" if x is not None else "prior mean (zero)",
            "order": order,
        },
    )


def tick_label(value: float) -> str:
    """``value`` as a tick label that shows it exactly (-2.25, 0.75, 3), not rounded to one
    decimal; float noise of a linspace (0.30000000000000004) is dropped."""
    return f"{float(value):.6g}"


def plot_traversal(traversal: xr.Dataset, cell_inches: float = 0.55):
    """One row per latent dimension (in the traversal's order), one column per value; each row
    labelled with its dimension and KL. Returns a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    images = traversal["image"].transpose("latent", "step", *IMAGE_DIMS).values
    nrows, ncols = images.shape[:2]
    tiled = _tile(images.reshape(-1, *images.shape[2:]), ncols)
    fig = Figure(figsize=(ncols * cell_inches + 1.4, nrows * cell_inches + 0.6), constrained_layout=True)
    ax = fig.add_subplot()
    _show(ax, tiled)
    h, w = images.shape[3] + 1, images.shape[4] + 1
    labels = []
    for j, kl in zip(traversal["latent"].values, traversal["kl"].values):
        labels.append(f"z{int(j)}" + (f"  KL {kl:.2f}" if np.isfinite(kl) else ""))
    ax.set_yticks([i * h + (h - 1) / 2 for i in range(nrows)])
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xticks([i * w + (w - 1) / 2 for i in range(ncols)])
    ax.set_xticklabels([tick_label(v) for v in traversal["value"].values], fontsize=6)
    ax.set_xlabel("value of the traversed dimension (others fixed)", fontsize=7)
    order = str(traversal.attrs.get("order", "as given"))
    ax.set_title("latent traversals" + ("" if order == "as given" else f", sorted {order}"), fontsize=8)
    return fig
