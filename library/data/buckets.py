"""Aspect-ratio bucketing, bit-for-bit compatible with kohya sd-scripts.

Users compare bucket logs between tools, so the bucket set and each image's bucket follow
kohya's formulas exactly (``model_util.make_bucket_resolutions`` and ``train_util.BucketManager``):

* **Predefined buckets** (``enable_bucket`` without ``bucket_no_upscale``): widths run from
  ``min_size`` to ``max_size`` in ``divisible`` steps; each width gets the tallest height (a
  multiple of ``divisible``, at most ``max_size``) whose area fits the area of ``max_reso``;
  plus the largest square. An image goes to the bucket with the nearest aspect ratio and is
  scaled (up or down) to *cover* it, then center-cropped (or randomly cropped) to it.
* **No upscale** (``bucket_no_upscale``): images larger than the ``max_reso`` area are scaled
  down keeping their aspect ratio (so one side lands on a multiple of ``reso_steps``); smaller
  images keep their size. The bucket is the resized size rounded *down* to ``reso_steps``.
* **No bucketing**: one bucket, the dataset ``resolution``; images are scaled to cover it and
  cropped (:func:`fixed_resolution_manager`).

Sizes are ``(width, height)`` tuples in pixels throughout.
"""

from __future__ import annotations

import logging
import math
import random

from library.errors import DatasetError

logger = logging.getLogger(__name__)

Reso = tuple[int, int]


def make_bucket_resolutions(max_reso: Reso, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list[Reso]:
    """The predefined bucket resolutions for a maximum resolution (kohya's formula).

    Args:
        max_reso: ``(width, height)`` whose area bounds every bucket's area.
        min_size: smallest bucket side in pixels.
        max_size: largest bucket side in pixels.
        divisible: every side is a multiple of this (``bucket_reso_steps``).

    Returns:
        Sorted list of unique ``(width, height)`` buckets.
    """
    max_area = max_reso[0] * max_reso[1]
    resos: set[Reso] = set()
    # the largest square bucket that fits the area
    square = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((square, square))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_min_max_bucket_reso(min_bucket_reso: int, max_bucket_reso: int, reso_steps: int) -> tuple[int, int]:
    """Round ``min_bucket_reso`` down and ``max_bucket_reso`` up to multiples of ``reso_steps``.

    kohya does this silently (with a warning) when the dataset is built; doing the same keeps
    existing configs running and the bucket set identical.
    """
    new_min = min_bucket_reso - min_bucket_reso % reso_steps
    new_max = max_bucket_reso if max_bucket_reso % reso_steps == 0 else max_bucket_reso + reso_steps - max_bucket_reso % reso_steps
    if new_min != min_bucket_reso:
        logger.warning("min_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d", min_bucket_reso, reso_steps, new_min)
    if new_max != max_bucket_reso:
        logger.warning("max_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d", max_bucket_reso, reso_steps, new_max)
    return new_min, new_max


class BucketManager:
    """Chooses each image's bucket and resized size (kohya's ``BucketManager`` semantics).

    Args:
        no_upscale: ``bucket_no_upscale``: buckets follow the image sizes, never upscaling.
        max_reso: the dataset ``resolution`` ``(width, height)``; its area bounds the buckets.
        min_size: ``min_bucket_reso`` (unused with ``no_upscale``).
        max_size: ``max_bucket_reso`` (unused with ``no_upscale``).
        reso_steps: ``bucket_reso_steps``.
    """

    def __init__(self, no_upscale: bool, max_reso: Reso | None, min_size: int | None, max_size: int | None,
                 reso_steps: int | None) -> None:
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = None if max_reso is None else max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        self.predefined_resos: list[Reso] = []
        self._predefined_set: set[Reso] = set()
        self._predefined_ars: list[float] = []
        # buckets in the order images first selected them (kohya's ``resos``); see sort()
        self.resos: list[Reso] = []

    def make_buckets(self) -> None:
        """Compute the predefined buckets (the ``enable_bucket`` path without ``no_upscale``)."""
        assert self.max_reso is not None and self.min_size is not None and self.max_size is not None
        assert self.reso_steps is not None
        self.set_predefined_resos(make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps))

    def set_predefined_resos(self, resos: list[Reso]) -> None:
        """Use exactly these buckets (the fixed-resolution path passes one)."""
        self.predefined_resos = list(resos)
        self._predefined_set = set(resos)
        self._predefined_ars = [w / h for w, h in resos]

    def _round_to_steps(self, x: float) -> int:
        assert self.reso_steps is not None
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width: int, image_height: int) -> tuple[Reso, Reso, float]:
        """Choose the bucket for an image.

        Returns:
            ``(bucket_reso, resized_size, ar_error)``: the bucket ``(w, h)``; the size the image
            is resized to before cropping to the bucket (each side >= the bucket's); and the
            bucket's aspect ratio minus the image's.
        """
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self._predefined_set:
                # nearest aspect ratio; ties go to the first (smallest) bucket, as numpy argmin
                errors = [abs(ar - aspect_ratio) for ar in self._predefined_ars]
                reso = self.predefined_resos[errors.index(min(errors))]
            # scale so the image covers the bucket: match the side that would otherwise fall short
            if aspect_ratio > reso[0] / reso[1]:
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width
            resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            resized = self._no_upscale_size(image_width, image_height, aspect_ratio)
            assert self.reso_steps is not None
            # bucket = resized size rounded down: crop a few pixels rather than pad
            reso = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
            if min(reso) == 0:
                # kohya divides by zero here; say what is wrong instead
                raise DatasetError(
                    f"a {image_width}x{image_height} image has a side shorter than bucket_reso_steps "
                    f"({self.reso_steps}); with bucket_no_upscale it fits no bucket. Remove or upscale it, "
                    "or turn off bucket_no_upscale")
        if reso not in self.resos:
            self.resos.append(reso)
        return reso, resized, reso[0] / reso[1] - aspect_ratio

    def _no_upscale_size(self, image_width: int, image_height: int, aspect_ratio: float) -> Reso:
        if self.max_area is None or image_width * image_height <= self.max_area:
            return (image_width, image_height)
        # too large: shrink to the maximum area, then put the width or the height on a multiple
        # of reso_steps, whichever keeps the aspect ratio closer
        resized_width = math.sqrt(self.max_area * aspect_ratio)
        resized_height = self.max_area / resized_width
        w_rounded = self._round_to_steps(resized_width)
        h_in_wr = self._round_to_steps(w_rounded / aspect_ratio)
        ar_w_rounded = w_rounded / h_in_wr
        h_rounded = self._round_to_steps(resized_height)
        w_in_hr = self._round_to_steps(h_rounded * aspect_ratio)
        ar_h_rounded = w_in_hr / h_rounded
        if abs(ar_w_rounded - aspect_ratio) < abs(ar_h_rounded - aspect_ratio):
            return (w_rounded, int(w_rounded / aspect_ratio + 0.5))
        return (int(h_rounded * aspect_ratio + 0.5), h_rounded)

    def sort(self) -> None:
        """Sort the used buckets by resolution (kohya numbers buckets in this order in its log)."""
        self.resos.sort()


def fixed_resolution_manager(resolution: Reso) -> BucketManager:
    """The ``enable_bucket = false`` path: one bucket, ``resolution``; images cover it and are cropped."""
    manager = BucketManager(False, resolution, None, None, None)
    manager.set_predefined_resos([resolution])
    return manager


def crop_offsets(bucket_reso: Reso, resized_size: Reso, random_crop: bool, rng: random.Random | None = None) -> Reso:
    """Top-left corner ``(left, top)`` of the bucket-sized crop of the resized image.

    Centered (``trim // 2``) unless ``random_crop``; then uniform in ``[0, trim]``, drawing the
    horizontal offset before the vertical one as kohya does.
    """
    offsets = []
    for resized, bucket in zip(resized_size, bucket_reso):
        trim = resized - bucket
        if trim <= 0:
            offsets.append(0)
        elif random_crop:
            offsets.append((rng or random).randint(0, trim))
        else:
            offsets.append(trim // 2)
    return offsets[0], offsets[1]


def crop_ltrb(bucket_reso: Reso, image_size: Reso) -> tuple[float, float, float, float]:
    """kohya's SDXL ``crop_ltrb`` for a bucket and an original image size (``get_crop_ltrb``).

    Follows Stability AI's preprocessing: the image, scaled to *fit* the bucket, is centered in
    it; left/top are the (floored) margins. Values may be floats, as in kohya.
    """
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_w, resized_h = bucket_reso[0], bucket_reso[0] / image_ar
    left = (bucket_reso[0] - resized_w) // 2
    top = (bucket_reso[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def format_histogram(counts: dict[Reso, int], width: int = 40) -> str:
    """A text bucket histogram for the start-up log and the dataset doctor.

    Args:
        counts: images per bucket ``(w, h)`` (kohya counts repeats too).
        width: length of the longest bar in characters.

    Returns:
        One line per bucket, sorted by resolution and numbered like kohya's log
        (``bucket 0: resolution (320, 768), count: 4``), each with a bar and aspect ratio,
        then a total line.
    """
    if not counts:
        return "no buckets (no images)"
    most = max(counts.values())
    total = sum(counts.values())
    lines = []
    for i, reso in enumerate(sorted(counts)):
        n = counts[reso]
        bar = "#" * max(1 if n else 0, round(width * n / most)) if most else ""
        lines.append(f"bucket {i:>3}: resolution ({reso[0]:>4}, {reso[1]:>4}), ar {reso[0] / reso[1]:5.2f}, "
                     f"count: {n:>6}  {bar}")
    lines.append(f"total: {total} in {len(counts)} bucket{'s' if len(counts) != 1 else ''}")
    return "\n".join(lines)
