"""Captions and prompts for textual inversion: kohya's templates, the token check, multi-vector expansion.

* ``--use_object_template`` / ``--use_style_template`` replace every caption by one of kohya's
  templates (those of the textual-inversion paper) with the token in it; the choice per sample is
  drawn from that sample's own generator, so it does not depend on the process layout and resumes
  exactly. Captions (and caption dropout) are then not used, as in kohya.
* Otherwise the captions must name the token: :func:`check_captions` refuses a dataset in which no
  training caption contains it (naming a file) and warns about the captions that miss it.
* With N > 1 vectors the token in captions and sample prompts is replaced by all N tokens
  (``TOKEN`` -> ``TOKEN TOKEN1 ...``, kohya's replacement), at tokenization time:
  :func:`expanding_adapter` wraps the family adapter, so training, sample prompts (weighted or not)
  and every other caller of the family's tokenizer see the same words.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import torch

from library.config.settings import flag_values
from library.errors import DatasetError

logger = logging.getLogger(__name__)

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


def templates_for(args: Any) -> tuple[str, ...] | None:
    """The template list the flags ask for, or None (train on the captions)."""
    if args.use_object_template:
        return OBJECT_TEMPLATES
    if args.use_style_template:
        return STYLE_TEMPLATES
    return None


def template_captions(templates: tuple[str, ...], token: str, gens: list[torch.Generator]) -> list[str]:
    """One template per sample, chosen from the sample's generator seed (its state is not consumed)."""
    return [random.Random(f"sdtk-ti-template/{g.initial_seed()}").choice(templates).format(token) for g in gens]


def expand_token(text: str, token: str, strings: list[str]) -> str:
    """kohya's replacement: ``token`` -> all of ``strings`` joined by spaces (nothing to do for one vector)."""
    return text.replace(token, " ".join(strings)) if len(strings) > 1 else text


def expanding_adapter(inner: Any, expand: Callable[[str], str]) -> Any:
    """``inner`` (a family adapter) whose tokenizers see every text through ``expand`` first."""
    base = type(inner)

    class Expanding(base):  # type: ignore[misc, valid-type]
        def tokenize(self, tokenizers: list, captions: list[str], max_token_length: int | None):
            return super().tokenize(tokenizers, [expand(c) for c in captions], max_token_length)

        def tokenize_weighted(self, tokenizers: list, captions: list[str], max_token_length: int | None):
            return super().tokenize_weighted(tokenizers, [expand(c) for c in captions], max_token_length)

    Expanding.__name__ = Expanding.__qualname__ = f"TokenExpanding{base.__name__}"
    adapter = Expanding()
    adapter.__dict__.update(vars(inner))
    return adapter


def check_captions(args: Any, token: str) -> None:
    """Refuse a dataset whose training captions never contain ``token``; warn about those that miss it.

    Reads the captions only (no image is decoded). Subsets whose scan has errors are skipped: the
    dataset build reports those.

    Raises:
        DatasetError: no training caption contains the token (names a caption or image file).
    """
    from library.config.dataset_config import build_blueprint_for_args
    from library.data.dataset import scan_blueprint

    blueprint = build_blueprint_for_args(vars(args), support_controlnet=bool(flag_values(args)["masked_loss"]))
    missing: list[tuple[str, str]] = []
    total = 0
    for scans in scan_blueprint(blueprint):
        for scan in scans:
            if scan.errors:
                return
            s = scan.subset
            for e in scan.entries:
                if e.is_reg:
                    continue
                total += 1
                text = " ".join(p for p in (s.caption_prefix, e.caption, s.caption_suffix) if p)
                if token not in text:
                    missing.append((str(e.caption_path or e.path), e.caption))
    if not total or not missing:
        return
    where, caption = missing[0]
    if len(missing) == total:
        raise DatasetError(f"--token_string {token!r} is in none of the {total} captions (e.g. {where}: {caption!r}); "
                           "write it into the captions where the concept appears, or train with "
                           "--use_object_template / --use_style_template")
    logger.warning("%d of %d captions do not contain --token_string %r (e.g. %s); the embedding learns only from "
                   "the others", len(missing), total, token, where)
