"""The embeddings target: textual inversion, new token vectors learned while every model weight stays frozen.

For each text encoder the run adds tokens to the tokenizer (kohya's names: ``TOKEN``, ``TOKEN1``,
..., ``TOKEN{n-1}``; existing ids are untouched, the new ones follow the vocabulary) and swaps the
encoder's token table for an :class:`ExtendedEmbedding`: the original table, frozen, plus one small
trainable ``[n, D]`` matrix for the new ids. Only that matrix is a parameter of the optimizer, so
no other row can change (kohya trains the whole table and copies the old rows back after every
step; the result for the new rows is the same for per-element optimizers, without the optimizer
state and gradients of the full table). The UNet, VAE and the rest of the text encoders are
frozen in the training dtype and get no gradients; latents can be cached.

Subclassing (Extended Textual Inversion): :meth:`EmbeddingTarget.token_strings` names the tokens,
:meth:`EmbeddingTarget.build_tables` makes the per-encoder tables, :meth:`EmbeddingTarget.file_tensors`
lays out the saved file; how the conditioning is computed from the tokens is the trainer's
``encode_text`` / ``compute_loss`` hook (:mod:`.embedding_trainer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from library.config.settings import flag_values
from library.errors import ConfigError, TrainingError
from library.models.families import Family
from library.training.targets import TrainingTarget
from library.training.targets.prepare import frozen_te_dtype, place_models

logger = logging.getLogger(__name__)

SD_KEY = "emb_params"  # kohya / A1111 safetensors key of an SD1/SD2 embedding
SDXL_KEYS = ("clip_l", "clip_g")  # one part per SDXL text encoder


class ExtendedEmbedding(torch.nn.Module):
    """A token table whose ids ``first_id ..`` come from a trainable matrix, the others from ``base``.

    Args:
        base: the text encoder's original ``nn.Embedding`` (kept frozen, never copied).
        new: ``[n, D]`` initial vectors of the new ids ``first_id .. first_id + n - 1``.
        first_id: the first new id (the tokenizer's length before the tokens were added).
    """

    def __init__(self, base: torch.nn.Embedding, new: torch.Tensor, first_id: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = torch.nn.Parameter(new.detach().clone().to(base.weight.device))
        self.first_id = int(first_id)

    @property
    def num_embeddings(self) -> int:
        return self.first_id + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The whole table ``[first_id + n, D]`` (a copy, for readers of ``get_input_embeddings().weight``)."""
        w = self.base.weight[: self.first_id]
        return torch.cat([w, self.new.to(w.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[..., L]`` ids -> ``[..., L, D]`` vectors in the base table's dtype."""
        is_new = input_ids >= self.first_id
        out = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        extra = F.embedding((input_ids - self.first_id).clamp(min=0), self.new).to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), extra, out)


@dataclass
class TokenTable:
    """The new tokens of one text encoder.

    Attributes:
        index: the text encoder's position in the model (0; SDXL: 0 = CLIP-L, 1 = CLIP-G).
        key: the tensor's name in the saved file (``emb_params``, ``clip_l``, ``clip_g``).
        strings: the added tokens, in id order.
        ids: their ids (consecutive, after the existing vocabulary).
        embedding: the encoder's token table, now an :class:`ExtendedEmbedding`.
    """

    index: int
    key: str
    strings: list[str]
    ids: list[int]
    embedding: ExtendedEmbedding

    @property
    def vectors(self) -> torch.nn.Parameter:
        """The trained ``[n, D]`` matrix."""
        return self.embedding.new


def kohya_token_strings(token: str, n: int) -> list[str]:
    """kohya's tokens for ``n`` vectors: ``token``, ``token1``, ..., ``token{n-1}``."""
    return [token] + [f"{token}{i}" for i in range(1, n)]


def check_new_tokens(tokenizer: Any, strings: list[str], which: str) -> None:
    """Refuse tokens the tokenizer already has (kohya refuses them too: they would not be added)."""
    vocab = tokenizer.get_vocab()
    known = [s for s in strings if s in vocab or s.lower() in vocab]
    if known:
        raise ConfigError(f"--token_string: {known[0]!r} is already a token of {which}; choose a made-up word "
                          "(e.g. a rare letter combination) that the tokenizer does not know")


def init_word_ids(tokenizer: Any, init_word: str, n: int, which: str) -> list[int]:
    """The token ids of ``--init_word`` (at most ``n``; repeated up to ``n`` by :func:`initial_vectors`)."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_word.strip() or not ids:
        raise ConfigError("--init_word is empty; give a word close to the concept (e.g. 'dog') or leave it out")
    if len(ids) > n:
        raise ConfigError(f"--init_word {init_word!r} is {len(ids)} tokens for {which}, more than "
                          f"--num_vectors_per_token {n}; raise --num_vectors_per_token or use a shorter word")
    return ids


def initial_vectors(table: torch.Tensor, n: int, init_ids: list[int] | None) -> torch.Tensor:
    """``[n, D]`` start vectors (float32) from the frozen ``table`` ``[V, D]``.

    With ``init_ids``: their rows, repeated in turn up to ``n`` (kohya). Without: the mean of all
    rows plus noise of 1e-5 of their variance per dimension (transformers' rule for rows added by
    ``resize_token_embeddings``), from the global RNG (seeded by the run's seed).
    """
    w = table.detach().float().cpu()
    if init_ids:
        return torch.stack([w[init_ids[i % len(init_ids)]] for i in range(n)]).clone()
    mean, std = w.mean(dim=0), w.std(dim=0)
    return mean + torch.randn(n, w.shape[1]) * std * (1e-5 ** 0.5)


def _swap_module(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise TrainingError("the text encoder's token table was not found among its modules")


class EmbeddingTarget(TrainingTarget):
    """Train new token vectors for each text encoder of the model (see the module docstring).

    Call order: :meth:`add_tokens` right after the model is loaded (checks, tokens, tables: nothing
    is written before), then the shared :meth:`build` / :meth:`finish`.
    """

    train_unet = False
    train_text_encoder = True  # gradients flow through the (frozen) text encoders to the new rows

    def __init__(self, args: Any):
        self.args = args
        self.tables: list[TokenTable] = []
        self.family: Family | None = None
        self.module = None

    # ---------------------------------------------------------------- hooks for subclasses
    def token_strings(self) -> list[str]:
        """The tokens added to every tokenizer, in id order (kohya's names)."""
        return kohya_token_strings(self.args.token_string, self.args.num_vectors_per_token)

    def file_keys(self, family: Family) -> list[str]:
        """The saved file's tensor name per text encoder."""
        return list(SDXL_KEYS) if family.n_text_encoders == 2 else [SD_KEY]

    def build_tables(self, model: Any) -> list[TokenTable]:
        """Add :meth:`token_strings` to each tokenizer and extend its text encoder's table."""
        strings = self.token_strings()
        tables = []
        for i, (key, tok, te) in enumerate(zip(self.file_keys(model.family), model.tokenizers, model.text_encoders)):
            which = f"tokenizer {i + 1}" if len(model.text_encoders) > 1 else "the tokenizer"
            check_new_tokens(tok, strings, which)
            first = len(tok)
            added = tok.add_tokens(strings)
            ids = tok.convert_tokens_to_ids(strings)
            if added != len(strings) or ids != list(range(first, first + len(strings))):
                raise ConfigError(f"--token_string {self.args.token_string!r}: {which} could not add its tokens as "
                                  "new words; choose another word (letters and digits)")
            base = te.get_input_embeddings()
            start = initial_vectors(base.weight, len(strings), self._init_ids(tok, which))
            ext = ExtendedEmbedding(base, start, first)
            _swap_module(te, base, ext)
            tables.append(TokenTable(i, key, strings, ids, ext))
            logger.info("textual inversion: %s gets tokens %s (ids %d-%d)", which, " ".join(strings), ids[0], ids[-1])
        return tables

    def read_weights(self, path: str) -> list[torch.Tensor]:
        """``--weights``: the start vectors per table, ``[len(token_strings()), D]`` each (XTI reads its own layout)."""
        from library.training.targets.embedding_files import read_embedding_file

        return read_embedding_file(path, bool(flag_values(self.args)["allow_pickle"]))

    def file_tensors(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """What a save writes: ``{key: [n, D]}`` on the CPU, in ``dtype`` (None: as trained)."""
        return {t.key: t.vectors.detach().to("cpu", dtype=dtype or t.vectors.dtype).clone() for t in self.tables}

    # ---------------------------------------------------------------- setup
    def _init_ids(self, tokenizer: Any, which: str) -> list[int] | None:
        a = self.args
        if a.init_word is None:
            return None
        return init_word_ids(tokenizer, a.init_word, a.num_vectors_per_token, which)

    def add_tokens(self, model: Any) -> None:
        """Tokens, tables and start vectors (``--init_word``, ``--weights``); raises before anything is written."""
        a = self.args
        self.family = model.family
        weights = self.read_weights(a.weights) if a.weights else None
        self.tables = self.build_tables(model)
        if weights is not None:
            self.load_vectors(weights, f"--weights {a.weights}")
        self.module = torch.nn.ModuleList([t.embedding for t in self.tables])

    def load_vectors(self, vectors: list[torch.Tensor], where: str) -> None:
        """Copy ``[n, D]`` vectors per table into the trained rows, checking count and width."""
        if len(vectors) != len(self.tables):
            kind = "an SDXL embedding (clip_l + clip_g)" if len(vectors) == 2 else "an SD 1.x/2.x embedding"
            raise ConfigError(f"{where} is {kind}, but the model is {self.family.pretty}")
        for table, vec in zip(self.tables, vectors):
            n, d = table.vectors.shape
            if vec.shape[0] != n:
                raise ConfigError(f"{where} holds {vec.shape[0]} vectors, but --num_vectors_per_token is {n}; "
                                  f"use --num_vectors_per_token {vec.shape[0]}")
            if vec.shape[1] != d:
                raise ConfigError(f"{where}: vectors of width {vec.shape[1]}, but the model's text encoder takes {d}; "
                                  "the embedding was made for another model family")
            with torch.no_grad():
                table.vectors.copy_(vec.to(table.vectors.dtype))

    # ---------------------------------------------------------------- building
    def train_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The trained rows' dtype: half only with ``--full_fp16`` / ``--full_bf16`` (kohya)."""
        return weight_dtype if (self.args.full_fp16 or self.args.full_bf16) else torch.float32

    def build(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        if not self.tables:
            raise TrainingError("the embeddings target was built before its tokens were added (add_tokens)")
        device = accelerator.device
        n = len(model.text_encoders)
        starts = [t.vectors.detach().float().clone() for t in self.tables]  # before the encoders are cast
        place_models(self.args, model, device, weight_dtype, [frozen_te_dtype(weight_dtype, device)] * n, [True] * n)
        dtype = self.train_dtype(weight_dtype)
        for table, start in zip(self.tables, starts):
            table.embedding.new.data = start.to(device, dtype)
            table.vectors.requires_grad_(True)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [t.vectors for t in self.tables], "lr": self.args.learning_rate}]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {t.key: t.vectors.detach() for t in self.tables}

    def load_state_dict(self, sd: dict[str, torch.Tensor], where: str) -> None:
        if set(sd) != {t.key for t in self.tables}:
            raise TrainingError(f"--resume {where}: the state holds {sorted(sd)}, this run trains "
                                f"{[t.key for t in self.tables]}")
        for t in self.tables:
            if sd[t.key].shape != t.vectors.shape:
                raise TrainingError(f"--resume {where}: {t.key} is {tuple(sd[t.key].shape)} in the state, "
                                    f"{tuple(t.vectors.shape)} in this run")
            with torch.no_grad():
                t.vectors.copy_(sd[t.key])

    def signature(self, s: Any) -> dict[str, Any]:
        return {"token_string": self.args.token_string, "num_vectors_per_token": self.args.num_vectors_per_token,
                "embedding_keys": [t.key for t in self.tables]}

    # ---------------------------------------------------------------- outputs
    def session_metadata(self, t: Any, s: Any, optimizer_text: str) -> dict[str, str]:
        a = self.args
        return {"ss_token_string": a.token_string, "ss_num_vectors_per_token": str(a.num_vectors_per_token),
                "ss_init_word": a.init_word or "", "ss_base_model_version":
                s.family.base_model_version(s.model.family.v2, s.v_prediction),
                "ss_optimizer": optimizer_text, "ss_learning_rate": str(a.learning_rate),
                "ss_max_train_steps": str(s.max_train_steps), "ss_output_name": a.output_name or ""}

    def output_suffix(self) -> str:
        return "." + (self.args.save_model_as or "safetensors")

    def save(self, t: Any, s: Any, path: Path, steps: int, epoch: int) -> None:
        from library.training.optimizers import eval_mode
        from library.training.targets.embedding_files import save_embedding

        with eval_mode(s.optimizer):  # schedule-free: the evaluation weights
            tensors = self.file_tensors(s.save_dtype)
        save_embedding(path, tensors, s, self.args, steps, epoch)
        logger.info("saved %s", path)
