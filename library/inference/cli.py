"""gen_img.py's machinery: argument checks, model and network setup, and the run (see docs/gen_img.md).

``gen_img.py`` at the repository root is the thin entry point; :func:`run_gen_img` is what it calls.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from library.errors import ConfigError, SdtkError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
logger = logging.getLogger("gen_img")


def check_args(args) -> list[str]:
    """Problems visible before loading anything (all at once)."""
    problems = []
    if not args.ckpt:
        problems.append("--ckpt is required: a model file (.safetensors) or a diffusers model folder")
    if not args.prompt and not args.from_file:
        problems.append("give --prompt TEXT or --from_file FILE")
    if args.prompt and args.from_file:
        problems.append("give --prompt or --from_file, not both")
    if args.fp16 and args.bf16:
        problems.append("--fp16 and --bf16 cannot be used together")
    if sum([args.sdxl, args.v1, args.v2]) > 1:
        problems.append("--sdxl, --v1 and --v2 exclude each other")
    if args.strength is not None and not args.image_path and args.highres_fix_scale is None:
        problems.append("--strength is for img2img or highres fix: give --image_path or --highres_fix_scale too")
    if args.highres_fix_scale is None:
        given = [name for name, value in (("highres_fix_strength", args.highres_fix_strength),
                                          ("highres_fix_save_1st", args.highres_fix_save_1st),
                                          ("highres_fix_latents_upscaling", args.highres_fix_latents_upscaling))
                 if value not in (None, False)]
        if given:
            problems.append(f"--{given[0]} is a highres fix setting: give --highres_fix_scale too")
    elif args.highres_fix_strength is not None and not args.image_path:
        problems.append("--highres_fix_strength is the first stage's img2img strength (kohya), used only with "
                        "--image_path; the second stage's strength is --strength")
    if args.image_path and not Path(args.image_path).exists():
        problems.append(f"--image_path {args.image_path}: no such file or folder")
    if (args.xformers or args.diffusers_xformers) and args.sdpa:
        problems.append("--xformers and --sdpa exclude each other")
    return problems


def init_images(path: str | None) -> list[str] | None:
    """The img2img sources: one file, or the images of a folder (sorted by name)."""
    if not path:
        return None
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--image_path {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return [str(f) for f in files]


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"--image_path {path}: not a readable image ({e})") from e


def check_family(args, model) -> None:
    from library.models.families import Family

    wanted = (("sdxl", args.sdxl, Family.SDXL), ("v1", args.v1, Family.SD1), ("v2", args.v2, Family.SD2))
    for flag, given, family in wanted:
        if given and model.family is not family:
            raise ConfigError(f"--{flag} was given but {args.ckpt} is an {model.family.pretty} model")
    sizes = [name for name, value in (("original_width", args.original_width),
                                      ("original_height", args.original_height),
                                      ("original_width_negative", args.original_width_negative),
                                      ("original_height_negative", args.original_height_negative),
                                      ("crop_top", args.crop_top), ("crop_left", args.crop_left))
             if value is not None]
    if sizes and not model.family.size_conditioning:
        raise ConfigError(f"--{sizes[0]} is SDXL size conditioning; {args.ckpt} is an {model.family.pretty} model")


def set_attention(args, model) -> None:
    if args.xformers or args.diffusers_xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError("--xformers needs the optional xformers package, which is not installed: "
                              "pip install 'sdtk[xformers]' (CUDA only), or use --sdpa") from None
        try:
            model.unet.enable_xformers_memory_efficient_attention()
            model.vae.enable_xformers_memory_efficient_attention()
        except Exception as e:  # xformers raises several types when the build does not fit the GPU
            raise ConfigError(f"--xformers is not usable here ({e}); use --sdpa") from e
    elif args.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        model.unet.set_attn_processor(AttnProcessor2_0())


def run(args) -> list[Path]:
    import torch

    from library.inference.generate import JobSettings, run_job
    from library.inference.highres import HighresFix, check_first_stages
    from library.inference.networks import attach_networks, network_specs
    from library.inference.prompts import PromptOptions, parse_prompt, plan_images, read_prompt_file
    from library.inference.textual_inversion import load_embeddings, read_embeddings
    from library.inference.xti import load_xti_embeddings, read_xti_embeddings
    from library.models.loading import load_models

    problems = check_args(args)
    if problems:
        raise ConfigError(problems)
    specs = network_specs(args.network_module, args.network_weights, args.network_mul, args.network_args)
    lines = read_prompt_file(args.from_file) if args.from_file else [args.prompt]
    where = (lambda i: f"{args.from_file} line {i + 1}") if args.from_file else (lambda i: "--prompt")
    for i, line in enumerate(lines):  # fail on a bad prompt before the model is loaded
        parse_prompt(line, PromptOptions(prompt=""), where(i))
    sources = init_images(args.image_path)
    embeddings = read_embeddings(args.textual_inversion_embeddings, allow_pickle=args.allow_pickle)
    xti_files = read_xti_embeddings(args.XTI_embeddings, allow_pickle=args.allow_pickle,
                                    other_words={e.token: e.path for e in embeddings})
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = load_models(args.ckpt, v2=args.v2, v_parameterization=args.v_parameterization, vae=args.vae,
                        tokenizer_cache_dir=args.tokenizer_cache_dir, allow_pickle=args.allow_pickle, dtype=dtype)
    check_family(args, model)
    words = load_embeddings(model, embeddings)  # into model.tokenizers / text_encoders, before the move
    xti = load_xti_embeddings(model, xti_files)
    width, height = model.family.resolution(False)
    defaults = PromptOptions(prompt="", width=(args.W or width) // 8 * 8,
                             height=(args.H or height) // 8 * 8, steps=args.steps, scale=args.scale,
                             negative_scale=args.negative_scale, strength=0.8 if args.strength is None else args.strength,
                             sampler=args.sampler, original_width=args.original_width,
                             original_height=args.original_height, original_width_negative=args.original_width_negative,
                             original_height_negative=args.original_height_negative, crop_top=args.crop_top,
                             crop_left=args.crop_left)
    highres = None
    if args.highres_fix_scale is not None:
        highres = HighresFix(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                             args.highres_fix_save_1st, args.highres_fix_latents_upscaling)
    # img2img renders at the source's size, but with highres fix at --W/--H, the source resized (kohya)
    tasks = plan_images(lines, defaults, images_per_prompt=args.images_per_prompt, n_iter=args.n_iter, seed=args.seed,
                        iter_same_seed=args.iter_same_seed, init_images=sources,
                        image_size=None if highres else image_size, where=where)
    if highres:
        check_first_stages(tasks, highres)

    for m in [model.unet, model.vae, *model.text_encoders]:
        m.to(device).eval().requires_grad_(False)  # already in dtype (load_models)
    if args.opt_channels_last:
        model.unet.to(memory_format=torch.channels_last)
    set_attention(args, model)
    if xti:  # each cross-attention layer takes its own text states (library/models/xti.py)
        from library.models.xti import enable_per_block_conditioning

        enable_per_block_conditioning(model.unet)
    merge_n = len(specs) if args.network_merge else (args.network_merge_n_models or 0)
    networks, muls = attach_networks(specs, model, merge_count=merge_n, dtype=dtype, device=device,
                               show_meta=args.network_show_meta)
    settings = JobSettings(
        outdir=Path(args.outdir), clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples,
        emb_normalize_mode=args.emb_normalize_mode, batch_size=args.batch_size,
        sequential_file_name=args.sequential_file_name, use_original_file_name=args.use_original_file_name,
        steps_offset_zero=args.force_scheduler_zero_steps_offset, highres=highres,
        convert_prompt=words.convert_prompt if words else None,
        layer_convert_prompts=xti.converters(words.convert_prompt if words else None) if xti else None,
        record={"model": Path(args.ckpt).name, "family": model.family.value,
                "dtype": str(dtype).replace("torch.", ""), "vae": args.vae and Path(args.vae).name,
                "networks": [{"file": Path(s.weights).name, "module": s.module, "multiplier": s.multiplier,
                              "merged": i < merge_n} for i, s in enumerate(specs)],
                **({"embeddings": [Path(e.path).name for e in embeddings]} if embeddings else {}),
                **({"xti_embeddings": [Path(f.path).name for f in xti_files]} if xti_files else {})})
    return run_job(model, tasks, settings, networks, muls)


def run_gen_img(script: str, argv: list[str] | None = None) -> int:
    """Parse -> load -> generate. Every :class:`SdtkError` becomes one ``error: ...`` line and exit code 1."""
    from library.config.args import parse_args
    from library.utils.logging import configure_logging

    try:
        args = parse_args(script, argv)
        configure_logging(args)
        written = run(args)
        print(f"{len(written)} image(s) written to {args.outdir}")
        return 0
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
