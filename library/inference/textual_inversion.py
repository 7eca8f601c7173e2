"""Textual inversion embeddings for gen_img (kohya's ``--textual_inversion_embeddings``).

Each file adds one word to the prompt vocabulary: the file's stem (``EasyNegative.safetensors``
-> ``easynegative``; CLIP lower-cases prompts, so any case works in a prompt). A file holds
``n`` vectors; the word stands for all of them, so ``a photo, (easynegative:1.2)`` weights
every vector (kohya and A1111 do the same).

Layouts read (kohya's gen_img reads the same ones):

* SD 1.x / 2.x: ``{"emb_params": [n, D]}`` (A1111 / kohya safetensors), A1111's ``.pt``
  ``{"string_to_param": {"*": [n, D]}, "name": ..., ...}``, diffusers' ``learned_embeds``
  ``{"<token>": [D] or [n, D]}`` (any single tensor);
* SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (also inside ``string_to_param``), one
  part per text encoder, both with the same ``n``.

The embedding surgery is diffusers' ``TextualInversionLoaderMixin.load_textual_inversion``
(tokens ``word``, ``word_1``, ... added to sdtk's own tokenizers, rows added to its text
encoders). sdtk encodes prompts itself (:func:`library.inference.prompt_weighting.encode_prompts`),
so :meth:`LoadedEmbeddings.convert_prompt` rewrites each text for each tokenizer first
(diffusers' ``maybe_convert_prompt``: ``word`` -> ``word word_1 ...``). Files are read and checked
before the model is loaded; ``.pt`` / ``.bin`` files are pickles and need ``--allow_pickle``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from library.errors import ConfigError, ModelLoadError
from library.inference.pipeline import build_pipeline
from library.inference.schedulers import make_scheduler
from library.models.embedding_file import read_state
from library.models.families import Family
from library.models.xti import is_xti_state

logger = logging.getLogger(__name__)

FLAG = "--textual_inversion_embeddings"
SDXL_KEYS = ("clip_l", "clip_g")
# characters the A1111 prompt syntax or the tokenizer would split a word on
_BAD_NAME = re.compile(r"[\s()\[\]:\\,]")


@dataclass
class EmbeddingFile:
    """One embedding file, read and checked (before the model is loaded).

    Attributes:
        token: the word that stands for the vectors (the file stem, lower case).
        vectors: one ``[n, D]`` float32 tensor per text encoder (SD1/SD2: one; SDXL: clip_l, clip_g).
    """

    path: str
    token: str
    vectors: list[torch.Tensor]

    @property
    def sdxl(self) -> bool:
        return len(self.vectors) == 2


def _as_matrix(t: Any, where: str, key: str) -> torch.Tensor:
    """``[D]`` or ``[n, D]`` -> ``[n, D]`` float32."""
    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or t.numel() == 0:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ModelLoadError(f"{where}: {key!r} is {shape}, not a [vectors, width] embedding")
    return (t[None] if t.ndim == 1 else t).float()


def parse_embedding(state: dict[str, Any], where: str) -> list[torch.Tensor]:
    """The vectors of one file's ``state`` (see the module doc for the layouts).

    Returns:
        ``[[n, D]]`` (SD1/SD2) or ``[[n, 768], [n, 1280]]`` (SDXL clip_l, clip_g).

    Raises:
        ModelLoadError: an unknown layout, or SDXL parts with different vector counts.
    """
    if isinstance(state.get("string_to_param"), dict):
        state = state["string_to_param"]
    if all(k in state for k in SDXL_KEYS):
        parts = [_as_matrix(state[k], where, k) for k in SDXL_KEYS]
        if parts[0].shape[0] != parts[1].shape[0]:
            raise ModelLoadError(f"{where}: clip_l has {parts[0].shape[0]} vectors but clip_g has "
                                 f"{parts[1].shape[0]}; the two parts must have the same count")
        return parts
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for key in ("emb_params", "*"):
        if key in tensors:
            return [_as_matrix(tensors[key], where, key)]
    if len(tensors) == 1:  # diffusers' learned_embeds: {"<token>": vectors}
        key, value = next(iter(tensors.items()))
        return [_as_matrix(value, where, key)]
    if is_xti_state(state):
        raise ModelLoadError(f"{where}: an Extended Textual Inversion file (one tensor per UNet layer IN01 ... OUT11); "
                             "gen_img reads it with --XTI_embeddings, train_textual_inversion_XTI.py continues it "
                             "with --weights")
    keys = ", ".join(list(map(str, state))[:6]) or "none"
    raise ModelLoadError(f"{where}: unknown embedding layout (keys: {keys}); expected emb_params, "
                         "string_to_param, clip_l + clip_g, or a single tensor")


def prompt_word(path: str, flag: str, seen: dict[str, str]) -> str:
    """The prompt word of an embedding file (its stem, lower case), recorded in ``seen`` (word -> file).

    Raises:
        ConfigError: a stem with spaces or prompt syntax, or a word that ``seen`` already holds.
    """
    stem = Path(path).stem
    token = stem.lower()
    if not token or _BAD_NAME.search(token):
        raise ConfigError(f"{flag} {path}: the file name is the prompt word, and {stem!r} has spaces or "
                          "prompt syntax characters ( ) [ ] : , \\; rename the file")
    if token in seen:
        raise ConfigError(f"{flag} {path}: its word {token!r} is also the word of {seen[token]} "
                          "(names are not case-sensitive); rename one file")
    seen[token] = path
    return token


def read_embeddings(paths: Sequence[str] | None, *, allow_pickle: bool = False) -> list[EmbeddingFile]:
    """Read and check every ``--textual_inversion_embeddings`` file (no model needed).

    Raises:
        ConfigError: a missing file, a pickle without ``allow_pickle``, a stem that cannot be a
            prompt word, or two files with the same stem.
        ModelLoadError: an unreadable file or an unknown layout.
    """
    out: list[EmbeddingFile] = []
    seen: dict[str, str] = {}
    for p in paths or []:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"{FLAG} {p}: file not found")
        token = prompt_word(p, FLAG, seen)
        vectors = parse_embedding(read_state(path, allow_pickle, FLAG), f"{FLAG} {p}")
        out.append(EmbeddingFile(p, token, vectors))
    return out


@dataclass
class LoadedEmbeddings:
    """Embeddings added to a model's tokenizers and text encoders."""

    tokens: list[str]
    loader: Any  # a diffusers pipeline (TextualInversionLoaderMixin) over the same tokenizers

    def convert_prompt(self, text: str, tokenizer: Any) -> str:
        """``text`` with each embedding word written as its tokens for ``tokenizer`` (``w`` -> ``w w_1 ...``)."""
        for token in self.tokens:
            # diffusers matches the added token by its exact spelling; CLIP ignores case anyway
            text = re.sub(re.escape(token), token, text, flags=re.IGNORECASE)
        return self.loader.maybe_convert_prompt(text, tokenizer)


def _check_fits(emb: EmbeddingFile, family: Family, tokenizers: list, text_encoders: list) -> None:
    where = f"{FLAG} {emb.path}"
    sdxl = family.n_text_encoders == 2  # clip_l + clip_g files
    if emb.sdxl != sdxl:
        kind = "an SDXL embedding (clip_l + clip_g)" if emb.sdxl else "an SD 1.x/2.x embedding (one text encoder)"
        raise ConfigError(f"{where} is {kind}, but the model is {family.pretty}")
    for tok, te, vec in zip(tokenizers, text_encoders, emb.vectors):
        width = te.get_input_embeddings().weight.shape[-1]
        if vec.shape[-1] != width:
            raise ConfigError(f"{where}: vectors of width {vec.shape[-1]}, but the model's text encoder takes "
                              f"{width}; the embedding was made for another model family")
        vocab = tok.get_vocab()
        taken = [t for t in (emb.token, f"{emb.token}_1") if t in vocab]
        if taken:
            raise ConfigError(f"{where}: the word {taken[0]!r} is already a token of the tokenizer; rename the "
                              "file (its name is the prompt word)")


@torch.no_grad()
def load_embeddings(model: Any, embeddings: list[EmbeddingFile]) -> LoadedEmbeddings | None:
    """Add ``embeddings`` to ``model``'s tokenizers and text encoders, in place.

    Args:
        model: a ``LoadedModel``; its ``tokenizers`` / ``text_encoders`` are the ones sdtk encodes with.

    Returns:
        the converter for prompts, or None without embeddings.

    Raises:
        ConfigError: an embedding of another family or width, or a word that is already a token.
    """
    if not embeddings:
        return None
    n_tes = model.family.n_text_encoders
    tokenizers, text_encoders = list(model.tokenizers[:n_tes]), list(model.text_encoders[:n_tes])
    for emb in embeddings:
        _check_fits(emb, model.family, tokenizers, text_encoders)
    loader = embedding_loader(model)
    for emb in embeddings:
        for tok, te, vec in zip(tokenizers, text_encoders, emb.vectors):
            add_tokens(loader, tok, te, [emb.token], [vec], f"{FLAG} {emb.path}")
        logger.info("textual inversion %s: word %r, %d vector(s)", emb.path, emb.token, emb.vectors[0].shape[0])
    return LoadedEmbeddings([e.token for e in embeddings], loader)


def embedding_loader(model: Any) -> Any:
    """A pipeline over ``model``'s own tokenizers and text encoders, for diffusers' token surgery
    (``TextualInversionLoaderMixin.load_textual_inversion``)."""
    return build_pipeline(model, make_scheduler("ddim", model.scheduler_config))


def token_names(word: str, n_vectors: int) -> list[str]:
    """The tokens that carry ``word``'s vectors: ``word``, ``word_1``, ... (diffusers' multi-vector names)."""
    return [word] + [f"{word}_{i}" for i in range(1, n_vectors)]


def add_tokens(loader: Any, tokenizer: Any, text_encoder: Any, words: list[str], vectors: list[torch.Tensor],
               where: str) -> None:
    """Add ``vectors[i]`` ``[n, D]`` to ``tokenizer`` / ``text_encoder`` as the tokens
    ``token_names(words[i], n)``, in place, and check the result.

    Args:
        loader: from :func:`embedding_loader`, over the same tokenizer and text encoder.
        where: the flag and file, for messages.

    Raises:
        ConfigError: diffusers refused the tokens.
        ModelLoadError: a token did not get an id of its own holding its vector (e.g. a token the
            tokenizer could not add, whose id would fall back to an existing token's).
    """
    try:
        loader.load_textual_inversion(list(vectors), token=list(words), tokenizer=tokenizer, text_encoder=text_encoder)
    except ValueError as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0][:200]}") from e
    names = [t for w, v in zip(words, vectors) for t in token_names(w, v.shape[0])]
    ids = tokenizer.convert_tokens_to_ids(names)
    weight = text_encoder.get_input_embeddings().weight
    special = {tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    if len(set(ids)) != len(ids) or special & set(ids) or \
            not torch.allclose(weight[ids].float().cpu(), torch.cat(list(vectors)), atol=1e-2, rtol=1e-2):
        raise ModelLoadError(f"{where}: the embedding could not be added to the tokenizer as "
                             f"{names[0]!r}; rename the file (letters, digits, - and _)")
