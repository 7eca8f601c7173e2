"""``--base_weights`` / ``--base_weights_multiplier``: merge network files into the base model
before training (kohya's train_network: the network module's ``create_network_from_weights``
then ``merge_to``), so the trained network learns on top of them."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from library.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)


def base_weight_multipliers(paths: Sequence[str], multipliers: Sequence[float] | None) -> list[float]:
    """kohya's rule: the i-th multiplier applies to the i-th file; missing ones are 1.0."""
    given = list(multipliers or [])
    if len(given) > len(paths):
        raise ConfigError(f"--base_weights_multiplier has {len(given)} values for {len(paths)} --base_weights files")
    return [float(given[i]) if i < len(given) else 1.0 for i in range(len(paths))]


def merge_base_weights(module: Any, model: Any, paths: Sequence[str] | None, multipliers: Sequence[float] | None,
                       dtype: torch.dtype | None = None, device: Any = "cpu") -> int:
    """Merge each file into ``model``'s UNet / text encoder(s) in place.

    Args:
        module: the network module (``networks.lora``, ``lycoris.kohya``, ...) that reads the files.
        model: the loaded base model (``unet``, ``vae``, ``text_encoders``).
        paths: ``--base_weights``.
        multipliers: ``--base_weights_multiplier``.
        dtype / device: dtype of the merged weights (None keeps each weight's) and where the merge is
            computed (the device with
            ``--lowram``, else the CPU, as kohya).

    Returns:
        The number of files merged.
    """
    if not paths:
        return 0
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError([f"--base_weights {p}: no such file" for p in missing])
    te = model.text_encoders[0] if len(model.text_encoders) == 1 else model.text_encoders
    for path, mult in zip(paths, base_weight_multipliers(paths, multipliers)):
        try:
            network, weights_sd = module.create_network_from_weights(mult, path, model.vae, te, model.unet,
                                                                     for_inference=True)
        except ModelLoadError:
            raise
        except Exception as e:  # a plug-in module's own errors
            raise ModelLoadError(f"--base_weights {path}: cannot be read by {module.__name__} ({e})") from e
        network.merge_to(te, model.unet, weights_sd, dtype, device)
        logger.info("merged base weights %s (multiplier %s)", path, mult)
    return len(paths)
