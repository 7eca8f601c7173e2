"""What the LoRA tools share: reading LoRA files into per-module factors, family checks, metadata, saving.

The tools (``merge_lora``, ``sdxl_merge_lora``, ``resize_lora``, ``svd_merge_lora``,
``extract_lora_from_models``, ``check_lora_weights``) are thin scripts over these helpers and
:mod:`networks.lora_math`. Every file they write goes through
:func:`networks.lora_io.save_network_weights` or :mod:`library.models.saving` (atomic: an existing
output is replaced only once the new file is complete, as kohya overwrites but never half-way).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from library.errors import ConfigError, ModelLoadError, SdtkError
from library.models.families import Family
from library.models.modelspec import TITLE_KEY, build_modelspec
from networks import lora_keys as keys
from networks.lora_io import load_state_dict_file, save_network_weights

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def dtype_of(name: str | None) -> torch.dtype | None:
    """``float`` / ``fp16`` / ``bf16`` -> torch dtype; ``None`` stays ``None``."""
    return None if name is None else PRECISIONS[name]


def run_tool(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``body``; an :class:`SdtkError` becomes one ``error: ...`` line and exit 1."""
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(body(args) or 0)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def require_save_to(path: str | None, suffixes: Iterable[str] = LORA_SUFFIXES) -> Path:
    suffixes = tuple(suffixes)
    if not path:
        raise ConfigError("--save_to is required (the output file)")
    if Path(path).suffix.lower() not in suffixes:
        raise ConfigError(f"--save_to {path}: the output must end in {', '.join(suffixes)}")
    return Path(path)


# ------------------------------------------------------------------------------------ reading
@dataclass
class LoRAFactors:
    """One module of a LoRA file: down (r, in[, k, k]), up (out, r[, 1, 1]) and alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_conv3x3(self) -> bool:
        return self.is_conv and tuple(self.down.shape[2:4]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module changes: (out, in) or (out, in, k, k)."""
        return (int(self.up.shape[0]), *self.down.shape[1:])


@dataclass
class LoRAFile:
    """A LoRA file as the tools see it: per-module factors plus everything else it holds."""

    path: str
    modules: dict[str, LoRAFactors]
    metadata: dict[str, str]
    other: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors that are not LoRA factors
    family: Family | None = None

    @property
    def title(self) -> str:
        return self.metadata.get(TITLE_KEY) or Path(self.path).stem


def load_lora(path: str, dtype: torch.dtype | None = torch.float32) -> LoRAFile:
    """Read a kohya-format LoRA file (``<name>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``).

    Raises:
        ModelLoadError: missing, unreadable or truncated file; no LoRA keys; a module with only one
            of its two factors, or factors whose ranks disagree.
    """
    tensors, metadata = load_state_dict_file(path)
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        parts = keys.split_key(key)
        if parts is None or parts[1] not in (keys.SUFFIX_DOWN, keys.SUFFIX_UP, keys.SUFFIX_ALPHA):
            other[key] = value
            continue
        by_name.setdefault(parts[0], {})[parts[1]] = value
    modules: dict[str, LoRAFactors] = {}
    for name, parts in by_name.items():
        down, up = parts.get(keys.SUFFIX_DOWN), parts.get(keys.SUFFIX_UP)
        if down is None and up is None:
            other[f"{name}.{keys.SUFFIX_ALPHA}"] = parts[keys.SUFFIX_ALPHA]
            continue
        if down is None or up is None:
            raise ModelLoadError(f"{path}: module {name} has {'lora_up' if down is None else 'lora_down'} but not its pair; the file is damaged")
        if down.shape[0] != up.shape[1]:
            raise ModelLoadError(f"{path}: module {name} has lora_down rank {down.shape[0]} but lora_up rank {up.shape[1]}")
        alpha = parts.get(keys.SUFFIX_ALPHA)
        alpha_v = float(alpha.float().item()) if alpha is not None else float(down.shape[0])  # kohya: no alpha = rank
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        modules[name] = LoRAFactors(down, up, alpha_v)
    if not modules:
        raise ModelLoadError(
            f"{path} holds no kohya LoRA weights (no '<module>.lora_down.weight' keys); LyCORIS LoHa/LoKr and "
            "PEFT/diffusers-format files are not supported by this tool"
        )
    return LoRAFile(str(path), modules, metadata, other, keys.family_of_weights(tensors, metadata))


def load_loras(paths: Sequence[str], dtype: torch.dtype | None = torch.float32) -> list[LoRAFile]:
    if not paths:
        raise ConfigError("--models is required: the LoRA files to use")
    return [load_lora(p, dtype) for p in paths]


def check_ratios(models: Sequence[str] | None, ratios: Sequence[float] | None) -> list[float]:
    if not models:
        raise ConfigError("--models is required: the LoRA files to use")
    if ratios is None or len(ratios) != len(models):
        n = 0 if ratios is None else len(ratios)
        raise ConfigError(f"{len(models)} --models but {n} --ratios: give one ratio per model")
    return list(ratios)


def _family_text(family: Family | None) -> str:
    return "SD1.x/SD2.x" if family is None or family.lora_key_layout == "sd" else family.pretty


def require_lora_family(files: Sequence[LoRAFile], sdxl_tool: bool, tool: str) -> Family | None:
    """All files must be SDXL LoRAs (SDXL tools) or SD1.x/SD2.x LoRAs (the others), and of one family.

    Returns the family found (``None`` when the keys and metadata cannot tell SD1 from SD2).
    """
    other_tool = tool.replace("sdxl_", "") if sdxl_tool else tool.replace("networks/", "networks/sdxl_")
    for f in files:
        if f.family is not None and (f.family.lora_key_layout == "sdxl") != sdxl_tool:
            raise ConfigError(f"{f.path} is a {_family_text(f.family)} LoRA; {tool} is for {_family_text(Family.SDXL if sdxl_tool else None)} — use {other_tool}")
    known = {f.family for f in files if f.family is not None}
    if len(known) > 1:
        names = ", ".join(f"{Path(f.path).name}: {_family_text(f.family)}" for f in files)
        raise ConfigError(f"the LoRAs are for different model families ({names}); merge LoRAs of one family only")
    return next(iter(known), None)


# ------------------------------------------------------------------------------------ metadata
def base_model_version(family: Family | None, v_parameterization: bool = False) -> str | None:
    if family is None:
        return None
    return family.base_model_version(v_parameterization)


def same_or_dynamic(values: Iterable[float | int]) -> str:
    """kohya's ``ss_network_dim`` / ``ss_network_alpha``: the common value, or ``Dynamic``."""
    vals = set(values)
    if len(vals) != 1:
        return "Dynamic"
    v = vals.pop()
    return str(int(v)) if isinstance(v, int) else str(v)


def minimum_network_metadata(v2: str | None, base_model: str | None, dim: str, alpha: str,
                             network_args: dict | None = None) -> dict[str, str]:
    """kohya's ``build_minimum_network_metadata``: what is needed to use the file."""
    import json

    md = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha}
    if v2 is not None:
        md["ss_v2"] = v2
    if base_model is not None:
        md["ss_base_model_version"] = base_model
    if network_args is not None:
        md["ss_network_args"] = json.dumps(network_args)
    return md


def merged_from(paths: Sequence[str]) -> str:
    """kohya's ``modelspec.merged_from``: each input's ``modelspec.title``, else its file stem."""
    titles = []
    for p in paths:
        title = None
        if Path(p).suffix == ".safetensors" and Path(p).is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(p), framework="pt") as f:
                    title = (f.metadata() or {}).get(TITLE_KEY)
            except Exception:  # unreadable metadata only loses the title
                title = None
        titles.append(title or Path(p).stem)
    return ", ".join(titles)


def lora_modelspec(family: Family | None, v_parameterization: bool, save_to: str | os.PathLike,
                   merged: str | None = None) -> dict[str, str]:
    """``modelspec.*`` of a LoRA written by a tool (title = output stem, as kohya)."""
    return build_modelspec(family or Family.SD1, v_parameterization=v_parameterization, lora=True,
                           title=Path(save_to).stem, merged_from=merged)


def save_lora(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype | None,
              metadata: Mapping[str, str]) -> None:
    """Write atomically (hashes ``sshs_*`` computed on the tensors as written)."""
    save_network_weights(state_dict, path, dtype, metadata)
    logger.info("saved %d tensors to %s", len(state_dict), path)


def factors_state_dict(modules: Mapping[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """kohya keys for per-module factors (alpha stored as a 0-d float32 tensor)."""
    sd: dict[str, torch.Tensor] = {}
    for name, f in modules.items():
        sd[f"{name}.{keys.SUFFIX_DOWN}"] = f.down
        sd[f"{name}.{keys.SUFFIX_UP}"] = f.up
        sd[f"{name}.{keys.SUFFIX_ALPHA}"] = torch.tensor(float(f.alpha))
    return sd


def add_precision_args(p: argparse.ArgumentParser, merge: bool = True) -> None:
    p.add_argument("--save_precision", type=str, default=None, choices=[None, *PRECISIONS],
                   help="precision of the saved file; default: the computation precision")
    if merge:
        p.add_argument("--precision", type=str, default="float", choices=list(PRECISIONS),
                       help="precision of the computation (float recommended)")


# ------------------------------------------------------------------------- layer-block weights
# kohya's --lbws (from sd-webui-lora-block-weight): a JSON list per model with 12, 17, 20 or 26 weights
# for the blocks BASE (text encoders), IN00-IN11, MID, OUT00-OUT11; shorter lists cover a subset of
# them (the True entries below). Lists of 12 or 20 mean SDXL for svd_merge_lora (kohya's rule).
_LBW_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
_LBW_SUBSETS = {
    12: {"BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"},
    17: {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"} | {f"OUT{i:02d}" for i in range(3, 12)},
    20: {"BASE", "MID"} | {f"IN{i:02d}" for i in range(9)} | {f"OUT{i:02d}" for i in range(9)},
    26: set(_LBW_BLOCKS),
}
_RE_UPDOWN = __import__("re").compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def parse_lbws(lbws: Sequence[str] | None, n_models: int) -> tuple[list[dict[int, float]], bool]:
    """``--lbws`` -> per model ``{block index: weight}`` (blocks not listed keep weight 1) and "is SDXL".

    Raises:
        ConfigError: not JSON lists of numbers, lengths differ or are not 12/17/20/26, count != models.
    """
    import json

    if not lbws:
        return [{} for _ in range(n_models)], False
    if len(lbws) != n_models:
        raise ConfigError(f"{n_models} --models but {len(lbws)} --lbws: give one layer-block weight list per model")
    try:
        lists = [json.loads(s) for s in lbws]
    except ValueError as e:
        raise ConfigError(f"--lbws must be JSON lists such as \"[1,0,0.5,...]\" ({e})") from e
    if not all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in lists):
        raise ConfigError("--lbws must be JSON lists of numbers")
    lengths = {len(v) for v in lists}
    if len(lengths) != 1 or next(iter(lengths)) not in _LBW_SUBSETS:
        raise ConfigError(f"--lbws lists must all have the same length, one of {sorted(_LBW_SUBSETS)} (got {sorted(lengths)})")
    n = lengths.pop()
    idx = [i for i, b in enumerate(_LBW_BLOCKS) if b in _LBW_SUBSETS[n]]
    return [dict(zip(idx, map(float, v))) for v in lists], n in (12, 20)


def lbw_block_index(lora_name: str, is_sdxl: bool) -> int:
    """kohya's block index of a LoRA module name: 0 text encoder, 1-12 IN, 13 MID, 14-25 OUT; -1 unknown."""
    if "text_model_encoder_" in lora_name:
        return 0
    if is_sdxl:
        name = lora_name.removeprefix("lora_unet_")
        if name == lora_name:
            return -1
        if name.startswith(("time_embed_", "label_emb_")):
            return 1
        if name.startswith("input_blocks_"):
            return 1 + int(name.split("_")[2])
        if name.startswith("middle_block_"):
            return 13
        if name.startswith("output_blocks_"):
            return 14 + int(name.split("_")[2])
        return 23 if name.startswith("out_") else -1
    m = _RE_UPDOWN.search(lora_name)
    if m:
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if kind == "down":
            return 1 + (3 * (i + 1) if part == "downsamplers" else 3 * i + j + 1)
        return 14 + (3 * i + 2 if part == "upsamplers" else 3 * i + j)
    return 13 if "mid_block_" in lora_name else -1
