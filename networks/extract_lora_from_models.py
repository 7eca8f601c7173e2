"""Extract a LoRA from the difference of two models by SVD (kohya's ``networks/extract_lora_from_models.py``).

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to extracted.safetensors --dim 32 --conv_dim 16 --save_precision fp16 [--sdxl]

For every module kohya's LoRA targets (``networks.lora.create_network`` with ``--dim`` and, when given,
``--conv_dim``), the weight difference ``tuned - org`` is decomposed and truncated to the rank
(``min(rank, in, out)``); factors are clamped at their ``--clamp_quantile`` and alpha = rank. Text
encoders are kept only if some weight differs by more than ``--min_diff``. Keys follow each family's
kohya layout (SD1/SD2: diffusers paths; SDXL: original sgm paths; ``lora_te`` / ``lora_te1/2``).

Models (single files or diffusers folders; the family is detected, ``--v2`` / ``--sdxl`` are checked)
are read one module at a time with plain file reads, so memory holds a few tensors, never a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import ConfigError, ModelLoadError  # noqa: E402
from library.models import original_layout as ol  # noqa: E402
from library.models.families import Family  # noqa: E402
from networks import lora_math  # noqa: E402
from networks import lora_tools_common as common  # noqa: E402

logger = logging.getLogger("extract_lora_from_models")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


class SafetensorsStream:
    """Read single tensors of a ``.safetensors`` file with ``pread`` (no mmap: resident memory stays small)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(self._f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"{self.path} is not a readable safetensors file ({e}); it may be truncated") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self.entries: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> torch.Tensor:
        e = self.entries.get(key)
        if e is None:
            raise ModelLoadError(f"{self.path}: tensor {key!r} not found; the two models must have the same architecture")
        start, end = e["data_offsets"]
        buf = bytearray(end - start)
        self._f.seek(self._base + start)
        if self._f.readinto(buf) != len(buf):
            raise ModelLoadError(f"{self.path}: tensor {key!r} is cut short; the file is truncated")
        t = torch.frombuffer(buf, dtype=_ST_DTYPES[e["dtype"]]) if buf else torch.empty(0, dtype=_ST_DTYPES[e["dtype"]])
        return t.reshape(e["shape"])


class _PickleStream:
    """A ``.ckpt`` / ``.bin`` state dict (memory-mapped by torch; loaded with ``weights_only``)."""

    def __init__(self, path: Path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # corrupt pickles raise many exception types
            raise ModelLoadError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
        self.sd = obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self.sd)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ModelLoadError(f"tensor {key!r} not found; the two models must have the same architecture")
        return self.sd[key]


def _open(path: Path):
    return SafetensorsStream(path) if path.suffix == ".safetensors" else _PickleStream(path)


class ModelWeights:
    """Weights of a base model by diffusers/transformers parameter path, read lazily from disk.

    ``unet(p)`` takes a diffusers UNet parameter path; ``te(i, p)`` a path inside text encoder ``i``
    without the ``text_model.`` prefix (``encoder.layers.0.mlp.fc1.weight``).
    """

    def __init__(self, path: str):
        from library.models.loading import detect_family_from_keys, shipped_model_config

        self.path = Path(path)
        if not self.path.exists():
            raise ModelLoadError(f"{path}: no such file or folder")
        self.v_parameterization: bool | None = None
        if self.path.is_dir():
            self._init_folder()
            return
        self.file = _open(self.path)
        cfg = json.loads(self.file.metadata["sdtk.model_config"]) if "sdtk.model_config" in self.file.metadata else None
        self.family = detect_family_from_keys(self.file.keys(), str(path), cfg)
        if cfg is None or cfg.get("family") != self.family.value:
            cfg = shipped_model_config(self.family)
        else:
            self.v_parameterization = cfg["scheduler"].get("prediction_type") == "v_prediction"
        self.config = cfg
        from library.models.unet_layout import UNetLayout

        self._layout = UNetLayout(cfg["unet"])
        self._te_prefixes = self.family.te_prefixes
        self._cache: tuple[str, torch.Tensor] | None = None

    def _init_folder(self) -> None:
        root = self.path
        if not (root / "unet" / "config.json").is_file():
            raise ModelLoadError(f"{root} is not a diffusers model folder (unet/config.json not found)")
        unet_cfg = json.loads((root / "unet" / "config.json").read_text())
        te_dirs = [d for d in ("text_encoder", "text_encoder_2") if (root / d / "config.json").is_file()]
        tes = []
        for d in te_dirs:
            c = json.loads((root / d / "config.json").read_text())
            tes.append({"cls": (c.get("architectures") or ["CLIPTextModel"])[0], "config": c})
        self.family = Family.SDXL if unet_cfg.get("addition_embed_type") == "text_time" else (
            Family.SD2 if unet_cfg.get("cross_attention_dim") == 1024 else Family.SD1)
        self.config = {"family": self.family.value, "unet": unet_cfg, "text_encoders": tes}
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            self.v_parameterization = json.loads(sched.read_text()).get("prediction_type") == "v_prediction"
        self._components = {"unet": self._component(root / "unet")}
        for i, d in enumerate(te_dirs):
            self._components[f"te{i}"] = self._component(root / d)

    @staticmethod
    def _component(folder: Path):
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if len(files) != 1:
            raise ModelLoadError(f"{folder}: expected one weights file (sharded weights are not supported here)")
        return _open(files[0])

    def unet(self, param: str) -> torch.Tensor:
        if self.path.is_dir():
            return self._components["unet"].get(param)
        return self.file.get(ol.UNET_PREFIX + self._layout.to_original(param))

    def te(self, index: int, param: str) -> torch.Tensor:
        if self.path.is_dir():
            comp = self._components[f"te{index}"]
            return comp.get(param) if param in comp.keys() else comp.get("text_model." + param)
        prefix, open_clip = self._te_prefixes[index]
        if not open_clip:
            return self.file.get(prefix + "text_model." + param)
        # OpenCLIP layout (SD2, SDXL's second encoder): q/k/v live in one fused in_proj tensor.
        _, _, n, rest = param.split(".", 3)
        mod, kind = rest.rsplit(".", 1)
        base = f"{prefix}transformer.resblocks.{n}."
        if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            key = f"{base}attn.in_proj_{kind}"
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.file.get(key))
            fused = self._cache[1]
            d = fused.shape[0] // 3
            i = "qkv".index(mod[-6])
            return fused[i * d:(i + 1) * d]
        return self.file.get(base + _OPEN_CLIP_PARTS[mod] + "." + kind)


def target_modules(config: dict, dim: int, conv_dim: int | None) -> list[tuple[str, int | None, str, tuple[int, ...]]]:
    """kohya's LoRA targets of a model config: ``(lora_name, te index or None for UNet, weight path, weight shape)``.

    Args:
        config: ``{"unet": diffusers UNet config, "text_encoders": [{"cls", "config"}]}`` (sdtk's model config).
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    import transformers

    from networks.lora import create_network

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config["unet"])
        tes = [getattr(transformers, t["cls"])(transformers.CLIPTextConfig(**{k: v for k, v in t["config"].items()
                                                                                if k != "architectures"}))
               for t in config["text_encoders"]]
        kwargs = {} if conv_dim is None else {"conv_dim": conv_dim, "conv_alpha": conv_dim}
        net = create_network(1.0, dim, dim, None, tes if len(tes) > 1 else tes[0], unet, **kwargs)
    paths = {id(m): (None, p) for p, m in unet.named_modules()}
    for i, te in enumerate(tes):
        paths.update({id(m): (i, p.removeprefix("text_model.")) for p, m in te.named_modules()})
    out = []
    for lora in net.text_encoder_loras + net.unet_loras:
        where, path = paths[id(lora.org_module)]
        out.append((lora.lora_name, where, path + ".weight", tuple(lora.org_module.weight.shape)))
    return out


def _diffs(org: ModelWeights, tuned: ModelWeights, targets, load_dtype, dev_org, dev_tuned, work
           ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, te, path, shape in targets:
        w_o = (org.unet(path) if te is None else org.te(te, path)).to(dev_org, load_dtype)
        w_t = (tuned.unet(path) if te is None else tuned.te(te, path)).to(dev_tuned, load_dtype)
        if tuple(w_o.shape) != shape or tuple(w_t.shape) != shape:
            raise ModelLoadError(f"{name}: weight shapes {tuple(w_o.shape)} (org) / {tuple(w_t.shape)} (tuned) differ "
                                 f"from the architecture's {shape}; the models are not of the same architecture")
        yield name, (w_t.to(work) - w_o.to(work)).float()


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only).

    Streaming allocates and frees tens of MB per module; glibc keeps much of it in fragmented
    arenas, which would make resident memory creep up over SDXL's ~1000 modules.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def extract_module(diff: torch.Tensor, rank: int, clamp_quantile: float | None) -> common.LoRAFactors:
    """LoRA factors of rank ``min(rank, out, in)`` approximating ``diff`` (out, in[, k, k]); alpha = rank."""
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, in_dim, out_dim)
    mat = diff.reshape(out_dim, -1)
    u, s, vh = lora_math.svd_dense(mat, rank)
    a, b = lora_math.truncate(u, s, vh, rank, clamp_q=clamp_quantile)
    up, down = lora_math.to_lora_shapes(a.cpu(), b.cpu(), tuple(diff.shape))
    return common.LoRAFactors(down, up, float(rank))


def check_models(args: argparse.Namespace, org: ModelWeights, tuned: ModelWeights) -> Family:
    if args.v2 and args.sdxl:
        raise ConfigError("--v2 and --sdxl cannot be given together")
    if org.family is not tuned.family:
        raise ConfigError(f"--model_org is an {org.family.pretty} model but --model_tuned is {tuned.family.pretty}; "
                          "both must be of one family")
    fam = org.family
    if args.sdxl and fam is not Family.SDXL:
        raise ConfigError(f"--sdxl was given but {args.model_org} is an {fam.pretty} model; drop --sdxl")
    if args.v2 and fam is not Family.SD2:
        raise ConfigError(f"--v2 was given but {args.model_org} is an {fam.pretty} model; drop --v2")
    if fam is Family.SDXL and not args.sdxl:
        logger.info("%s is an SDXL model (detected; --sdxl not needed)", args.model_org)
    return fam


def extract(args: argparse.Namespace) -> int:
    out = common.require_save_to(args.save_to)
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise ConfigError("--dim and --conv_dim must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        raise ConfigError(f"--clamp_quantile {args.clamp_quantile} must be in (0, 1]")
    org, tuned = ModelWeights(args.model_org), ModelWeights(args.model_tuned)
    family = check_models(args, org, tuned)
    load_dtype = common.dtype_of(args.load_precision) or torch.float32
    work = args.device or "cpu"
    dev_org, dev_tuned = args.load_original_model_to or "cpu", args.load_tuned_model_to or "cpu"
    save_dtype = common.dtype_of(args.save_precision) or torch.float32
    targets = target_modules(org.config, args.dim, args.conv_dim)
    _trim_heap()  # the meta models built to list the targets are gone
    te_targets = [t for t in targets if t[1] is not None]
    unet_targets = [t for t in targets if t[1] is None]

    max_te = 0.0
    for _, d in _diffs(org, tuned, te_targets, load_dtype, dev_org, dev_tuned, work):
        max_te = max(max_te, float(d.abs().max()) if d.numel() else 0.0)
        if max_te > args.min_diff:
            break
    if max_te > args.min_diff:
        logger.info("text encoder is different (max |diff| %.3g > %s): extracting it too", max_te, args.min_diff)
    else:
        logger.warning("text encoder is the same (max |diff| <= %s): extracting the U-Net only", args.min_diff)
        te_targets = []

    # 1.0 means "no clamping" (kohya would still clip negatives below -max: its quantile is of signed values).
    clamp_q = args.clamp_quantile if args.clamp_quantile < 1 else None
    modules: dict[str, common.LoRAFactors] = {}
    with torch.no_grad():
        chosen = te_targets + unet_targets
        for name, diff in tqdm(_diffs(org, tuned, chosen, load_dtype, dev_org, dev_tuned, work), total=len(chosen),
                               desc="extracting", disable=None):
            rank = args.conv_dim if diff.dim() == 4 and diff.shape[2:] != (1, 1) and args.conv_dim else args.dim
            fac = extract_module(diff, rank, clamp_q)
            del diff
            modules[name] = common.LoRAFactors(fac.down.to(save_dtype), fac.up.to(save_dtype), fac.alpha)
            if len(modules) % 16 == 0:
                _trim_heap()

    v_param = args.v_parameterization if args.v_parameterization is not None else (
        org.v_parameterization if org.v_parameterization is not None else family.v2)
    net_kwargs = {} if args.conv_dim is None else {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))}
    metadata = common.minimum_network_metadata(str(family.v2), common.base_model_version(family, v_param),
                                               str(args.dim), str(float(args.dim)), net_kwargs)
    if not args.no_metadata:
        metadata.update(common.lora_modelspec(family, v_param, out))
    common.save_lora(common.factors_state_dict(modules), out, save_dtype, metadata)
    logger.info("extracted %d modules (%s) to %s", len(modules), family.pretty, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v2", action="store_true", help="the models are SD2.x (detected; checked if given)")
    p.add_argument("--v_parameterization", action="store_true", default=None,
                   help="mark the LoRA as v-prediction (default: from the model, else same as SD2)")
    p.add_argument("--sdxl", action="store_true", help="the models are SDXL (detected; checked if given)")
    p.add_argument("--load_precision", type=str, default=None, choices=[None, *common.PRECISIONS],
                   help="precision the weights are read in before differencing (default float)")
    p.add_argument("--save_precision", type=str, default=None, choices=[None, *common.PRECISIONS],
                   help="precision of the saved LoRA (default float)")
    p.add_argument("--model_org", type=str, default=None, required=True, help="original model (file or diffusers folder)")
    p.add_argument("--model_tuned", type=str, default=None, required=True, help="tuned model; the LoRA is tuned - org")
    p.add_argument("--save_to", type=str, default=None, required=True, help="output file: .safetensors, .ckpt, .pt or .pth")
    p.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    p.add_argument("--conv_dim", type=int, default=None, help="rank for 3x3 convs (default: none extracted)")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda; default cpu")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp factors at this quantile of their values, (0-1]; 1 disables clamping")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="text encoders are extracted only if some weight differs by more than this")
    p.add_argument("--no_metadata", action="store_true", help="do not write modelspec metadata (minimum ss_* is kept)")
    p.add_argument("--load_original_model_to", type=str, default=None, help="device for the original model's weights")
    p.add_argument("--load_tuned_model_to", type=str, default=None, help="device for the tuned model's weights")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_tool(build_parser(), extract, argv)


if __name__ == "__main__":
    sys.exit(main())
