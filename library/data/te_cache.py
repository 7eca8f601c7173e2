"""Text-encoder output caching (``--cache_text_encoder_outputs`` / ``..._to_disk``, SDXL).

Every caption is encoded once before training; the text encoders then leave the device. This
is only correct when a sample's caption never changes, so caption shuffling, dropout, tag
dropout, token warm-up and wildcards are refused up front (:func:`cacheable_problems`), as is
training the text encoders (the cached outputs could not follow them).

Memory mode keeps one ``(hidden_states, pooled)`` pair per distinct caption. Disk mode writes
``<image stem>_te_sdtk.safetensors`` beside each image — tensors ``hidden_states`` ``[L, D]``
and ``pooled`` ``[P]`` — and reads them back per batch, so RAM holds only the current batch.
The file's metadata records what produced it: format, the exact caption, and a fingerprint of
the text encoders (config, a sample of every weight, dtype), the tokenizers and
``max_token_length``. A file whose record differs is stale and rebuilt (``skip_cache_check``
trusts any file). Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from library.data.captions import process_caption
from library.data.latent_file import cache_is_valid
from library.errors import ConfigError, DatasetError
from library.training.family import Conditioning
from library.utils.sampling import sample_elements
from library.utils.atomic import save_safetensors

logger = logging.getLogger(__name__)

FORMAT = "sdtk-te-outputs/1"
SUFFIX = "_te_sdtk.safetensors"

# subset options that make a caption differ between epochs or steps (kohya refuses the first four)
_CHANGING_OPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                     "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")


def cache_file_for(image: Path) -> Path:
    """The disk cache path of ``image``'s text-encoder outputs."""
    return image.parent / f"{image.stem}{SUFFIX}"


def cacheable_problems(subsets: Iterable[Any]) -> list[str]:
    """Why the captions of ``subsets`` (``SubsetParams``) cannot be cached; empty if they can."""
    problems = []
    for sub in subsets:
        used = [f"{o}={getattr(sub, o)}" for o in _CHANGING_OPTIONS if getattr(sub, o, None)]
        if used:
            where = sub.image_dir or sub.metadata_file or "a subset"
            problems.append(f"{where}: {', '.join(used)}")
    return problems


def check_cacheable(subsets: Iterable[Any], train_text_encoder: bool) -> None:
    """Raise a ConfigError if text-encoder outputs cannot be cached for this run.

    Raises:
        ConfigError: the text encoders are trained, or a subset changes its captions.
    """
    problems = []
    if train_text_encoder:
        problems.append("--cache_text_encoder_outputs needs --network_train_unet_only: a text encoder that is "
                        "being trained cannot use outputs computed before training")
    bad = cacheable_problems(subsets)
    if bad:
        problems.append("--cache_text_encoder_outputs needs captions that never change, but these subsets change "
                        "them every epoch or step (turn the options off or drop the caching): " + "; ".join(bad))
    if problems:
        raise ConfigError(problems)


def fixed_caption(sample: Any) -> str:
    """The caption the dataset gives ``sample`` in every epoch (no random options are active)."""
    return process_caption(sample.entry.caption, sample.subset, epoch=1, step=0, max_steps=None,
                           rng=random.Random(0))


def encoder_fingerprint(text_encoders: list, tokenizers: list, max_token_length: int | None,
                        weighted: bool = False) -> str:
    """A short id of everything that decides the outputs: encoders (config, sampled weights,
    dtype), tokenizers (vocabulary size, length, special tokens) and ``max_token_length``."""
    # weighted captions encode differently; unweighted fingerprints stay as before (existing caches remain valid)
    h = hashlib.sha256(f"{FORMAT}|{max_token_length}{'|weighted' if weighted else ''}".encode())
    for te in text_encoders:
        cfg = te.config.to_dict() if hasattr(te.config, "to_dict") else dict(te.config)
        h.update(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"},
                            sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, t in te.state_dict().items():
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(sample_elements(t).float().cpu().numpy().tobytes())
    for tok in tokenizers:
        h.update(f"{len(tok)}|{tok.model_max_length}|{tok.bos_token_id}|{tok.eos_token_id}|{tok.pad_token_id}".encode())
    return h.hexdigest()[:16]


@dataclass
class TextEncoderOutputCache:
    """Cached outputs by caption: in memory, or as files read per batch."""

    memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def __contains__(self, caption: str) -> bool:
        return caption in self.memory or caption in self.files

    def __len__(self) -> int:
        return len(set(self.memory) | set(self.files))

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if caption in self.memory:
            return self.memory[caption]
        if caption not in self.files:
            raise DatasetError(f"no cached text-encoder output for caption {caption!r}; the captions changed after "
                               "caching (run without --cache_text_encoder_outputs to find out why)")
        from safetensors.torch import load_file

        path = self.files[caption]
        try:
            t = load_file(str(path))
        except Exception as e:
            raise DatasetError(f"cannot read text-encoder cache {path}: {e}; delete it to rebuild it") from e
        return t["hidden_states"], t.get("pooled")

    def conditioning(self, captions: list[str], device: torch.device | str) -> Conditioning:
        """The batch's :class:`Conditioning` (``[B, L, D]``, ``[B, P]``) on ``device``."""
        pairs = [self.get(c) for c in captions]
        hidden = torch.stack([h for h, _ in pairs]).to(device)
        pooled = None if pairs[0][1] is None else torch.stack([p for _, p in pairs]).to(device)
        return Conditioning(hidden, pooled)


@dataclass
class TECacheStats:
    encoded: int = 0
    reused: int = 0


def _file_is_valid(path: Path, expected: dict[str, str], skip_cache_check: bool) -> bool:
    return cache_is_valid(path, expected, skip_cache_check, what="text-encoder cache")


def cache_text_encoder_outputs(samples: list[Any], encode: Callable[[list[str]], Conditioning], fingerprint: str, *,
                               to_disk: bool = False, batch_size: int = 1, skip_cache_check: bool = False,
                               rebuild: bool = False, progress: bool = False) -> tuple[TextEncoderOutputCache, TECacheStats]:
    """Encode the fixed caption of every sample once.

    Args:
        samples: dataset samples (``library.data.dataset.Sample``), with deterministic captions.
        encode: ``captions -> Conditioning`` (the family's text encoding, without gradients).
        fingerprint: :func:`encoder_fingerprint` of the encoders ``encode`` uses.
        to_disk: write/reuse ``*_te_sdtk.safetensors`` files beside the images.
        batch_size: captions per encoder call.
        rebuild: re-encode even valid files (the cache tool without ``--skip_existing``).

    Raises:
        DatasetError: the encoders produced NaN/inf.
    """
    from tqdm import tqdm

    cache, stats = TextEncoderOutputCache(), TECacheStats()
    todo: dict[str, list[Path]] = {}  # caption -> files to write (memory mode: no files)
    for s in samples:
        caption = fixed_caption(s)
        if not to_disk:
            todo.setdefault(caption, [])
            continue
        path = cache_file_for(s.entry.path)
        if not rebuild and _file_is_valid(path, {"format": FORMAT, "caption": caption, "encoders": fingerprint},
                                          skip_cache_check):
            cache.files.setdefault(caption, path)
            stats.reused += 1
            continue
        todo.setdefault(caption, []).append(path)
    captions = list(todo)
    for i in tqdm(range(0, len(captions), max(1, batch_size)), desc="caching text encoder outputs",
                  disable=not progress):
        chunk = captions[i : i + max(1, batch_size)]
        with torch.no_grad():
            cond = encode(chunk)
        if not torch.isfinite(cond.hidden_states).all() or (cond.pooled is not None and
                                                             not torch.isfinite(cond.pooled).all()):
            raise DatasetError("the text encoders produced NaN/inf outputs; run them in float32 (--mixed_precision "
                               "no for caching) or check the model")
        for j, caption in enumerate(chunk):
            hidden = cond.hidden_states[j].detach().cpu().clone()
            pooled = None if cond.pooled is None else cond.pooled[j].detach().cpu().clone()
            stats.encoded += 1
            if not to_disk:
                cache.memory[caption] = (hidden, pooled)
                continue
            tensors = {"hidden_states": hidden} if pooled is None else {"hidden_states": hidden, "pooled": pooled}
            for path in todo[caption]:
                save_safetensors(tensors, path, metadata={"format": FORMAT, "caption": caption,
                                                          "encoders": fingerprint})
                cache.files.setdefault(caption, path)
    logger.info("text-encoder outputs: %d captions encoded, %d valid disk caches reused", stats.encoded, stats.reused)
    return cache, stats
