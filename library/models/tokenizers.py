"""Finding CLIP tokenizers offline.

Order, for each tokenizer a family needs (kohya's hub ids, see ``Family.tokenizer_ids``):

1. the diffusers model folder (``tokenizer/``, ``tokenizer_2/``);
2. ``--tokenizer_cache_dir`` in kohya's layout: ``<dir>/<hub id with "/" replaced by "_">``;
3. the hub, only when the machine is online and neither ``HF_HUB_OFFLINE`` nor
   ``TRANSFORMERS_OFFLINE`` is set; the result is saved into ``--tokenizer_cache_dir`` when given;
4. otherwise sdtk's own copy: the real tokenizer rebuilt from the CLIP BPE vocabulary bundled with
   sdtk (the same 49,408 tokens and merges, so the same ids; SD2 and SDXL's second tokenizer pad with
   "!"), written once, atomically, into a per-user cache folder (:func:`user_cache_dir`) and read from
   there afterwards. A single-file checkpoint therefore trains offline with no tokenizer setup.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

from library.models.families import Family

logger = logging.getLogger(__name__)

MAX_LENGTH = 77


def _pad_token(family: Family, index: int) -> str | None:
    # SD2's tokenizer and SDXL's second tokenizer (OpenCLIP) pad with "!" (kohya sets it the same way).
    return family.tokenizer_pads[index]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table (a published, fixed mapping)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def user_cache_dir() -> Path:
    """Where sdtk keeps its rebuilt tokenizers: ``$SDTK_CACHE_DIR/tokenizers``, else
    ``$XDG_CACHE_HOME/sdtk/tokenizers``, else ``~/.cache/sdtk/tokenizers`` (kohya's cache layout inside)."""
    if os.environ.get("SDTK_CACHE_DIR"):
        return Path(os.environ["SDTK_CACHE_DIR"]) / "tokenizers"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdtk" / "tokenizers"


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
    family = Family(family)
    for i, (hub_id, subfolder) in enumerate(family.tokenizer_ids):
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
        tok, why_not = _from_hub(hub_id, subfolder, pad, tokenizer_cache_dir)
        tokenizers.append(tok if tok is not None else _builtin(hub_id, pad, tried, why_not))
    return tokenizers


def _from_hub(hub_id: str, subfolder: str | None, pad: str | None, cache_dir) -> tuple[object | None, str]:
    """The tokenizer from the hub, or ``(None, why not)`` without waiting when the machine is offline."""
    from transformers import CLIPTokenizer

    if _offline():
        return None, "HF_HUB_OFFLINE is set"
    if not _hub_reachable():
        return None, "the model hub is not reachable"
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        tok = CLIPTokenizer.from_pretrained(hub_id, **kwargs)
    except Exception as e:  # network errors come in many types; the message is what matters
        return None, f"downloading it failed: {type(e).__name__}"
    tok = _finish(tok, pad)
    if cache_dir is not None:
        from library.utils.atomic import atomic_dir

        with atomic_dir(cache_folder(cache_dir, hub_id)) as tmp:
            tok.save_pretrained(str(tmp))
        logger.info("saved tokenizer %s into %s", hub_id, cache_dir)
    return tok, ""


def _builtin(hub_id: str, pad: str | None, tried: list[str], why_not: str):
    """sdtk's rebuilt copy of ``hub_id`` from the per-user cache, written there first if missing."""
    from transformers import CLIPTokenizer

    folder = cache_folder(user_cache_dir(), hub_id)
    logger.info("tokenizer %s not found (looked in: %s; %s): using sdtk's bundled CLIP vocabulary, cached in %s",
                hub_id, ", ".join(tried) or "no folder given", why_not, folder)
    if folder.is_dir():
        try:
            return _finish(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), pad)
        except Exception as e:  # a damaged cache is rebuilt below
            logger.warning("rebuilding the tokenizer cache %s (%s)", folder, e)
    tok = build_clip_tokenizer(pad)
    from library.utils.atomic import atomic_dir

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder) as tmp:
            tok.save_pretrained(str(tmp))
    except OSError as e:  # read-only home, or another process wrote it at the same moment: the tokenizer is in hand
        if not folder.is_dir():
            logger.warning("could not cache the tokenizer in %s (%s); it is rebuilt on every run", folder, e)
    return tok


def build_clip_tokenizer(pad_token: str | None = None):
    """The real CLIP ViT-L/14 (and OpenCLIP bigG/H) tokenizer, rebuilt offline from the bundled BPE file.

    The vocabulary is OpenAI's: 256 byte symbols, the same with ``</w>``, one token per merge of the
    first 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens).
    """
    import gzip

    from transformers import CLIPTokenizer

    data = resources.files("library.models").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab_list)}, merges=merges)
    return _finish(tok, pad_token)


def write_builtin_tokenizers(family: Family, cache_dir: str | os.PathLike) -> list[Path]:
    """Write the family's tokenizers, rebuilt from the bundled vocabulary, into a kohya-layout cache."""
    family = Family(family)
    toks = [build_clip_tokenizer(_pad_token(family, i)) for i in range(len(family.tokenizer_ids))]
    save_tokenizer_cache(toks, family, cache_dir)
    return [cache_folder(cache_dir, hub_id) for hub_id, _ in family.tokenizer_ids]


def save_tokenizer_cache(tokenizers: list, family: Family, cache_dir: str | os.PathLike) -> None:
    """Write tokenizers into a ``--tokenizer_cache_dir`` in kohya's layout."""
    from library.utils.atomic import atomic_dir

    for tok, (hub_id, _) in zip(tokenizers, Family(family).tokenizer_ids):
        with atomic_dir(cache_folder(cache_dir, hub_id)) as tmp:
            tok.save_pretrained(str(tmp))
