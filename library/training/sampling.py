"""Sample prompts (kohya's file formats) and image generation with diffusers pipelines.

The prompt file is ``.txt`` (one prompt per line, options after `` --``: ``--n`` negative
prompt, ``--w`` / ``--h`` size, ``--s`` steps, ``--d`` seed, ``--l`` CFG scale, ``--ss``
sampler; ``#`` comments), ``.toml`` (``[[prompt]]`` tables, optionally with ``[prompt]``
defaults in kohya's layout) or ``.json`` (a list of objects). Keys follow kohya:
``prompt``, ``negative_prompt``, ``width``, ``height``, ``sample_steps``, ``seed``, ``scale``,
``sample_sampler``. The pipelines are built by :func:`library.inference.pipeline.build_pipeline`, as
gen_img's are.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from library.errors import ConfigError
from library.inference.pipeline import assemble_pipeline, build_pipeline
from library.inference.schedulers import make_scheduler
from library.models.xti import per_block_kwargs
from library.utils.atomic import atomic_write

logger = logging.getLogger(__name__)

@dataclass
class SamplePrompt:
    """One sample to render (kohya's defaults: 512x512, 30 steps, CFG 7.5, random seed)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    sample_steps: int = 30
    scale: float = 7.5
    seed: int | None = None
    sample_sampler: str | None = None
    enum: int = 0


_TXT_OPTIONS = (
    (re.compile(r"^n (.*)", re.S), "negative_prompt", str),
    (re.compile(r"^w (\d+)"), "width", int),
    (re.compile(r"^h (\d+)"), "height", int),
    (re.compile(r"^s (\d+)"), "sample_steps", int),
    (re.compile(r"^d (\d+)"), "seed", int),
    (re.compile(r"^l ([\d.]+)"), "scale", float),
    (re.compile(r"^ss (\S+)"), "sample_sampler", str),
)


def parse_prompt_line(line: str, enum: int = 0) -> SamplePrompt:
    """Parse one txt line, e.g. ``a cat --n blurry --w 512 --h 768 --d 42 --l 7 --s 20 --ss euler_a``."""
    parts = line.split(" --")
    sp = SamplePrompt(prompt=parts[0].strip(), enum=enum)
    for part in parts[1:]:
        part = part.strip()
        for pattern, key, typ in _TXT_OPTIONS:
            m = pattern.match(part)
            if m:
                setattr(sp, key, typ(m.group(1).strip()))
                break
        else:
            logger.warning("sample prompt %d: option '--%s' is not understood and ignored", enum, part)
    return sp


_KEY_ALIASES = {"negative_prompt": "negative_prompt", "n": "negative_prompt", "width": "width", "w": "width",
                "height": "height", "h": "height", "sample_steps": "sample_steps", "steps": "sample_steps",
                "s": "sample_steps", "scale": "scale", "cfg_scale": "scale", "l": "scale", "seed": "seed",
                "d": "seed", "sample_sampler": "sample_sampler", "sampler": "sample_sampler", "ss": "sample_sampler",
                "prompt": "prompt"}


def _from_dict(d: dict[str, Any], enum: int, source: str) -> SamplePrompt:
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        if k not in _KEY_ALIASES:
            raise ConfigError(f"sample prompt {enum}: unknown key {k!r}; valid keys: "
                              "prompt, negative_prompt, width, height, sample_steps, scale, seed, sample_sampler",
                              source=source)
        kwargs[_KEY_ALIASES[k]] = v
    if "prompt" not in kwargs:
        raise ConfigError(f"sample prompt {enum} has no 'prompt'", source=source)
    return SamplePrompt(enum=enum, **kwargs)


def load_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a prompt file (.txt, .toml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sample_prompts {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        return [parse_prompt_line(ln, i) for i, ln in enumerate(lines)]
    if path.suffix.lower() == ".toml":
        import toml

        data = toml.loads(text)
        base = {k: v for k, v in data.get("prompt", {}).items() if k != "subset"} if isinstance(
            data.get("prompt"), dict) else {}
        items = data["prompt"].get("subset", []) if isinstance(data.get("prompt"), dict) else data.get("prompt", [])
        return [_from_dict({**base, **d}, i, str(path)) for i, d in enumerate(items)]
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        return [_from_dict(d, i, str(path)) for i, d in enumerate(data)]
    raise ConfigError(f"--sample_prompts {path}: use a .txt, .toml or .json file")


def image_file_name(output_name: str | None, prompt_index: int, seed: int | None, *, steps: int,
                    epoch: int | None) -> str:
    """kohya's sample name: ``NAME_e000001_00_20240101120000_42.png`` or ``NAME_000100_00_...``."""
    num = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    ts = time.strftime("%Y%m%d%H%M%S", time.localtime())
    seed_part = "" if seed is None else f"_{seed}"
    return f"{output_name + '_' if output_name else ''}{num}_{prompt_index:02d}_{ts}{seed_part}.png"


@torch.no_grad()
def render_sample(pipe: Any, encode, sp: SamplePrompt, device: torch.device, dtype: torch.dtype):
    """Render one image with ``pipe`` (a pipeline of :mod:`library.inference.pipeline`, its scheduler set).

    Args:
        encode: ``encode(list[str]) -> Conditioning``; the family's text encoding (clip skip, long prompts).
        sp: the prompt and its options.
    Returns:
        a PIL image.
    """
    cond = encode([sp.prompt])
    uncond = encode([sp.negative_prompt or ""])
    pos, neg = _match_lengths(cond.hidden_states, uncond.hidden_states)
    width = max(64, sp.width - sp.width % 8)
    height = max(64, sp.height - sp.height % 8)
    generator = torch.Generator(device="cpu")
    # an unseeded prompt must not reseed the global RNG (that would change training randomness)
    generator.manual_seed(sp.seed if sp.seed is not None else secrets.randbits(63))
    kwargs: dict[str, Any] = dict(prompt_embeds=pos.to(device, dtype), negative_prompt_embeds=neg.to(device, dtype))
    if cond.pooled is not None:
        kwargs.update(pooled_prompt_embeds=cond.pooled.to(device, dtype),
                      negative_pooled_prompt_embeds=uncond.pooled.to(device, dtype))
    if cond.layers is not None:  # XTI: per-layer states for the hooked UNet, in the pipeline's [negative, prompt] order
        pairs = [_match_lengths(p, n) for p, n in zip(cond.layers, uncond.layers)]
        layers = torch.stack([torch.cat([n, p]) for p, n in pairs])
        kwargs["cross_attention_kwargs"] = per_block_kwargs(layers.to(device, dtype))
    out = pipe(width=width, height=height, num_inference_steps=max(1, sp.sample_steps), guidance_scale=sp.scale,
               generator=generator, output_type="pil", **kwargs)
    return out.images[0]


def generate(pipeline_cls: type, components: dict[str, Any], encode, sp: SamplePrompt, scheduler_config: dict,
             default_sampler: str, device: torch.device, dtype: torch.dtype):
    """Render one image with a new ``pipeline_cls`` pipeline over ``components`` (the pipeline's own names:
    ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ...); see :func:`render_sample`. Training samples
    go through :func:`~library.inference.pipeline.build_pipeline`, which asks the family for the class."""
    scheduler = make_scheduler(sp.sample_sampler or default_sampler, scheduler_config)
    return render_sample(assemble_pipeline(pipeline_cls, components, scheduler), encode, sp, device, dtype)


def _match_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter embedding with its last state so CFG can batch them (long prompts)."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.cat([t, t[:, -1:].expand(-1, n - t.shape[1], -1)], dim=1)  # noqa: E731
    return (pad(a) if a.shape[1] < n else a), (pad(b) if b.shape[1] < n else b)


def should_sample(*, steps: int, epoch: int | None, every_n_steps: int | None, every_n_epochs: int | None,
                  at_first: bool) -> bool:
    """kohya's cadence: ``steps == 0`` is the before-training call; epoch cadence wins over steps."""
    if steps == 0:
        return at_first
    if every_n_steps is None and every_n_epochs is None:
        return False
    if every_n_epochs is not None:
        return epoch is not None and epoch % every_n_epochs == 0
    return epoch is None and steps % every_n_steps == 0


def with_defaults(prompts: list[SamplePrompt], **overrides: Any) -> list[SamplePrompt]:
    return [replace(p, **overrides) for p in prompts]


def sample_during_training(s: Any, steps: int, epoch: int | None) -> list[Path]:
    """Render every prompt of ``--sample_prompts`` with the network applied; main process only.

    The UNet and text encoders are switched to eval mode and back; the VAE visits the device
    only for the duration (it lives on the CPU when latents are cached).
    """
    a, acc = s.args, s.accelerator
    prompts = load_prompts(a.sample_prompts)
    out_dir = Path(a.output_dir) / "sample"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = s.model
    vae_device = next(model.vae.parameters()).device
    model.vae.to(acc.device)
    # the network too: no dropout in samples, and DyLoRA renders at its full rank
    network = getattr(s, "network", None)
    modes = [(m, m.training) for m in [model.unet, *model.text_encoders, network] if m is not None]
    for m, _ in modes:
        m.eval()
    # sample prompts may weight words, "(word:1.2)", as kohya's long-prompt-weighting pipelines read them
    encode = lambda texts: s.family.encode_prompts(  # noqa: E731
        model.text_encoders, model.tokenizers, texts, a.max_token_length, a.clip_skip, acc.device,
        weighted=True, keep_mean=True)
    written = []
    try:
        for sp in prompts:
            pipe = build_pipeline(model, make_scheduler(sp.sample_sampler or a.sample_sampler or "ddim",
                                                        model.scheduler_config))
            with acc.autocast():
                image = render_sample(pipe, encode, sp, acc.device, model.unet.dtype)
            path = out_dir / image_file_name(a.output_name, sp.enum, sp.seed, steps=steps, epoch=epoch)
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
            written.append(path)
            logger.info("sample image %s", path)
    finally:
        for m, was_training in modes:
            m.train(was_training)
        model.vae.to(vae_device)
    return written
