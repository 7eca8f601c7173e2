"""Finding CLIP tokenizers offline.

Order, for each tokenizer a family needs (kohya's hub ids, see ``families.TOKENIZER_IDS``):

1. the diffusers model folder (``tokenizer/``, ``tokenizer_2/``);
2. ``--tokenizer_cache_dir`` in kohya's layout: ``<dir>/<hub id with "/" replaced by "_">``;
3. the hub, only when the machine is online and neither ``HF_HUB_OFFLINE`` nor
   ``TRANSFORMERS_OFFLINE`` is set; the result is saved into ``--tokenizer_cache_dir`` when given;
4. otherwise a clear error saying how to supply one offline.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

from library.errors import ModelLoadError
from library.models.families import TOKENIZER_IDS, Family

logger = logging.getLogger(__name__)

MAX_LENGTH = 77


def _pad_token(family: Family, index: int) -> str | None:
    # SD2's tokenizer and SDXL's second tokenizer (OpenCLIP) pad with "!" (kohya sets it the same way).
    return "!" if (family is Family.SD2 or (family is Family.SDXL and index == 1)) else None


def cache_folder(cache_dir: str | os.PathLike, hub_id: str) -> Path:
    return Path(cache_dir) / hub_id.replace("/", "_")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds instead of
    waiting through the hub client's retries (minutes)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _finish(tok, pad: str | None):
    if pad is not None and tok.pad_token != pad:
        tok.pad_token = pad
    tok.model_max_length = MAX_LENGTH
    return tok


def load_tokenizers(
    family: Family, model_folder: str | os.PathLike | None = None, tokenizer_cache_dir: str | os.PathLike | None = None
) -> list:
    """Return the family's tokenizer(s) as ``CLIPTokenizer`` objects, never touching a hub when offline."""
    from transformers import CLIPTokenizer

    tokenizers = []
    for i, (hub_id, subfolder) in enumerate(TOKENIZER_IDS[family]):
        pad = _pad_token(family, i)
        tried: list[str] = []
        if model_folder is not None:
            folder = Path(model_folder) / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
            if folder.is_dir():
                tokenizers.append(_finish(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), pad))
                continue
            tried.append(str(folder))
        if tokenizer_cache_dir is not None:
            folder = cache_folder(tokenizer_cache_dir, hub_id)
            if folder.is_dir():
                tokenizers.append(_finish(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), pad))
                continue
            tried.append(str(folder))
        tokenizers.append(_from_hub(hub_id, subfolder, pad, tokenizer_cache_dir, tried))
    return tokenizers


def _from_hub(hub_id: str, subfolder: str | None, pad: str | None, cache_dir, tried: list[str]):
    from transformers import CLIPTokenizer

    how = (
        f"tokenizer {hub_id!r} is not available offline (looked in: {', '.join(tried) or 'nowhere'}). "
        f"Put a copy of it (tokenizer.json or vocab.json + merges.txt) in "
        f"<tokenizer_cache_dir>/{hub_id.replace('/', '_')} and pass --tokenizer_cache_dir, "
        "or use a diffusers model folder that contains it; to build the standard CLIP tokenizers offline run: "
        f"python tools/make_clip_tokenizer.py --tokenizer_cache_dir {cache_dir or '<dir>'}"
    )
    if _offline():
        raise ModelLoadError(how + " (HF_HUB_OFFLINE is set, so the hub was not tried)")
    if not _hub_reachable():
        raise ModelLoadError(how + " (the model hub is not reachable from this machine)")
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        tok = CLIPTokenizer.from_pretrained(hub_id, **kwargs)
    except Exception as e:  # network errors come in many types; the message is what matters
        raise ModelLoadError(how + f" (downloading it failed: {type(e).__name__})") from e
    tok = _finish(tok, pad)
    if cache_dir is not None:
        from library.utils.atomic import atomic_dir

        with atomic_dir(cache_folder(cache_dir, hub_id)) as tmp:
            tok.save_pretrained(str(tmp))
        logger.info("saved tokenizer %s into %s", hub_id, cache_dir)
    return tok


def build_clip_tokenizer(pad_token: str | None = None):
    """The real CLIP ViT-L/14 (and OpenCLIP bigG/H) tokenizer, rebuilt offline from the bundled BPE file.

    The vocabulary is OpenAI's: 256 byte symbols, the same with ``</w>``, one token per merge of the
    first 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens).
    """
    import gzip

    from transformers import CLIPTokenizer

    from library.models.tiny import _bytes_to_unicode

    data = resources.files("library.models").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab_list)}, merges=merges)
    return _finish(tok, pad_token)


def write_builtin_tokenizers(family: Family, cache_dir: str | os.PathLike) -> list[Path]:
    """Write the family's tokenizers, rebuilt from the bundled vocabulary, into a kohya-layout cache."""
    toks = [build_clip_tokenizer(_pad_token(family, i)) for i in range(len(TOKENIZER_IDS[family]))]
    save_tokenizer_cache(toks, family, cache_dir)
    return [cache_folder(cache_dir, hub_id) for hub_id, _ in TOKENIZER_IDS[family]]


def save_tokenizer_cache(tokenizers: list, family: Family, cache_dir: str | os.PathLike) -> None:
    """Write tokenizers into a ``--tokenizer_cache_dir`` in kohya's layout."""
    from library.utils.atomic import atomic_dir

    for tok, (hub_id, _) in zip(tokenizers, TOKENIZER_IDS[family]):
        with atomic_dir(cache_folder(cache_dir, hub_id)) as tmp:
            tok.save_pretrained(str(tmp))
