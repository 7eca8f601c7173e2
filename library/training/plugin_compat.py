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


def fix_lycoris_merge_multiplier(module: Any) -> None:
    """lycoris-lora 4.1.x: ``create_network_from_weights(multiplier, ...)`` builds the network at
    multiplier 1 and ``LycorisNetworkKohya.merge_to`` merges at a hard-coded 1, so a file merged at 0.7
    (``gen_img.py --network_merge``, ``--base_weights``) was merged at full strength (kohya's scripts
    call the same two functions and have the same bug).

    The wrapped factory sets the multiplier it was given; the wrapped ``merge_to`` keeps lycoris' own
    selection of the modules the weights name and merges each at the network's multiplier. At
    multiplier 1 both do exactly what lycoris does.
    """
    cls = getattr(module, "LycorisNetworkKohya", None)
    factory = getattr(module, "create_network_from_weights", None)
    if cls is None or factory is None or getattr(factory, "_sdtk_multiplier_fix", False):
        return

    def create_network_from_weights(multiplier, *args, **kwargs):
        network, weights_sd = factory(multiplier, *args, **kwargs)
        if network is not None and hasattr(network, "set_multiplier"):
            network.set_multiplier(multiplier)
        return network, weights_sd

    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None):
        te_prefix, unet_prefix = cls.LORA_PREFIX_TEXT_ENCODER, cls.LORA_PREFIX_UNET
        if not any(k.startswith(te_prefix) for k in weights_sd):
            self.text_encoder_loras = []
        if not any(k.startswith(unet_prefix) for k in weights_sd):
            self.unet_loras = []
        self.loras = self.text_encoder_loras + self.unet_loras
        if hasattr(self, "_ensure_mergeable"):
            self._ensure_mergeable()
        for lora in self.loras:
            lora.merge_to(self.multiplier)

    create_network_from_weights._sdtk_multiplier_fix = True  # type: ignore[attr-defined]
    module.create_network_from_weights = create_network_from_weights
    cls.merge_to = merge_to


def apply_fixes(module_name: str, module: Any) -> None:
    """Apply the fixes that concern ``module_name`` (the ``--network_module`` value)."""
    if module_name.startswith("lycoris."):
        fix_lycoris_duplicate_time_embedding(module)
        fix_lycoris_default_time_embedding(module)
        fix_lycoris_merge_multiplier(module)
