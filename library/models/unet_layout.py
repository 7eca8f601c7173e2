"""Module names of the UNet in diffusers layout and in the original Stability (ldm/sgm) layout.

Single-file checkpoints and SDXL LoRA files name UNet modules the original way
(``input_blocks.4.1.transformer_blocks.0.attn1.to_q``) while sdtk trains diffusers'
``UNet2DConditionModel`` (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``).
The mapping is derived from the UNet config (block types and layers per block), not typed out
by hand, so it holds for SD1, SD2, SDXL and the tiny test models alike.

Transformer internals (``transformer_blocks.N.attn1.to_q``, ``proj_in``, ``norm``...) have the same
names in both layouts; only the block prefixes and the ResNet internals differ.
"""

from __future__ import annotations

from functools import cached_property
from typing import Mapping

# ResNet block internals: diffusers name -> original name.
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_PARTS_INV = {v: k for k, v in RESNET_PARTS.items()}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _per_block(value: int | list | tuple, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


class UNetLayout:
    """Bidirectional module-path mapping for one UNet config (a diffusers ``UNet2DConditionModel`` config)."""

    def __init__(self, unet_config: Mapping):
        self.config = dict(unet_config)

    @cached_property
    def _prefixes(self) -> list[tuple[str, str, bool]]:
        """(diffusers prefix, original prefix, is_resnet), most specific first."""
        cfg = self.config
        down_types = list(cfg["down_block_types"])
        up_types = list(cfg["up_block_types"])
        n = len(down_types)
        layers = _per_block(cfg.get("layers_per_block", 2), n)
        out: list[tuple[str, str, bool]] = [(d, o, False) for d, o in _TOP_LEVEL.items()]

        idx = 1
        for i, btype in enumerate(down_types):
            for j in range(layers[i]):
                out.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", True))
                if "CrossAttn" in btype:
                    out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", False))
                idx += 1
            if i < n - 1:
                out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", False))
                idx += 1

        mid_has_attn = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
        out.append(("mid_block.resnets.0", "middle_block.0", True))
        if mid_has_attn:
            out.append(("mid_block.attentions.0", "middle_block.1", False))
        out.append(("mid_block.resnets.1", f"middle_block.{2 if mid_has_attn else 1}", True))

        up_layers = list(reversed(layers))
        idx = 0
        for i, btype in enumerate(up_types):
            has_attn = "CrossAttn" in btype
            for j in range(up_layers[i] + 1):
                out.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", True))
                if has_attn:
                    out.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", False))
                idx += 1
            if i < n - 1:
                pos = 2 if has_attn else 1
                out.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx - 1}.{pos}.conv", False))
        return out

    @staticmethod
    def _convert(path: str, table: list[tuple[str, str, bool]], parts: Mapping[str, str]) -> str | None:
        for src, dst, is_resnet in table:
            if path == src:
                return dst
            if path.startswith(src + "."):
                rest = path[len(src) + 1 :]
                if is_resnet:
                    for a, b in parts.items():
                        if rest == a or rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                return f"{dst}.{rest}"
        return None

    def to_original(self, diffusers_path: str) -> str:
        """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (modules or parameters)."""
        out = self._convert(diffusers_path, self._prefixes, RESNET_PARTS)
        if out is None:
            raise KeyError(f"no original-layout name for UNet module {diffusers_path!r}")
        return out

    def to_diffusers(self, original_path: str) -> str:
        """Inverse of :meth:`to_original`."""
        inv = [(o, d, r) for d, o, r in self._prefixes]
        # longer original prefixes first so "input_blocks.1.0" never captures "input_blocks.1.0.op"-style paths wrongly
        inv.sort(key=lambda t: -len(t[0]))
        out = self._convert(original_path, inv, _RESNET_PARTS_INV)
        if out is None:
            raise KeyError(f"no diffusers name for original UNet module {original_path!r}")
        return out


def diffusers_to_sgm_module_map(unet_config: Mapping, module_names: list[str] | None = None) -> dict[str, str]:
    """Map diffusers module paths to original (sgm) paths.

    Args:
        unet_config: the UNet's diffusers config.
        module_names: the paths to map (e.g. ``[n for n, _ in unet.named_modules() if n]``); by default every
            block prefix of the layout.
    """
    layout = UNetLayout(unet_config)
    names = module_names if module_names is not None else [d for d, _, _ in layout._prefixes]
    return {n: layout.to_original(n) for n in names}
