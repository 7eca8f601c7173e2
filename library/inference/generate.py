"""Render a gen_img job with diffusers' pipelines: batches, seeds, img2img, negative scale, PNG metadata.

sdtk encodes the prompts itself (weighting, long prompts, clip skip: see
:mod:`library.inference.prompt_weighting`) and hands the embeddings to diffusers'
``StableDiffusion[XL][Img2Img]Pipeline``, which does the sampling with the scheduler of
``--sampler``. Each image has its own CPU ``torch.Generator`` seeded with its seed, so an image
does not depend on the batch it was rendered in.

``--negative_scale`` (kohya): the UNet is also run on the empty prompt ("real" unconditional
``u``) and the guided prediction is ``u + scale * (c - u) - negative_scale * (n - u)`` with ``c``
the prompt and ``n`` the negative prompt. diffusers' pipeline computes ``a + scale * (b - a)``
from the two halves of the UNet batch; a hook around the UNet adds ``u`` to the batch and
returns ``a = u`` and ``b = c - negative_scale / scale * (n - u)``, which gives kohya's formula.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from library.inference.highres import HighresFix, first_stage_options, upscale_images, upscale_latents
from library.inference.networks import set_multipliers
from library.inference.pipeline import build_pipeline
from library.inference.prompt_weighting import encode_prompts
from library.inference.prompts import ImageTask, PromptOptions, batches
from library.inference.schedulers import make_scheduler
from library.models.xti import XTI_KWARG, XTI_LAYERS, per_block_kwargs
from library.training.family import Conditioning
from library.utils.atomic import atomic_write

logger = logging.getLogger(__name__)


@dataclass
class JobSettings:
    """Settings that are the same for every image of a job."""

    outdir: Path
    clip_skip: int | None = None
    max_embeddings_multiples: int | None = None
    emb_normalize_mode: str = "original"
    batch_size: int = 1
    sequential_file_name: bool = False
    use_original_file_name: bool = False
    steps_offset_zero: bool = False
    # recorded in every PNG (model, networks, precision ...)
    record: dict[str, Any] = field(default_factory=dict)
    highres: HighresFix | None = None  # kohya's highres fix (two stages per image)
    # (text, tokenizer) -> text before tokenizing: textual inversion words -> their tokens
    convert_prompt: Callable[[str, Any], str] | None = None
    # XTI (library/inference/xti.py): one converter per cross-attention layer (XTI_LAYERS order), used
    # instead of convert_prompt; the UNet must be hooked (library.models.xti.enable_per_block_conditioning)
    layer_convert_prompts: list[Callable[[str, Any], str]] | None = None


@contextlib.contextmanager
def negative_scale_hook(unet: torch.nn.Module, real_uncond: Conditioning, scale: float,
                        negative_scale: float, real_uncond_layers: torch.Tensor | None = None) -> Iterator[None]:
    """Run the UNet also on the empty prompt and fold kohya's negative scale in (see module doc).

    Args:
        real_uncond: the empty prompt's embeddings, ``hidden_states`` ``[B, L, D]`` (+ ``pooled``).
        real_uncond_layers: XTI: its per-layer states ``[16, B, L, D]``, appended to the per-layer batch.
    """

    def pre(module, args, kwargs):
        kw = {**dict(zip(("sample", "timestep", "encoder_hidden_states"), args)), **kwargs}
        sample = kw["sample"]
        b = sample.shape[0] // 2  # the pipeline's batch: [negative prompt, prompt]
        kw["sample"] = torch.cat([sample, sample[:b]])
        t = kw["timestep"]
        if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == 2 * b:
            kw["timestep"] = torch.cat([t, t[:b]])
        ehs = kw["encoder_hidden_states"]
        kw["encoder_hidden_states"] = torch.cat([ehs, real_uncond.hidden_states.to(ehs.device, ehs.dtype)])
        extra = kw.get("cross_attention_kwargs")
        if real_uncond_layers is not None and extra and XTI_KWARG in extra:
            layers = extra[XTI_KWARG]
            kw["cross_attention_kwargs"] = {**extra, XTI_KWARG: torch.cat(
                [layers, real_uncond_layers.to(layers.device, layers.dtype)], dim=1)}
        added = kw.get("added_cond_kwargs")
        if added:
            pooled = real_uncond.pooled.to(added["text_embeds"].device, added["text_embeds"].dtype)
            kw["added_cond_kwargs"] = {**added, "text_embeds": torch.cat([added["text_embeds"], pooled]),
                                       "time_ids": torch.cat([added["time_ids"], added["time_ids"][:b]])}
        return (), kw

    def post(module, args, kwargs, output):
        pred = output[0] if isinstance(output, tuple) else output.sample
        neg, cond, uncond = pred.chunk(3)
        folded = torch.cat([uncond, cond - (negative_scale / scale) * (neg - uncond)])
        if isinstance(output, tuple):
            return (folded, *output[1:])
        output.sample = folded
        return output

    handles = [unet.register_forward_pre_hook(pre, with_kwargs=True),
               unet.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _sdxl_sizes(o: PromptOptions) -> dict[str, Any]:
    """diffusers' SDXL size/crop conditioning for kohya's --original_* / --crop_* (defaults as kohya)."""
    orig = (o.original_height or o.height, o.original_width or o.width)
    crop = (o.crop_top or 0, o.crop_left or 0)
    kw: dict[str, Any] = dict(original_size=orig, crops_coords_top_left=crop, target_size=(o.height, o.width))
    if o.original_width_negative or o.original_height_negative:
        kw.update(negative_original_size=(o.original_height_negative or orig[0], o.original_width_negative or orig[1]),
                  negative_crops_coords_top_left=crop, negative_target_size=(o.height, o.width))
    return kw


def _load_init_image(path: str, width: int, height: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        return im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS)


@torch.no_grad()
def render_batch(model: Any, pipes: dict[bool, Any], batch: list[ImageTask], settings: JobSettings, *,
                 options: PromptOptions | None = None, init: list | torch.Tensor | None = None, seed_offset: int = 0,
                 latents_out: list | None = None) -> list:
    """Render one batch (all tasks share their settings); returns PIL images.

    Args:
        options: settings to render with instead of the tasks' own (a highres fix stage).
        init: img2img sources instead of the tasks' init images: PIL images at the size, or latents
            ``[B, 4, H/8, W/8]`` (diffusers' img2img takes 4-channel tensors as latents, unencoded).
        seed_offset: added to every task's seed (kohya seeds the second highres stage with seed + 1).
        latents_out: if given, receives the final latents ``[B, 4, H/8, W/8]`` (before decoding).
    """
    o = options or batch[0].options
    img2img = init is not None or batch[0].init_image is not None
    if img2img not in pipes:
        pipes[img2img] = build_pipeline(model, make_scheduler("ddim", model.scheduler_config), img2img=img2img)
    pipe = pipes[img2img]
    sched_cfg = dict(model.scheduler_config)
    if settings.steps_offset_zero:
        sched_cfg["steps_offset"] = 0
    # set after building: the pipeline's constructor would "fix" a steps_offset of 0 back to 1
    pipe.scheduler = make_scheduler(o.sampler, sched_cfg)
    guided = o.scale > 1.0
    negative_scale = o.negative_scale if guided else None
    if o.negative_scale is not None and not guided:
        logger.warning("--negative_scale has no effect when the guidance scale is 1 or less")
    b = len(batch)
    texts = [t.options.prompt for t in batch] + [t.options.negative_prompt for t in batch]
    texts += [""] * b if negative_scale is not None else []

    def encode(convert: Callable[[str, Any], str] | None) -> Conditioning:
        return encode_prompts(model.family, model.text_encoders, model.tokenizers, texts,
                              max_embeddings_multiples=settings.max_embeddings_multiples, clip_skip=settings.clip_skip,
                              emb_normalize_mode=settings.emb_normalize_mode, convert_prompt=convert)

    layers = None  # XTI: [16, texts, L, D]
    if settings.layer_convert_prompts:  # XTI: each layer's own encoding (one by one, as a plain prompt)
        per_layer = [encode(c).hidden_states for c in settings.layer_convert_prompts]
        layers, enc = torch.stack(per_layer), Conditioning(per_layer[XTI_LAYERS.index("MID")])
    else:
        enc = encode(settings.convert_prompt)
    dtype = model.unet.dtype
    part = lambda t, i: None if t is None else t[i * b:(i + 1) * b].to(dtype)  # noqa: E731
    layer_part = lambda i: layers[:, i * b:(i + 1) * b].to(dtype)  # noqa: E731
    kw: dict[str, Any] = dict(prompt_embeds=part(enc.hidden_states, 0), num_inference_steps=o.steps,
                              guidance_scale=o.scale, output_type="pil",
                              generator=[torch.Generator("cpu").manual_seed(t.seed + seed_offset) for t in batch])
    if guided:
        kw["negative_prompt_embeds"] = part(enc.hidden_states, 1)
    if layers is not None:  # the pipeline batches [negative, prompt] with guidance
        kw["cross_attention_kwargs"] = per_block_kwargs(
            torch.cat([layer_part(1), layer_part(0)], dim=1) if guided else layer_part(0))
    if model.family.size_conditioning:
        kw["pooled_prompt_embeds"] = part(enc.pooled, 0)
        if guided:
            kw["negative_pooled_prompt_embeds"] = part(enc.pooled, 1)
        kw.update(_sdxl_sizes(o))
    if img2img:
        image = init if init is not None else [_load_init_image(t.init_image, o.width, o.height) for t in batch]
        kw.update(image=image, strength=o.strength)
    else:
        kw.update(width=o.width, height=o.height)
    if latents_out is not None:
        def keep_latents(pipe, step, timestep, tensors):  # the last call holds the final latents
            latents_out[:] = [tensors["latents"]]
            return {}

        kw.update(callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
    hook = contextlib.nullcontext()
    if negative_scale is not None:
        real = Conditioning(part(enc.hidden_states, 2), part(enc.pooled, 2))
        hook = negative_scale_hook(model.unet, real, o.scale, negative_scale,
                                   layer_part(2) if layers is not None else None)
    with hook:
        return pipe(**kw).images


def png_info(task: ImageTask, settings: JobSettings, sdxl: bool, highres: dict[str, Any] | None = None):
    """kohya's PNG text chunks, an A1111-style ``parameters`` chunk and every setting as ``sdtk`` JSON.

    Args:
        highres: for the final image of a highres fix, its first stage (recorded; strength kept).
    """
    from PIL.PngImagePlugin import PngInfo

    o = task.options
    info = PngInfo()
    chunks = {"prompt": o.prompt, "seed": task.seed, "sampler": o.sampler, "steps": o.steps, "scale": o.scale,
              "negative-prompt": o.negative_prompt}
    if o.negative_scale is not None:
        chunks["negative-scale"] = o.negative_scale
    if sdxl:
        chunks.update({"original-height": o.original_height or o.height, "original-width": o.original_width or o.width,
                       "original-height-negative": o.original_height_negative or o.original_height or o.height,
                       "original-width-negative": o.original_width_negative or o.original_width or o.width,
                       "crop-top": o.crop_top or 0, "crop-left": o.crop_left or 0})
    for k, v in chunks.items():
        info.add_text(k, str(v))
    a1111 = o.prompt + (f"\nNegative prompt: {o.negative_prompt}" if o.negative_prompt else "")
    a1111 += f"\nSteps: {o.steps}, Sampler: {o.sampler}, CFG scale: {o.scale}, Seed: {task.seed}, " \
             f"Size: {o.width}x{o.height}"
    if task.init_image is not None or highres:
        a1111 += f", Denoising strength: {o.strength}"
    if highres:
        a1111 += f", Highres fix: {highres['first_width']}x{highres['first_height']} first, {highres['steps']} steps"
    info.add_text("parameters", a1111)
    everything = {k: v for k, v in o.__dict__.items() if v is not None}
    everything.update(seed=task.seed, init_image=task.init_image, clip_skip=settings.clip_skip,
                      max_embeddings_multiples=settings.max_embeddings_multiples,
                      emb_normalize_mode=settings.emb_normalize_mode, **settings.record)
    if highres:
        everything["highres_fix"] = highres
    elif task.init_image is None:
        everything.pop("strength", None)
    info.add_text("sdtk", json.dumps(everything, default=str))
    return info


def _file_name(task: ImageTask, i_in_batch: int, settings: JobSettings, stamp: str, stage: str = "") -> str:
    """kohya's names; ``stage`` is "0" / "1" for the first / final image of a highres fix (kohya's prefix)."""
    if settings.use_original_file_name and task.init_image is not None:
        return Path(task.init_image).stem + ("_1st" if stage == "0" else "") + ".png"
    if settings.sequential_file_name:
        return f"im_{stage}{task.index + 1:06d}.png"
    return f"im_{stamp}_{stage}{i_in_batch:03d}_{task.seed}.png"


def _free_path(folder: Path, name: str) -> Path:
    """``name`` in ``folder``, or ``stem_1.png``, ``stem_2.png``... if taken (never overwrite an image)."""
    path = folder / name
    n = 1
    while path.exists():
        path = folder / f"{Path(name).stem}_{n}{Path(name).suffix}"
        n += 1
    return path


def run_job(model: Any, tasks: list[ImageTask], settings: JobSettings, networks: list | None = None,
            default_muls: list[float] | None = None) -> list[Path]:
    """Render and save every task (one progress bar over the whole job); returns the written files.

    Args:
        networks: hooked networks; a prompt's ``--am`` sets their multipliers for its images
            (missing values repeat the last one), other prompts use ``default_muls``.
    """
    from tqdm import tqdm

    settings.outdir.mkdir(parents=True, exist_ok=True)
    pipes: dict[bool, Any] = {}
    written: list[Path] = []
    sdxl = model.family.size_conditioning
    with tqdm(total=len(tasks), desc="generating", unit="img") as bar:
        for batch in batches(tasks, settings.batch_size):
            muls = batch[0].options.network_muls
            if muls and not networks:
                logger.warning("--am %s has no effect: no network is hooked (merged networks keep their "
                               "multiplier)", ",".join(map(str, muls)))
            if networks and (muls or default_muls):
                muls = list(muls) + [muls[-1]] * (len(networks) - len(muls)) if muls else default_muls
                set_multipliers(networks, muls)
            if settings.highres is None:
                images = render_batch(model, pipes, batch, settings)
                written += _save(batch, images, settings, sdxl)
            else:
                written += _render_highres(model, pipes, batch, settings, settings.highres)
            bar.update(len(batch))
    return written


def _save(batch: list[ImageTask], images: list, settings: JobSettings, sdxl: bool, stage: str = "",
          options: PromptOptions | None = None, highres: dict[str, Any] | None = None) -> list[Path]:
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    written = []
    for i, (task, image) in enumerate(zip(batch, images)):
        task = task if options is None else replace(task, options=options)
        path = _free_path(settings.outdir, _file_name(task, i, settings, stamp, stage))
        info = png_info(task, settings, sdxl, highres)
        atomic_write(path, lambda tmp, image=image, info=info: image.save(tmp, format="PNG", pnginfo=info))
        written.append(path)
    return written


def _render_highres(model: Any, pipes: dict[bool, Any], batch: list[ImageTask], settings: JobSettings,
                    hr: HighresFix) -> list[Path]:
    """kohya's highres fix for one batch (see :mod:`library.inference.highres`); returns the written files."""
    sdxl = model.family.size_conditioning
    o = batch[0].options
    first = first_stage_options(o, hr)
    latents: list = []
    images = render_batch(model, pipes, batch, settings, options=first,
                          latents_out=latents if hr.latents_upscaling else None)
    written = _save(batch, images, settings, sdxl, "0", first) if hr.save_1st else []
    if hr.latents_upscaling:
        init = upscale_latents(latents[0], o.width, o.height)
    else:
        init = upscale_images(images, o.width, o.height)
    final = render_batch(model, pipes, batch, settings, init=init, seed_offset=1)
    return written + _save(batch, final, settings, sdxl, "1", highres=hr.record(first))
