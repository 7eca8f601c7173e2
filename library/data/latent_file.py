"""The latent cache's files on disk: name, format, validity check and reader.

What both sides of the cache need: :mod:`library.data.latent_cache` writes the files,
:mod:`library.data.dataset` reads them while training (see :mod:`library.data.latent_cache` for the
layout). :func:`cache_is_valid` also serves the text-encoder cache (:mod:`library.data.te_cache`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open

from library.errors import DatasetError

logger = logging.getLogger(__name__)

FORMAT = "sdtk-latents/1"
SUFFIX = "_sdtk.safetensors"


def cache_file_for(image: Path, bucket_reso: tuple[int, int]) -> Path:
    """The disk cache path of ``image`` for a bucket ``(w, h)``."""
    return image.parent / f"{image.stem}_{bucket_reso[0]}x{bucket_reso[1]}{SUFFIX}"


def cache_is_valid(path: Path, expected: dict[str, str], skip_cache_check: bool = False,
                   what: str = "latent cache") -> bool:
    """Whether the cache file ``path`` exists and was produced by exactly the settings in ``expected``
    (recorded in its safetensors metadata). Shared by the latent and text-encoder caches."""
    if not path.is_file():
        return False
    if skip_cache_check:
        return True
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # a damaged file is rebuilt, whatever the parser's complaint
        logger.warning("%s %s is unreadable (%s); rebuilding it", what, path, e)
        return False
    stale = [k for k, v in expected.items() if meta.get(k) != v]
    if stale:
        logger.info("%s %s is stale (%s changed); rebuilding it", what, path.name, ", ".join(stale))
    return not stale


def load_latent_file(path: Path, flipped: bool = False) -> dict[str, Any]:
    """Read a disk cache: ``latents`` (the flipped ones when ``flipped``; None if absent),
    ``alpha_mask`` (unflipped) or None, ``original_size`` (w, h), ``crop_ltrb``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            key = "latents_flipped" if flipped else "latents"
            latents = f.get_tensor(key) if key in names else None
            mask = f.get_tensor("alpha_mask") if "alpha_mask" in names else None
    except Exception as e:
        raise DatasetError(f"cannot read latent cache {path}: {e}; delete it to rebuild it") from e
    size = meta.get("image_size", meta["original_size"])
    return {"latents": latents, "alpha_mask": mask, "original_size": tuple(json.loads(size)),
            "crop_ltrb": tuple(json.loads(meta["crop_ltrb"]))}
