"""Weighted merge of two or more single-file Stable Diffusion checkpoints (kohya's tool and flags).

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.25 0.75 \\
        --output merged.safetensors --saving_precision fp16

Each tensor of the output is ``sum_i ratio_i * model_i[key]`` computed in ``--precision``. As in
kohya, ``--ratios`` are used as given (default: equal, ``1/len(models)`` each), keys missing from a
later model use the first model's value, keys only in later models are skipped, and ``--unet_only``
copies the first model's VAE and text encoders. All models must be of one family (SD1.x, SD2.x or
SDXL). Models are read tensor by tensor and the output is streamed to disk, so memory holds only a
few tensors at a time, never whole models. The first model's ``sdtk.model_config`` metadata is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.errors import ModelLoadError, ModelSaveError, SdtkError  # noqa: E402

logger = logging.getLogger("merge_models")

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Some SD1.x files store the text encoder without the ``text_model.`` level (old transformers).
_TE_KEY_FIXES = [
    (f"cond_stage_model.transformer.{part}", f"cond_stage_model.transformer.text_model.{part}")
    for part in ("embeddings.", "encoder.", "final_layer_norm.")
]

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="models to merge (.safetensors, 2 or more)")
    p.add_argument("--output", required=True, help="output file (.safetensors is appended when missing)")
    p.add_argument("--ratios", nargs="+", type=float, default=None,
                   help="ratio of each model, used as given; default: equal ratios summing to 1.0")
    p.add_argument("--unet_only", action="store_true", help="merge only the U-Net; VAE and text encoders of the first model")
    p.add_argument("--device", default="cpu", help="device for the arithmetic, default cpu")
    p.add_argument("--precision", default="float", choices=list(PRECISIONS), help="calculation precision, default float")
    p.add_argument("--saving_precision", default="float", choices=list(PRECISIONS), help="saving precision, default float")
    p.add_argument("--show_skipped", action="store_true", help="list keys of later models that the first model lacks")
    return p


def normalize_key(key: str) -> str:
    for old, new in _TE_KEY_FIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def is_unet_key(key: str) -> bool:
    return not key.startswith(("first_stage_model.", "cond_stage_model.", "conditioner."))


# ----------------------------------------------------------------------------- streaming writer
def write_safetensors_streaming(path: str | Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                                produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor, atomically; memory holds one tensor at a time.

    Args:
        path: output file (written to a temporary sibling and renamed on success).
        entries: ``(name, dtype, shape)`` of every tensor, in file order (the header is written first).
        produce: returns the CPU tensor for a name; it must have the announced dtype and shape.
        metadata: ``__metadata__`` strings.
    """
    from library.utils.atomic import atomic_path

    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _ST_DTYPES:
            raise ModelSaveError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors' own writer does
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ModelSaveError(f"tensor {name!r}: got {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------------------- merge
class _Source:
    """One input model: a lazy reader plus normalised-key -> stored-key map."""

    def __init__(self, path: str):
        from library.models.checkpoint import CheckpointReader

        p = Path(path)
        if p.exists() and p.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{path}: merge_models reads .safetensors files only; convert it first")
        self.path = path
        self.reader = CheckpointReader(path)
        self.keys = {normalize_key(k): k for k in self.reader.keys()}

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(self.keys[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(self.keys[key])


def _check_inputs(models: list[str], ratios: list[float] | None, output: Path) -> list[float]:
    if len(models) < 2:
        raise ModelLoadError("--models needs at least two models to merge")
    if ratios is not None and len(ratios) != len(models):
        raise ModelLoadError(f"--ratios has {len(ratios)} values for {len(models)} models; give one per model")
    ratios = list(ratios) if ratios is not None else [1.0 / len(models)] * len(models)
    if abs(sum(ratios) - 1.0) > 1e-6:
        logger.warning("ratios sum to %g, not 1.0: the merged weights are scaled by that factor", sum(ratios))
    if output.is_dir():
        raise ModelSaveError(f"--output {output} is a folder; give a file name")
    return ratios


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def _check_families(sources: list[_Source]) -> None:
    from library.models.loading import detect_family_from_keys

    families = [detect_family_from_keys(s.keys, s.path) for s in sources]
    if len(set(families)) > 1:
        listing = ", ".join(f"{s.path} is {f.pretty}" for s, f in zip(sources, families))
        raise ModelLoadError(f"cannot merge models of different families ({listing}); merge models of one family")


def merge(models: list[str], output: str | Path, ratios: list[float] | None = None, precision: str = "float",
          saving_precision: str = "float", unet_only: bool = False, show_skipped: bool = False,
          device: str = "cpu") -> Path:
    """Merge ``models`` into ``output``; returns the path written. See the module docstring for the rules."""
    from library.models.checkpoint import METADATA_CONFIG_KEY

    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        output = output.with_name(output.name + ".safetensors")
    ratios = _check_inputs(models, ratios, output)
    _check_device(device)
    dtype, save_dtype = PRECISIONS[precision], PRECISIONS[saving_precision]
    sources = [_Source(m) for m in models]
    _check_families(sources)
    first = sources[0]
    for s in sources[1:]:
        for key in s.keys:
            if key not in first.keys and show_skipped:
                logger.info("Skip: %s (not in %s)", key, first.path)
        missing = [k for k in first.keys if k not in s.keys]
        if missing:
            logger.warning("%d keys are not in %s; the first model's values are used (e.g. %s)", len(missing),
                           s.path, missing[0])
        wrong = [k for k in first.keys if k in s.keys and s.shape(k) != first.shape(k)]
        if wrong:
            raise ModelLoadError(f"{s.path}: tensor {wrong[0]} has shape {s.shape(wrong[0])}, but "
                                 f"{first.shape(wrong[0])} in {first.path}; these models cannot be merged")

    def produce(key: str) -> torch.Tensor:
        base = first.get(key)
        if not base.is_floating_point():  # integer buffers (position ids): copied, never averaged
            return base
        if unet_only and not is_unet_key(key):
            return base.to(save_dtype)
        acc = None
        for s, r in zip(sources, ratios):
            value = (s.get(key) if key in s.keys else base).to(device=device, dtype=dtype)
            acc = r * value if acc is None else acc + r * value
        return acc.to(device="cpu", dtype=save_dtype)

    entries = []
    for key in first.keys:
        stored = _stored_dtype(first, key)
        entries.append((key, save_dtype if stored.is_floating_point else stored, first.shape(key)))
    meta = {}
    if METADATA_CONFIG_KEY in first.reader.metadata:
        meta[METADATA_CONFIG_KEY] = first.reader.metadata[METADATA_CONFIG_KEY]
    logger.info("merging %d models with ratios %s into %s", len(sources), ratios, output)
    write_safetensors_streaming(output, entries, produce, meta)
    return output


def _stored_dtype(source: _Source, key: str) -> torch.dtype:
    """The dtype of a stored tensor, from the safetensors header (no data is read)."""
    st = source.reader._st
    if st is None:
        return source.get(key).dtype
    name = st.get_slice(source.keys[key]).get_dtype()
    table = {v: k for k, v in _ST_DTYPES.items()}
    return table[name] if name in table else source.get(key).dtype


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = merge(args.models, args.output, args.ratios, args.precision, args.saving_precision, args.unet_only,
                    args.show_skipped, args.device)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
