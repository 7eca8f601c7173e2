"""gen_img prompts: kohya's inline options, prompt files, and the list of images a job renders.

A prompt line is ``text --n negative --w 512 --h 768 --s 30 --d 1,2,3 --l 7 --ss euler_a``;
options (case-insensitive, as kohya): ``n`` negative prompt, ``w`` / ``h`` size, ``s`` steps
(1..1000), ``d`` seeds (one per image of the prompt; the last repeats; ``-1`` draws random
seeds), ``l`` guidance scale, ``nl`` negative scale (``none`` to disable), ``t`` img2img
strength, ``ss`` sampler (sdtk addition, as in training sample prompts), ``am`` network
multipliers, and for SDXL ``ow`` / ``oh`` / ``nw`` / ``nh`` / ``ct`` / ``cl`` size conditioning.
kohya's other options are rejected with an error rather than ignored. kohya's dynamic prompt
variants (``{a|b}``, ``{e$$a|b}``, ``{2$$a|b|c}``; see :mod:`library.inference.dynamic_prompts`)
are expanded per line and ``--n_iter`` round before the options are parsed.

Seeds follow kohya: with ``--seed``, one prompt and one image per prompt, that seed is used; otherwise
``--seed`` seeds the generator that draws each image's seed (0 .. 2^32-1), so a job is
reproducible as a whole.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from library.errors import ConfigError
from library.inference.dynamic_prompts import expand_variants, first_variant, image_prompts, variant_rng
from library.inference.schedulers import SAMPLERS

MAX_SEED = 2**32 - 1
_UNSUPPORTED = ("c", "f", "dsd1", "dst1", "dsd2", "dst2", "dsr", "glt", "glr", "gle", "gls", "glsn", "glus")


@dataclass(frozen=True)
class PromptOptions:
    """Everything that decides one prompt's images (kohya's per-prompt settings)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 50
    scale: float = 7.5
    negative_scale: float | None = None
    strength: float = 0.8
    sampler: str = "ddim"
    seeds: tuple[int, ...] | None = None
    network_muls: tuple[float, ...] | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def batch_key(self) -> tuple:
        """Images can share a pipeline call only when everything but the texts and seeds is equal."""
        return tuple(v for k, v in self.__dict__.items() if k not in ("prompt", "negative_prompt", "seeds"))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _opt_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int),
    "s": ("steps", lambda v: max(1, min(1000, int(v)))), "d": ("seeds", _ints), "l": ("scale", float),
    "nl": ("negative_scale", _opt_float), "t": ("strength", float), "ss": ("sampler", str),
    "am": ("network_muls", _floats), "ow": ("original_width", int), "oh": ("original_height", int),
    "nw": ("original_width_negative", int), "nh": ("original_height_negative", int),
    "ct": ("crop_top", int), "cl": ("crop_left", int),
}


def parse_prompt(line: str, defaults: PromptOptions, where: str = "--prompt") -> PromptOptions:
    """Parse one prompt with its inline options on top of ``defaults``.

    A line with dynamic variants is checked and parsed with each group's first value
    (:func:`plan_images` expands the variants before parsing).

    Raises:
        ConfigError: an option sdtk does not know or support, or a bad value (naming ``where``).
    """
    line = first_variant(line, where)
    parts = line.strip().split(" --")
    changes: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        m = re.match(r"(\w+)(?:\s+(.*))?$", part.strip(), re.S)
        key = m.group(1).lower() if m else part.strip()
        if key in _UNSUPPORTED:
            raise ConfigError(f"{where}: inline option --{key} is not supported by sdtk")
        if key not in _OPTIONS or not m or m.group(2) is None:
            raise ConfigError(f"{where}: inline option '--{part.strip()}' is not understood; known: "
                              + ", ".join(f"--{k}" for k in _OPTIONS))
        name, conv = _OPTIONS[key]
        try:
            changes[name] = conv(m.group(2).strip())
        except ValueError:
            raise ConfigError(f"{where}: bad value for --{key}: {m.group(2).strip()!r}") from None
    if changes.get("sampler") is not None:
        changes["sampler"] = changes["sampler"].lower()
        if changes["sampler"] not in SAMPLERS:
            raise ConfigError(f"{where}: unknown sampler {changes['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    opts = replace(defaults, **changes)
    if min(opts.width, opts.height) < 64:
        raise ConfigError(f"{where}: the image size must be at least 64x64, got {opts.width}x{opts.height}")
    if not 0.0 <= opts.strength <= 1.0:
        raise ConfigError(f"{where}: --t (strength) must be between 0 and 1, got {opts.strength}")
    # diffusers needs sizes divisible by 8 (the VAE's factor); kohya's W/H are rounded down the same way
    return replace(opts, width=opts.width - opts.width % 8, height=opts.height - opts.height % 8)


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt file that are not ``#`` comments."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--from_file {path}: file not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ConfigError(f"--from_file {path}: no prompts in the file")
    return lines


@dataclass(frozen=True)
class ImageTask:
    """One image to render."""

    index: int  # position in its iteration (kohya's global_step)
    options: PromptOptions
    seed: int
    init_image: str | None = None


def _seed_source(seed: int | None, single_image: bool) -> Callable[[], int]:
    if seed is not None and single_image:
        return lambda: seed
    rng = random.Random(seed) if seed is not None else random.Random()
    return lambda: rng.randint(0, MAX_SEED)


def plan_images(lines: list[str], defaults: PromptOptions, *, images_per_prompt: int = 1, n_iter: int = 1,
                seed: int | None = None, iter_same_seed: bool = False, init_images: list[str] | None = None,
                image_size: Callable[[str], tuple[int, int]] | None = None,
                where: Callable[[int], str] = lambda i: "--prompt") -> list[ImageTask]:
    """Every image of the job, in kohya's order (iteration, prompt, image of the prompt).

    Dynamic variants are expanded per line and round (kohya): random ones give each of the
    ``images_per_prompt`` images its own choice; enumerated ones give one image per variant. The
    choices are seeded from ``seed`` (:func:`~library.inference.dynamic_prompts.variant_rng`).

    Args:
        init_images: img2img sources, used in turn; the size of each image (rounded down to a
            multiple of 32, as kohya) replaces the prompt's width and height.
        image_size: ``path -> (width, height)``.
    """
    rng = variant_rng(seed)
    rounds = [[image_prompts(expand_variants(line, images_per_prompt, rng, where(i)), images_per_prompt)
               for i, line in enumerate(lines)] for _ in range(n_iter)]
    parsed: dict[tuple[int, str], PromptOptions] = {}
    draw = _seed_source(seed, len(lines) == 1 and bool(rounds) and len(rounds[0][0]) == 1)
    tasks: list[ImageTask] = []
    for images in rounds:
        iter_seed = draw() if iter_same_seed else None
        step = 0
        for li, line_images in enumerate(images):
            for text, pi in line_images:
                if (li, text) not in parsed:
                    parsed[li, text] = parse_prompt(text, defaults, where(li))
                opts = parsed[li, text]
                if opts.seeds:
                    s = opts.seeds[min(pi, len(opts.seeds) - 1)]
                    s = None if s < 0 else s
                else:
                    s = iter_seed
                init = init_images[step % len(init_images)] if init_images else None
                o = opts
                if init is not None and image_size is not None:
                    w, h = image_size(init)
                    o = replace(opts, width=max(32, w - w % 32), height=max(32, h - h % 32))
                tasks.append(ImageTask(step, o, draw() if s is None else s, init))
                step += 1
    return tasks


def batches(tasks: list[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Consecutive tasks with equal settings, at most ``batch_size`` per batch."""
    out: list[list[ImageTask]] = []
    for t in tasks:
        if out and len(out[-1]) < batch_size and out[-1][-1].options.batch_key() == t.options.batch_key():
            out[-1].append(t)
        else:
            out.append([t])
    return out
