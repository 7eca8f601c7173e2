"""Reading embedding-like files: a dict of tensors in ``.safetensors``, or a pickle when allowed.

Shared by every reader of such files: gen_img's ``--textual_inversion_embeddings``
(:mod:`library.inference.textual_inversion`) and ``--XTI_embeddings`` (:mod:`library.models.xti`),
and the embedding trainers' ``--weights``. Each caller passes its flag, which names the file in
messages; the layout inside the dict is the caller's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from library.errors import ConfigError, ModelLoadError

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")


def read_state(path: Path, allow_pickle: bool, flag: str) -> dict[str, Any]:
    """The tensors of an embedding-like file (.safetensors, or a pickle with ``allow_pickle``).

    Args:
        flag: the flag that named the file (``--weights``, ...), for messages.

    Raises:
        ConfigError: an unknown suffix, or a pickle without ``allow_pickle``.
        ModelLoadError: an unreadable file, or a pickle that does not hold a dict.
    """
    where = f"{flag} {path}"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ModelLoadError(f"{where}: not a readable .safetensors file ({str(e)[:160]})") from e
    if suffix not in PICKLE_SUFFIXES:
        raise ConfigError(f"{where}: unknown file type {suffix!r}; use .safetensors (or, with --allow_pickle, "
                          ".pt / .bin)")
    if not allow_pickle:
        raise ConfigError(f"{where} is a pickle file, which can run arbitrary code when loaded; convert it to "
                          ".safetensors, or pass --allow_pickle if you trust its source")
    try:
        # weights_only still reads A1111's dicts of tensors, strings and step counts
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{where}: cannot be read as a PyTorch file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{where}: holds a {type(obj).__name__}, not a dict of embedding tensors")
    return obj
