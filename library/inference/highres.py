"""kohya's highres fix for gen_img: render small, upscale, then img2img at the full size.

For each image of size ``W x H``:

1. **first stage**: a normal generation (or img2img, with an ``--image_path``) at
   ``int(W * scale + 0.5)`` x ``int(H * scale + 0.5)``, each rounded down to a multiple of 32, with
   ``--highres_fix_steps`` steps (default 28) and the image's own seed. SDXL's original size and
   crop conditioning are scaled the same way. ``--highres_fix_strength`` is the first stage's
   img2img strength (kohya: it only matters with ``--image_path``; default ``--strength``).
2. **upscale** to ``W x H``: the decoded image with PIL's LANCZOS filter, or with
   ``--highres_fix_latents_upscaling`` the first stage's latents, bilinearly (float32), which the
   second stage uses as its starting latents without a VAE round trip.
3. **second stage**: img2img of the upscaled image at ``W x H`` with ``--steps`` / ``--s`` and
   ``--strength`` / ``--t`` (default 0.8), seeded with ``seed + 1`` (as kohya).

Both stages run diffusers' pipelines (see :mod:`library.inference.generate`); kohya's own
samplers draw their noise in another order, so images equal kohya's in kind, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from library.errors import ConfigError
from library.inference.prompts import ImageTask, PromptOptions

MIN_FIRST_STAGE = 64  # below 8x8 latents the UNet's three downsamplings no longer line up


@dataclass(frozen=True)
class HighresFix:
    """kohya's ``--highres_fix_*`` settings."""

    scale: float
    steps: int = 28
    strength: float | None = None  # first stage's img2img strength; None: the prompt's strength
    save_1st: bool = False
    latents_upscaling: bool = False

    def record(self, first: PromptOptions) -> dict[str, Any]:
        """What the PNG of a final image records about its first stage."""
        return {"scale": self.scale, "steps": self.steps, "first_width": first.width, "first_height": first.height,
                "upscaling": "latents (bilinear)" if self.latents_upscaling else "image (lanczos)"}


def _scaled(value: int | None, scale: float) -> int | None:
    return None if value is None else int(value * scale + 0.5)


def first_stage_options(o: PromptOptions, hr: HighresFix) -> PromptOptions:
    """The options of an image's first stage (kohya's rounding: to nearest, then down to a multiple of 32)."""
    w, h = _scaled(o.width, hr.scale), _scaled(o.height, hr.scale)
    return replace(o, width=w - w % 32, height=h - h % 32, steps=hr.steps,
                   strength=o.strength if hr.strength is None else hr.strength,
                   original_width=_scaled(o.original_width, hr.scale),
                   original_height=_scaled(o.original_height, hr.scale),
                   original_width_negative=_scaled(o.original_width_negative, hr.scale),
                   original_height_negative=_scaled(o.original_height_negative, hr.scale),
                   crop_top=_scaled(o.crop_top, hr.scale), crop_left=_scaled(o.crop_left, hr.scale))


def check_first_stages(tasks: list[ImageTask], hr: HighresFix) -> None:
    """Refuse a scale that makes a first stage smaller than 64x64 (before anything is rendered)."""
    for t in tasks:
        first = first_stage_options(t.options, hr)
        if min(first.width, first.height) < MIN_FIRST_STAGE:
            raise ConfigError(
                f"--highres_fix_scale {hr.scale}: the first stage of a {t.options.width}x{t.options.height} image "
                f"would be {first.width}x{first.height} (sizes are rounded down to multiples of 32); it must be at "
                f"least {MIN_FIRST_STAGE}x{MIN_FIRST_STAGE}: use a larger scale or a larger --W/--H")


def upscale_images(images: list, width: int, height: int) -> list:
    """First-stage PIL images to the final size with LANCZOS (kohya's default upscaler)."""
    from PIL import Image

    return [im.resize((width, height), resample=Image.LANCZOS) for im in images]


def upscale_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear upscaling of first-stage latents ``[B, 4, h/8, w/8]`` to ``[B, 4, H/8, W/8]``.

    Done in float32 (``interpolate`` lacks bfloat16 on some devices), returned in the input dtype.
    """
    up = torch.nn.functional.interpolate(latents.float(), size=(height // 8, width // 8), mode="bilinear")
    return up.to(latents.dtype)
