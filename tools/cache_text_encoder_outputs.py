"""Cache SDXL text-encoder outputs to disk ahead of training (kohya's tools/cache_text_encoder_outputs.py role).

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config data.toml --text_encoder_batch_size 16 --skip_existing

Runs the same code as ``sdxl_train_network.py --cache_text_encoder_outputs_to_disk``: each image's
caption is encoded once and written to ``<image stem>_te_sdtk.safetensors`` beside it, recording
the caption and a fingerprint of the text encoders and ``--max_token_length``, so a later training
run reuses exactly the files that are valid for it (see docs/sdxl.md). As in kohya, every caption
is re-encoded unless ``--skip_existing`` is given; with it, valid files are kept (stale ones are
always rebuilt) and ``--skip_cache_check`` keeps any existing file unchecked. Captions that change
between epochs (shuffle, dropout, warm-up, wildcards) cannot be cached and are refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.cli_args import add_dataset_arguments, dataset_args_mapping  # noqa: E402
from library.errors import SdtkError  # noqa: E402

logger = logging.getLogger("cache_text_encoder_outputs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None, help="SDXL base model (file or diffusers folder)")
    p.add_argument("--tokenizer_cache_dir", default=None, help="kohya tokenizer cache folder")
    p.add_argument("--text_encoder_batch_size", type=int, default=None, help="captions per encoder call (default 1)")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="text-encoder dtype on a GPU; use the training run's value so its files match")
    p.add_argument("--skip_existing", action="store_true", help="keep cache files that are valid for these settings")
    p.add_argument("--skip_cache_check", action="store_true", help="with --skip_existing: trust existing files unchecked")
    p.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="accepted for kohya parity (this tool always writes to disk)")
    p.add_argument("--sdxl", action="store_true", help="accepted for kohya parity (the family is detected)")
    p.add_argument("--weighted_captions", action="store_true",
                   help="captions use A1111 attention syntax, e.g. (word:1.2); use the training run's value")
    p.add_argument("--console_log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    add_dataset_arguments(p)
    return p


def cache_for_args(args: argparse.Namespace, model=None):
    """Build the datasets from ``args`` and cache their text-encoder outputs (loading the model if None)."""
    import torch

    from library.config.dataset_config import build_blueprint_for_args
    from library.data import te_cache
    from library.data.dataset import build_dataset_group
    from library.models.families import Family

    blueprint = build_blueprint_for_args(dataset_args_mapping(args))
    te_cache.check_cacheable([s for d in blueprint.datasets for s in d.subsets], train_text_encoder=False)
    group = build_dataset_group(blueprint, seed=args.seed or 0)
    if model is None:
        from library.models.loading import load_models

        model = load_models(args.pretrained_model_name_or_path, tokenizer_cache_dir=args.tokenizer_cache_dir,
                            expected=[f for f in Family if f.supports_te_cache])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the same dtype the trainer gives the encoders, so the fingerprints (and outputs) match
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for te in model.text_encoders:
        te.requires_grad_(False).eval().to(device, dtype=dtype if device.type != "cpu" else torch.float32)
    adapter = model.family.adapter()

    def encode(captions: list[str]):
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda" and dtype != torch.float32,
                                             dtype=dtype if dtype != torch.float32 else torch.bfloat16):
            return adapter.encode_prompts(model.text_encoders, model.tokenizers, captions, args.max_token_length,
                                          None, device, weighted=args.weighted_captions)

    fingerprint = te_cache.encoder_fingerprint(model.text_encoders, model.tokenizers, args.max_token_length,
                                               weighted=args.weighted_captions)
    _, stats = te_cache.cache_text_encoder_outputs(
        group.samples(), encode, fingerprint, to_disk=True, batch_size=args.text_encoder_batch_size or 1,
        skip_cache_check=args.skip_cache_check, rebuild=not args.skip_existing, progress=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.console_log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.pretrained_model_name_or_path is None:
            raise SdtkError("pass --pretrained_model_name_or_path (the SDXL model whose text encoders encode the captions)")
        stats = cache_for_args(args)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"cached text-encoder outputs: {stats.encoded} captions encoded, {stats.reused} valid cache files kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
