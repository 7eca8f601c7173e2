"""``--debug_dataset``: show what training would see, step by step, without loading a model.

kohya builds the datasets and, instead of training, logs every batch (image key, processed
caption, sizes, crop, flip) and shows each image in an OpenCV window (on Windows only), epoch
after epoch until the user presses Escape. sdtk runs headless, so it:

* logs the same information for every batch of **the first epoch**, in training order and with
  the same random choices (flip, crop, colour augmentation, caption shuffling and dropout) as a
  run with the same ``--seed`` and one process; when ``--max_train_steps`` (or
  ``--max_train_epochs``) ends training within the first epoch, only those steps are shown;
* writes the processed training images (resized, cropped, augmented, flipped) as PNG files to
  ``<output_dir>/debug_dataset/`` (alpha masks and ControlNet conditioning images beside
  them), with ``index.txt`` holding the logged lines. The folder is replaced as a whole, so it
  never mixes two runs. Without ``--output_dir`` only the log is written.

No model, tokenizer or VAE is loaded; latents are never cached in this mode.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.config.settings import flag_values

logger = logging.getLogger(__name__)

DEBUG_DIR_NAME = "debug_dataset"


@dataclass
class DebugItem:
    """One sample of one shown batch (sizes are ``(h, w)`` as in the batch dict, crop ``(top, left)``)."""

    step: int  # 1-based optimizer step
    batch: int  # 1-based position in the epoch plan
    image_key: str
    caption: str
    is_reg: bool
    loss_weight: float
    network_multiplier: float
    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]
    flipped: bool
    files: list[str] = field(default_factory=list)  # PNG names written for it

    def describe(self) -> str:
        kind = "reg " if self.is_reg else ""
        return (f"{self.image_key}: {kind}caption: {self.caption!r}, original size (h, w): {self.original_size_hw}, "
                f"bucket (h, w): {self.target_size_hw}, crop top left: {self.crop_top_left}, "
                f"flipped: {self.flipped}, loss weight: {self.loss_weight:g}, "
                f"network multiplier: {self.network_multiplier:g}")


@dataclass
class DebugReport:
    """What :func:`run_debug_dataset` showed."""

    seed: int
    batches_per_epoch: int
    steps_per_epoch: int
    items: list[DebugItem] = field(default_factory=list)
    folder: Path | None = None  # where the PNG files are, if written


def debug_requested(args: Any) -> bool:
    """``--debug_dataset``, or ``debug_dataset = true`` in the ``[general]`` table of ``--dataset_config``."""
    flags = flag_values(args)
    if flags["debug_dataset"]:
        return True
    if not flags["dataset_config"]:
        return False
    from library.config.dataset_config import build_blueprint_for_args
    from library.errors import SdtkError

    try:
        blueprint = build_blueprint_for_args(vars(args))
    except SdtkError:
        return False  # the normal path reports the problem, in its usual place
    return any(d.debug_dataset for d in blueprint.datasets)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``uint8 [H, W, 3]``."""
    return ((image.float().clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _write_png(folder: Path, name: str, array: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(array).save(folder / name, format="PNG")
    return name


def _save_images(folder: Path, item: DebugItem, index: int, sample: dict[str, Any]) -> None:
    stem = Path(item.image_key).stem
    base = f"{item.step:05d}_{index}_{stem}" + ("_flip" if item.flipped else "")
    if sample["image"] is not None:
        item.files.append(_write_png(folder, base + ".png", _to_uint8(sample["image"])))
    if sample["alpha_mask"] is not None:
        mask = (sample["alpha_mask"].float().clamp(0, 1) * 255).round().byte().numpy()
        item.files.append(_write_png(folder, base + "_mask.png", mask))
    if sample["conditioning_image"] is not None:
        item.files.append(_write_png(folder, base + "_cond.png", _to_uint8(sample["conditioning_image"])))


def _show(group: Any, plan: Any, limit: int, folder: Path | None, report: DebugReport) -> list[str]:
    lines: list[str] = []

    def log(line: str) -> None:
        logger.info("%s", line)
        lines.append(line)

    log(f"debug_dataset: seed {report.seed}, {group.num_train_images} train images and {group.num_reg_images} "
        f"reg images with repeats, {report.batches_per_epoch} batches = {report.steps_per_epoch} steps per epoch; "
        f"showing {limit} batches of epoch 1")
    for pos, _, keys in plan.slices(1, 0):
        if pos >= limit:
            break
        step = keys[0].step + 1
        log(f"step {step} (batch {pos + 1}/{report.batches_per_epoch}, {len(keys)} images)")
        for j, key in enumerate(keys):
            sample = group[key]
            item = DebugItem(step, pos + 1, str(sample["image_key"]), sample["caption"], bool(sample["is_reg"]),
                             float(sample["loss_weight"]), float(sample["network_multiplier"]),
                             tuple(sample["original_size_hw"]), tuple(sample["crop_top_left"]),
                             tuple(sample["target_size_hw"]), bool(sample["flipped"]))
            if folder is not None:
                _save_images(folder, item, j, sample)
            report.items.append(item)
            dataset, local = group.locate(key.index)
            attrs = dataset.samples[local].subset.custom_attributes
            log("  " + item.describe() + (f", custom attributes: {attrs}" if attrs else "")
                + (f" -> {', '.join(item.files)}" if item.files else ""))
    return lines


def run_debug_dataset(trainer: Any) -> DebugReport:
    """Build ``trainer``'s datasets and show the batches of the first epoch (see the module doc).

    Args:
        trainer: a :class:`~library.training.trainer.NetworkTrainer` (its ``args`` and its
            ``build_dataset_group`` hook are used, so family checks such as SDXL's bucket steps apply).

    Returns:
        What was shown, with the PNG folder when ``--output_dir`` is set (empty on processes
        other than the first when launched on several).
    """
    from library.training.data import ShardedPlan
    from library.utils.atomic import atomic_dir

    a = trainer.args
    seed = a.seed if a.seed is not None else random.randint(0, 2**32 - 1)
    if int(os.environ.get("RANK", "0")) != 0:  # launched on several processes: one shows it, once
        return DebugReport(seed, 0, 0)
    group = trainer.build_dataset_group(seed, 1)
    plan = ShardedPlan(group, 0, 1, a.gradient_accumulation_steps)
    max_steps = a.max_train_epochs * plan.steps_per_epoch if a.max_train_epochs else a.max_train_steps
    group.set_max_train_steps(max_steps)  # fractional token_warmup_step, as in training
    limit = min(plan.batches_per_epoch, max_steps * plan.grad_accum)
    report = DebugReport(seed, plan.batches_per_epoch, plan.steps_per_epoch)
    if not a.output_dir:
        _show(group, plan, limit, None, report)
        logger.info("debug_dataset: give --output_dir to also get the processed images as PNG files")
        return report
    target = Path(a.output_dir) / DEBUG_DIR_NAME
    with atomic_dir(target) as tmp:
        lines = _show(group, plan, limit, tmp, report)
        (tmp / "index.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report.folder = target
    logger.info("debug_dataset: %d images written to %s (index.txt lists them)", len(report.items), target)
    return report
