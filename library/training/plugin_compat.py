"""Narrow workarounds for known bugs of third-party network modules, applied only to them.

Each fix names the package version range it is for and changes nothing when not needed.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def fix_lycoris_duplicate_time_embedding(module: Any) -> None:
    """lycoris-lora 4.1.x: the ``full`` preset targets ``TimestepEmbedding`` by class *and*
    ``time_embedding.linear_1/2`` by name, so on SD/SDXL UNets the same module is wrapped twice
    and ``create_network`` fails with "duplicated lora name: lora_unet_time_embedding_linear_1".

    Dropping the two names keeps exactly the same modules and key names (the class match
    covers them), which is what older lycoris versions produced.
    """
    presets = getattr(module, "PRESET", None)
    if not isinstance(presets, dict):
        return
    for name, preset in presets.items():
        targets = preset.get("unet_target_module") or []
        names = preset.get("unet_target_name") or []
        if "TimestepEmbedding" in targets and any(n.startswith("time_embedding.") for n in names):
            preset["unet_target_name"] = [n for n in names if not n.startswith("time_embedding.")]
            logger.debug("lycoris preset %s: time_embedding covered by class match, names dropped", name)


def fix_lycoris_default_time_embedding(module: Any) -> None:
    """The same lycoris 4.1.x duplicate, in the class defaults that ``create_network_from_weights``
    uses (no preset is applied there): loading any LyCORIS file for an SD/SDXL UNet fails."""
    cls = getattr(module, "LycorisNetworkKohya", None)
    targets = getattr(cls, "UNET_TARGET_REPLACE_MODULE", None) or []
    names = getattr(cls, "UNET_TARGET_REPLACE_NAME", None) or []
    if "TimestepEmbedding" in targets and any(n.startswith("time_embedding.") for n in names):
        cls.UNET_TARGET_REPLACE_NAME = [n for n in names if not n.startswith("time_embedding.")]


def apply_fixes(module_name: str, module: Any) -> None:
    """Apply the fixes that concern ``module_name`` (the ``--network_module`` value)."""
    if module_name.startswith("lycoris."):
        fix_lycoris_duplicate_time_embedding(module)
        fix_lycoris_default_time_embedding(module)
