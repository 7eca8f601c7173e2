"""Extended Textual Inversion embeddings for gen_img (kohya's ``--XTI_embeddings``, SD 1.x only).

An XTI file (kohya's layout, see :mod:`library.models.xti`) holds ``n`` vectors for each of the 16
cross-attention layers of the UNet. As with ``--textual_inversion_embeddings`` the file's stem
(lower case) is the prompt word and stands for all ``n`` vectors.

How a prompt is conditioned: for each layer, every XTI word of the prompt is replaced by that
layer's tokens (``word`` -> ``word_in01 word_in01_1 ...``; the tokens are added to the tokenizer and
text encoder with diffusers' ``load_textual_inversion``, one set per layer, the same surgery as plain
embeddings) and the prompt is encoded, so each of the 16 layers gets its own text hidden states
(weighting, long prompts and ``BREAK`` apply to each as usual). The hooked UNet
(:func:`library.models.xti.enable_per_block_conditioning`) gives every cross-attention layer its own.
kohya's gen_img does the same with 16 tokens per vector and a per-layer token replacement. Because the
layer encodings are computed one by one exactly like a plain prompt, a file whose 16 layers hold the
same vectors renders exactly the image of a plain embedding with those vectors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from library.errors import ConfigError
from library.inference.textual_inversion import add_tokens, embedding_loader, prompt_word
from library.models.families import Family
from library.models.xti import XTI_LAYERS, layer_token_names, read_xti_file

logger = logging.getLogger(__name__)

FLAG = "--XTI_embeddings"
Converter = Callable[[str, Any], str]


@dataclass
class XTIFile:
    """One XTI file, read and checked before the model is loaded.

    Attributes:
        token: the prompt word (the file stem, lower case).
        vectors: ``[16, n, D]`` float32, in :data:`~library.models.xti.XTI_LAYERS` order.
    """

    path: str
    token: str
    vectors: torch.Tensor


def read_xti_embeddings(paths: Sequence[str] | None, *, allow_pickle: bool = False,
                        other_words: dict[str, str] | None = None) -> list[XTIFile]:
    """Read and check every ``--XTI_embeddings`` file (no model needed).

    Args:
        other_words: words already taken (plain embeddings), word -> file, for the duplicate check.

    Raises:
        ConfigError: a missing file, a pickle without ``allow_pickle``, a stem that cannot be a prompt
            word, or a word used by two files.
        ModelLoadError: an unreadable file or not kohya's XTI layout.
    """
    out: list[XTIFile] = []
    seen = dict(other_words or {})
    for p in paths or []:
        token = prompt_word(p, FLAG, seen)
        out.append(XTIFile(p, token, read_xti_file(p, FLAG, allow_pickle)))
    return out


@dataclass
class LoadedXTI:
    """XTI words added to a model; :meth:`converter` gives each layer's prompt rewriting."""

    files: list[XTIFile]
    loader: Any  # a diffusers pipeline (TextualInversionLoaderMixin) over the same tokenizer

    def converter(self, layer: str, then: Converter | None = None) -> Converter:
        """``(text, tokenizer) -> text`` with every XTI word written as ``layer``'s tokens.

        Args:
            then: applied afterwards (the plain embeddings' converter); by default diffusers'
                multi-vector expansion (``w_in01`` -> ``w_in01 w_in01_1 ...``), which ``then`` also does.
        """
        words = sorted((f.token for f in self.files), key=len, reverse=True)  # longest first: "ab" before "a"
        pattern = re.compile("|".join(map(re.escape, words)), flags=re.IGNORECASE)
        suffix = "_" + layer.lower()

        def convert(text: str, tokenizer: Any) -> str:
            text = pattern.sub(lambda m: m.group(0).lower() + suffix, text)
            return then(text, tokenizer) if then else self.loader.maybe_convert_prompt(text, tokenizer)

        return convert

    def converters(self, then: Converter | None = None) -> list[Converter]:
        """One converter per layer, in ``XTI_LAYERS`` order."""
        return [self.converter(layer, then) for layer in XTI_LAYERS]


def _check_fits(f: XTIFile, model: Any) -> None:
    where = f"{FLAG} {f.path}"
    if model.family is not Family.SD1:
        raise ConfigError(f"{where}: Extended Textual Inversion is for SD 1.x models, but the model is "
                          f"{model.family.pretty}; use --textual_inversion_embeddings with a plain embedding")
    te, tok = model.text_encoders[0], model.tokenizers[0]
    width = te.get_input_embeddings().weight.shape[-1]
    if f.vectors.shape[-1] != width:
        raise ConfigError(f"{where}: vectors of width {f.vectors.shape[-1]}, but the model's text encoder takes "
                          f"{width}; the embedding was made for another model")
    vocab = tok.get_vocab()
    n = f.vectors.shape[1]
    taken = [t for layer in XTI_LAYERS for t in [f.token] + layer_token_names(f.token, n, layer) if t in vocab]
    if taken:
        raise ConfigError(f"{where}: the word {taken[0]!r} is already a token of the tokenizer; rename the file "
                          "(its name is the prompt word)")


@torch.no_grad()
def load_xti_embeddings(model: Any, files: list[XTIFile]) -> LoadedXTI | None:
    """Add each file's 16 token sets to ``model``'s tokenizer and text encoder, in place.

    Returns:
        the per-layer prompt converters, or None without files.

    Raises:
        ConfigError: a model that is not SD 1.x, vectors of another width, a word that is already a token.
    """
    if not files:
        return None
    for f in files:
        _check_fits(f, model)
    tok, te = model.tokenizers[0], model.text_encoders[0]
    loader = embedding_loader(model)
    for f in files:
        words = [layer_token_names(f.token, f.vectors.shape[1], layer)[0] for layer in XTI_LAYERS]
        add_tokens(loader, tok, te, words, list(f.vectors), f"{FLAG} {f.path}")
        logger.info("XTI embedding %s: word %r, %d vector(s) for each of %d layers", f.path, f.token,
                    f.vectors.shape[1], len(XTI_LAYERS))
    return LoadedXTI(files, loader)

