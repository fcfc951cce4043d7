"""Hybrid convolutional-recurrent text VAE (Semeniuta, Severyn & Barth 2017, "A Hybrid
Convolutional Variational Autoencoder for Text Generation").

Character level. Encoder: embedding, strided Conv1d layers, a dense layer to (loc, scale).
Decoder: a dense layer and transposed Conv1d layers turn z into one feature vector per
position; an LSTM reads those features together with the previous character and predicts
the next. The auxiliary term alpha * log p_aux(x | z), with p_aux a per-position softmax on the
deconvolutional features alone, forces z to carry the sentence (the paper's remedy for
posterior collapse). It is an extra training objective, not part of log p(x, z): it is added
with ``pyro.factor("aux", ...)`` only while the module is in training mode, so the ELBO and
importance-weighted estimates of an evaluated model (``vae.eval()``) see only ``"z"`` and ``"x"``.

``history=False`` is the historyless decoder: the LSTM gets the features but no previous
characters, so everything it knows about the sentence comes through z.

The likelihood is :class:`CategoricalLikelihood` with ``end_index``: positions after the first
end-of-text token are padding and are not scored, so p(x|z) is a distribution over sentences
of any length up to ``max_length``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor, nn

from ppl_vae.data.text import END_INDEX, VOCAB_SIZE
from ppl_vae.errors import DataError
from ppl_vae.models.likelihoods import LIKELIHOODS, Likelihood
from ppl_vae.models.priors import Prior
from ppl_vae.models.vae import VAE, data_plate
from ppl_vae.models.zoo import MODELS, ModelSpec


def _after_end(value: Tensor, end_index: int) -> Tensor:
    """Bool mask of positions (last dim) strictly after the first ``end_index``."""
    is_end = (value == end_index).long()
    return (is_end.cumsum(-1) - is_end) > 0


class EndOfTextCategorical(dist.TorchDistribution):
    """Independent categoricals over the last ``event_dims`` dims of ``logits[..., :-1]``;
    with ``end_index``, positions after the first end token (along the last event dim) are
    padding: not scored by ``log_prob`` and set to ``end_index`` by ``sample``."""

    arg_constraints = {"logits": constraints.real}
    has_enumerate_support = False

    def __init__(self, logits: Tensor, event_dims: int = 1, end_index: Optional[int] = None, validate_args=None):
        self.logits = logits
        self.event_dims = event_dims
        self.end_index = end_index
        shape = logits.shape[:-1]
        batch_shape, event_shape = shape[: len(shape) - event_dims], shape[len(shape) - event_dims :]
        super().__init__(batch_shape, event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self):
        return constraints.integer_interval(0, self.logits.shape[-1] - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        logits = self.logits.expand(batch_shape + self.event_shape + self.logits.shape[-1:])
        return EndOfTextCategorical(logits, self.event_dims, self.end_index)

    def _pad(self, value: Tensor) -> Tensor:
        if self.end_index is None:
            return value
        return value.masked_fill(_after_end(value, self.end_index), self.end_index)

    def log_prob(self, value: Tensor) -> Tensor:
        index = value.long()
        logits = self.logits
        shape = torch.broadcast_shapes(index.shape, logits.shape[:-1])
        log_p = torch.log_softmax(logits, -1).expand(*shape, logits.shape[-1])
        lp = log_p.gather(-1, index.expand(shape).unsqueeze(-1)).squeeze(-1)
        if self.end_index is not None:
            lp = lp.masked_fill(_after_end(index.expand(shape), self.end_index), 0.0)
        return lp.reshape(*lp.shape[: lp.dim() - self.event_dims], -1).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            draws = dist.Categorical(logits=self.logits).sample(sample_shape)
            return self._pad(draws).to(self.logits.dtype)

    @property
    def mode(self) -> Tensor:
        return self._pad(self.logits.argmax(-1)).to(self.logits.dtype)

    @property
    def mean(self) -> Tensor:
        """The mode (a categorical over symbols has no meaningful mean)."""
        return self.mode


class CategoricalLikelihood(Likelihood):
    """A categorical over ``num_categories`` symbols per element (e.g. characters of a sentence).

    The decoder returns ``num_categories`` logit tensors shaped like one datapoint (the
    likelihood contract); data are integer indices in [0, num_categories - 1] (stored as
    float). With ``end_index``, positions after the first end token are unscored padding.
    """

    name = "categorical"

    def __init__(self, event_dims: int = 1, num_categories: int = 2, end_index: Optional[int] = None):
        super().__init__()
        if isinstance(num_categories, bool) or not isinstance(num_categories, int) or num_categories < 2:
            raise ValueError(f"num_categories must be an integer >= 2, got {num_categories!r}")
        self.event_dims = event_dims
        self.num_categories = num_categories
        self.num_params = num_categories
        self.end_index = end_index
        self.support = (0.0, float(num_categories - 1))

    def forward(self, *logits: Tensor) -> dist.Distribution:
        return EndOfTextCategorical(torch.stack(logits, -1), self.event_dims, self.end_index)

    def mean(self, *logits: Tensor) -> Tensor:
        """The most probable symbol of each element (padding after the end token)."""
        return self(*logits).mode

    def check_support(self, x: Tensor, what: str = "data") -> None:
        super().check_support(x, what)
        if not torch.equal(x, x.round()):
            raise DataError(f"likelihood {self.name!r} needs {what} to hold integer symbol indices")
        if self.end_index is not None:  # end-padded texts: after the first end symbol, only end symbols
            is_end = x == self.end_index
            if bool(((is_end.cumsum(-1) > 0) & ~is_end).any()):
                raise DataError(
                    f"likelihood {self.name!r} reads {what} as end-padded texts (symbol {self.end_index} ends a "
                    f"text and every element after it is unscored padding), but {what} has other symbols after "
                    "an end symbol (images, say): use likelihood 'categorical', which scores every element"
                )


LIKELIHOODS.register("categorical", doc="categorical over num_categories symbols per element (character indices)")(
    CategoricalLikelihood
)


@LIKELIHOODS.register(
    "categorical_text", doc="categorical over the text alphabet; positions after end-of-text unscored"
)
def text_likelihood(
    event_dims: int = 1, num_categories: int = VOCAB_SIZE, end_index: Optional[int] = END_INDEX
) -> CategoricalLikelihood:
    """:class:`CategoricalLikelihood` over ``ppl_vae.data.text``'s alphabet, ending at its end token."""
    likelihood = CategoricalLikelihood(event_dims, num_categories, end_index)
    likelihood.name = "categorical_text"  # what errors call it: the name it was chosen by
    return likelihood


def _lead(x: Tensor, event_dims: int) -> Tuple[torch.Size, int]:
    batch = x.shape[: x.dim() - event_dims]
    return batch, int(torch.Size(batch).numel())


class ConvTextEncoder(nn.Module):
    """x ``(..., length)`` indices -> (loc, scale) ``(..., latent_dim)``: embedding, three
    Conv1d layers of stride 2 (kernel 3), a dense layer."""

    def __init__(self, length: int, latent_dim: int, vocab_size: int, channels: int = 128, embed_dim: int = 32):
        super().__init__()
        self.length = length
        self.embed = nn.Embedding(vocab_size, embed_dim)
        c = channels
        self.convs = nn.Sequential(
            nn.Conv1d(embed_dim, c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(2 * c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * c * (length // 8), 2 * latent_dim)
        # He init and a narrow q(z|x) at the start: the code then differs between sentences
        # by more than its noise from the first steps (else the KL term wins before z is used).
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if isinstance(m, nn.Conv1d) else "linear")
                assert m.bias is not None  # built with bias=True above
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.bias[latent_dim:].fill_(-4.0)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        batch, n = _lead(x, 1)
        h = self.embed(x.reshape(n, self.length).long()).transpose(1, 2)
        loc, log_var = self.head(self.convs(h).flatten(1)).chunk(2, -1)
        scale = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
        return loc.reshape(*batch, -1), scale.reshape(*batch, -1)


class HybridTextDecoder(nn.Module):
    """z -> per-position deconvolutional features -> LSTM over (features, previous character).

    ``forward(z, x)`` returns the ``vocab_size`` logit tensors ``(..., length)`` of p(x|z)
    with teacher forcing on ``x``; without ``x`` it decodes greedily (one character at a
    time when the decoder has history). :meth:`logits` also returns the auxiliary logits.
    """

    def __init__(
        self,
        latent_dim: int,
        length: int,
        vocab_size: int,
        channels: int = 128,
        embed_dim: int = 32,
        history: bool = True,
    ):
        super().__init__()
        self.length, self.vocab_size, self.history = length, vocab_size, history
        self.num_params = vocab_size
        c = channels
        self.start_shape = (2 * c, length // 8)
        self.dense = nn.Linear(latent_dim, 2 * c * (length // 8))
        self.deconvs = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose1d(2 * c, 2 * c, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(2 * c, c, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(c, c, 4, stride=2, padding=1),
            nn.ReLU(),
        )
        self.aux_head = nn.Conv1d(c, vocab_size, 1)
        self.embed = nn.Embedding(vocab_size + 1, embed_dim)  # the extra index starts a sentence
        if not history:  # kept for the checkpoint's layout, but historyless decoding never reads it
            self.embed.requires_grad_(False)
        self.lstm = nn.LSTM(c + embed_dim, c, batch_first=True)
        self.out = nn.Linear(c, vocab_size)

    def features(self, z: Tensor) -> Tensor:
        """``(n, length, channels)`` features for ``(n, latent_dim)`` codes."""
        h = self.dense(z).reshape(-1, *self.start_shape)
        return self.deconvs(h).transpose(1, 2)

    def _previous(self, x: Tensor) -> Tensor:
        start = torch.full_like(x[:, :1], self.vocab_size)
        prev = torch.cat([start, x[:, :-1]], 1)
        emb = self.embed(prev)
        return emb if self.history else torch.zeros_like(emb)

    def logits(self, z: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits, auxiliary logits), each ``(..., length, vocab_size)``, teacher-forced on ``x``."""
        batch, n = _lead(z, 1)
        x = x.long().expand(*batch, self.length).reshape(n, self.length)
        feats = self.features(z.reshape(n, -1))
        aux = self.aux_head(feats.transpose(1, 2)).transpose(1, 2)
        h, _ = self.lstm(torch.cat([feats, self._previous(x)], -1))
        shape = (*batch, self.length, self.vocab_size)
        return self.out(h).reshape(shape), aux.reshape(shape)

    @torch.no_grad()
    def generate(self, z: Tensor, temperature: float = 0.0) -> Tensor:
        """Indices ``(..., length)`` decoded from z: greedy (``temperature=0``) or sampled."""
        batch, n = _lead(z, 1)
        feats = self.features(z.reshape(n, -1))
        prev = torch.full((n, 1), self.vocab_size, dtype=torch.long, device=z.device)
        state, chars = None, []
        for t in range(self.length):
            emb = self.embed(prev) if self.history else torch.zeros_like(self.embed(prev))
            h, state = self.lstm(torch.cat([feats[:, t : t + 1], emb], -1), state)
            logits = self.out(h[:, 0])
            if temperature > 0:
                prev = torch.multinomial(torch.softmax(logits / temperature, -1), 1)
            else:
                prev = logits.argmax(-1, keepdim=True)
            chars.append(prev)
        out = torch.cat(chars, 1)
        out = out.masked_fill(_after_end(out, END_INDEX), END_INDEX)
        return out.reshape(*batch, self.length).float()

    def forward(self, z: Tensor, x: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        if x is None:
            x = self.generate(z)
        return tuple(self.logits(z, x)[0].unbind(-1))


class TextHybridVAE(VAE):
    """The hybrid VAE as a model/guide pair; ``alpha`` weighs the auxiliary term in training."""

    has_fast_path = False  # model/guide differ from the parts-based VAE's: analysis goes through traces
    generates_images = False  # x is a row of character indices: `ppl-vae text` decodes samples
    decoder: HybridTextDecoder

    def __init__(
        self,
        encoder: ConvTextEncoder,
        decoder: HybridTextDecoder,
        prior: Prior,
        likelihood: Likelihood,
        event_shape: Sequence[int],
        alpha: float = 1.0,
    ):
        super().__init__(encoder, decoder, prior, likelihood, event_shape)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        if alpha == 0:  # no auxiliary term: its head gets no gradient, so it is frozen, not trained
            decoder.aux_head.requires_grad_(False)

    def model(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """p(z) p(x|z) with the LSTM decoder; in training mode also alpha * log p_aux(x|z)."""
        with data_plate(x, num_data):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            logits, aux_logits = self.decoder.logits(z, x)
            pyro.sample("x", self.likelihood(*logits.unbind(-1)), obs=x)
            if self.training and self.alpha > 0:
                aux = self.likelihood(*aux_logits.unbind(-1)).log_prob(x)
                pyro.factor("aux", self.alpha * aux)
        return z

    def decode(self, z: Tensor, temperature: float = 0.0) -> Tensor:
        """Character indices ``(..., length)`` decoded from z (greedy by default)."""
        return self.decoder.generate(z, temperature)

    def sample(self, num_samples: int, temperature: float = 1.0) -> Tensor:
        """Sentences (indices) for z ~ p(z), characters drawn at ``temperature`` (0: greedy)."""
        return self.decode(self.prior().sample((num_samples,)), temperature)


def build_text_hybrid(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    *,
    alpha: float = 1.0,
    history: bool = True,
    vocab_size: int = VOCAB_SIZE,
    **data_info,
) -> TextHybridVAE:
    """The hybrid VAE for sentences of ``event_shape = (length,)`` character indices;
    ``hidden_dim`` is the width (conv channels, LSTM units)."""
    event_shape = tuple(event_shape)
    if len(event_shape) != 1 or event_shape[0] % 8 or event_shape[0] < 8:
        raise ValueError(
            f"model 'text_hybrid' needs datapoints of shape (length,) with length a multiple of 8 "
            f"(character indices), got shape {event_shape}"
        )
    vocab_size = int(vocab_size)
    if not isinstance(likelihood, CategoricalLikelihood):
        raise ValueError(f"model 'text_hybrid' needs a categorical likelihood, got {likelihood.name!r}")
    if likelihood.num_categories != vocab_size:
        name = likelihood.name
        likelihood = CategoricalLikelihood(likelihood.event_dims, vocab_size, likelihood.end_index)
        likelihood.name = name
    encoder = ConvTextEncoder(event_shape[0], latent_dim, vocab_size, hidden_dim)
    decoder = HybridTextDecoder(latent_dim, event_shape[0], vocab_size, hidden_dim, history=history)
    return TextHybridVAE(encoder, decoder, prior, likelihood, event_shape, alpha=alpha)


def _variant(name: str, **options):
    def build(*args, **kwargs):
        try:
            return build_text_hybrid(*args, **options, **kwargs)
        except ValueError as exc:  # the refusal names the model the user chose
            raise ValueError(str(exc).replace("model 'text_hybrid'", f"model {name!r}")) from None

    return build


for _name, _options, _doc in (
    ("text_hybrid", {}, "Semeniuta et al. 2017: conv encoder, deconv + LSTM decoder, auxiliary loss alpha=1"),
    ("text_hybrid_noaux", {"alpha": 0.0}, "text_hybrid without the auxiliary reconstruction term (alpha=0)"),
    (
        "text_hybrid_historyless",
        {"history": False},
        "text_hybrid whose LSTM sees no previous characters (historyless decoding)",
    ),
):
    MODELS.register(_name, doc=_doc)(
        ModelSpec(_variant(_name, **_options), _doc, likelihood="categorical_text", latent_dim=32, hidden_dim=128)
    )
