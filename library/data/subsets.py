"""Finding the images, captions and conditioning images of one subset (kohya's three kinds).

A scan never raises for problems in the data: it records them (:class:`SubsetScan`), so the
dataset doctor can report every one of them at once. Training calls :meth:`SubsetScan.raise_errors`.

* **DreamBooth**: every image in ``image_dir``; the caption is ``<stem><caption_extension>``
  (also kohya's face-crop form ``name_cx_cy_w_h.png`` -> ``name<ext>``); with the default
  ``.caption`` extension, ``<stem>.txt`` is used when no ``.caption`` file exists (many datasets use
  ``.txt``); otherwise the subset's ``class_tokens``.
* **Fine-tuning**: the metadata JSON ``{image_key: {"caption", "tags", "image_size", "train_resolution"}}``
  or JSON lines (``.jsonl``: one ``{"image_path", "caption", "tags", "image_size"}`` per line);
  ``image_key`` is a path, or a file name / stem inside ``image_dir``. ``image_size`` is the
  image's own ``[w, h]`` (SDXL's original size; the file is not opened for it);
  ``train_resolution`` (written by ``finetune/prepare_buckets_latents.py``) is its bucket.
* **ControlNet**: like DreamBooth (no class tokens, no reg), plus a conditioning image with the
  same stem in ``conditioning_data_dir``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from library.config.dataset_params import SubsetParams
from library.data.captions import read_caption_file
from library.data.images import IMAGE_EXTENSIONS, face_box_from_name, is_image_file
from library.data.info_cache import InfoCache
from library.errors import DatasetError

logger = logging.getLogger(__name__)

Reso = tuple[int, int]
DEFAULT_CAPTION_EXTENSION = ".caption"


@dataclass
class ImageEntry:
    """One image of a subset.

    Attributes:
        key: unique key (the image path for DreamBooth/ControlNet, the JSON key for fine-tuning).
        path: the image file.
        caption: the caption as stored (may hold several lines for wildcards).
        caption_path: the caption file used, if any.
        is_reg: a regularization image.
        num_repeats: times the image is seen per epoch (after reg balancing).
        size: the image's ``(w, h)`` when known without opening the file (metadata ``image_size``).
        cond_path: the ControlNet conditioning image.
        bucket: the bucket ``(w, h)`` fixed by the metadata (``train_resolution``), if any.
    """

    key: str
    path: Path
    caption: str
    caption_path: Path | None = None
    is_reg: bool = False
    num_repeats: int = 1
    size: Reso | None = None
    cond_path: Path | None = None
    bucket: Reso | None = None


@dataclass
class SubsetScan:
    """What was found for one subset, and what is wrong with it."""

    subset: SubsetParams
    entries: list[ImageEntry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)  # images with no caption file
    orphan_captions: list[Path] = field(default_factory=list)  # caption files with no image
    missing_conditioning: list[Path] = field(default_factory=list)  # images with no conditioning image
    orphan_conditioning: list[Path] = field(default_factory=list)  # conditioning images with no image
    missing_images: list[str] = field(default_factory=list)  # fine-tuning keys with no image file
    info_cache: InfoCache | None = None  # cache_info: the folder's metadata_cache.json

    @property
    def where(self) -> str:
        s = self.subset
        return s.metadata_file if s.kind == "finetune" else str(s.image_dir)

    def raise_errors(self) -> None:
        """Raise one :class:`DatasetError` listing every error of this subset."""
        if self.errors:
            raise DatasetError("\n".join(self.errors) if len(self.errors) == 1 else
                               f"{len(self.errors)} problems in subset {self.where}:\n" +
                               "\n".join(f"  - {e}" for e in self.errors))


def glob_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive, like kohya), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _list(paths: list, limit: int = 10) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def _caption_extensions(subset: SubsetParams) -> list[str]:
    ext = subset.caption_extension or DEFAULT_CAPTION_EXTENSION
    ext = ext if ext.startswith(".") else "." + ext
    return [ext, ".txt"] if ext == DEFAULT_CAPTION_EXTENSION else [ext]


def _caption_candidates(image: Path, extensions: list[str]) -> list[Path]:
    stems = [image.with_suffix("").name]
    if face_box_from_name(image) is not None:  # kohya: name_cx_cy_w_h.png may use name.caption
        stems.append("_".join(stems[0].split("_")[:-4]))
    return [image.parent / (stem + ext) for ext in extensions for stem in stems]


def _read_folder(scan: SubsetScan, folder_option: str) -> list[Path]:
    folder = getattr(scan.subset, folder_option)
    if not folder:
        scan.errors.append(f"{folder_option} is not set for this subset")
        return []
    d = Path(folder)
    if not d.is_dir():
        scan.errors.append(f"{folder_option} {d} does not exist or is not a folder")
        return []
    images = glob_images(d)
    if not images:
        scan.errors.append(f"{folder_option} {d} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return images


def _attach_captions(scan: SubsetScan, images: list[Path], use_class_tokens: bool) -> None:
    subset = scan.subset
    extensions = _caption_extensions(subset)
    used: set[Path] = set()
    if subset.cache_info and subset.image_dir and Path(subset.image_dir).is_dir():
        scan.info_cache = InfoCache.load(subset.image_dir)
    for img in images:
        caption, cap_path = None, None
        for cand in _caption_candidates(img, extensions):
            if cand.is_file():
                cap_path = cand
                try:
                    cached = scan.info_cache.caption(img, cand) if scan.info_cache is not None else None
                    caption = cached if cached is not None else read_caption_file(cand)
                    if not caption:  # kohya refuses empty caption files too
                        scan.errors.append(f"caption file {cand} is empty; write a caption or delete the file")
                except DatasetError as e:
                    scan.errors.append(str(e))
                used.add(cand)
                break
        if cap_path is None:
            scan.missing_captions.append(img)
            caption = (subset.class_tokens or "") if use_class_tokens else ""
        scan.entries.append(ImageEntry(str(img), img, caption or "", cap_path, bool(subset.is_reg) and use_class_tokens,
                                       subset.num_repeats))
    if cap_path_ext := [e for e in extensions[1:] if any(p.suffix == e for p in used)]:
        logger.info("%s: no %s file for some images, used %s captions", subset.image_dir, extensions[0], cap_path_ext[0])
    if scan.missing_captions:
        how = f"class tokens {subset.class_tokens!r}" if use_class_tokens and subset.class_tokens else "an empty caption"
        scan.warnings.append(f"{len(scan.missing_captions)} images have no caption file ({extensions[0]}) and use {how}: "
                             + _list(scan.missing_captions, 5))
    folder = Path(subset.image_dir or "")
    if not subset.image_dir or not folder.is_dir():
        return
    stems = {p.with_suffix("").name for p in images}
    for cap in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in extensions):
        if cap not in used and cap.with_suffix("").name not in stems:
            scan.orphan_captions.append(cap)
    if scan.orphan_captions:
        scan.warnings.append(f"{len(scan.orphan_captions)} caption files have no image: " + _list(scan.orphan_captions, 5))


def scan_dreambooth(subset: SubsetParams) -> SubsetScan:
    """Images and captions of a DreamBooth subset (``is_reg`` and ``class_tokens`` apply)."""
    scan = SubsetScan(subset)
    _attach_captions(scan, _read_folder(scan, "image_dir"), use_class_tokens=True)
    return scan


def scan_controlnet(subset: SubsetParams) -> SubsetScan:
    """A ControlNet subset: DreamBooth-style images/captions paired by stem with conditioning images."""
    scan = SubsetScan(subset)
    images = _read_folder(scan, "image_dir")
    _attach_captions(scan, images, use_class_tokens=False)
    conds = _read_folder(scan, "conditioning_data_dir")
    by_stem = {p.with_suffix("").name: p for p in conds}
    paired: set[str] = set()
    for entry in scan.entries:
        stem = entry.path.with_suffix("").name
        if stem in by_stem:
            entry.cond_path = by_stem[stem]
            paired.add(stem)
        else:
            scan.missing_conditioning.append(entry.path)
    scan.orphan_conditioning = [p for s, p in sorted(by_stem.items()) if s not in paired]
    if scan.missing_conditioning and conds:
        scan.errors.append(f"{len(scan.missing_conditioning)} images have no conditioning image with the same stem in "
                           f"{subset.conditioning_data_dir}: " + _list(scan.missing_conditioning))
    if scan.orphan_conditioning:
        scan.warnings.append(f"{len(scan.orphan_conditioning)} conditioning images have no training image: "
                             + _list(scan.orphan_conditioning, 5))
    return scan


def _find_finetune_image(key: str, image_dir: Path | None) -> Path | None:
    p = Path(key)
    if p.is_file():
        return p
    if image_dir is None:
        return None
    if (image_dir / key).is_file() and is_image_file(image_dir / key):
        return image_dir / key
    for ext in IMAGE_EXTENSIONS:
        for cand in (image_dir / (key + ext), image_dir / (key + ext.upper())):
            if cand.is_file():
                return cand
    return None


def _finetune_caption(md: dict, subset: SubsetParams) -> str:
    caption, tags = md.get("caption"), md.get("tags")
    if caption is None:  # kohya: tags alone are the caption
        caption, tags = tags, None
    if subset.enable_wildcard and tags:
        tags = tags.replace("\n", subset.caption_separator)
        if caption is not None:
            caption = "\n".join(f"{line}{subset.caption_separator}{tags}" for line in caption.split("\n") if line.strip())
    elif tags:
        caption = (caption or "") + subset.caption_separator + tags
    return caption or ""


def _pair(value: object) -> Reso | None:
    """``[w, h]`` of positive integers, else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def read_finetune_metadata(meta_path: Path) -> tuple[dict[str, dict], list[str]]:
    """``{image_key: entry}`` from a metadata ``.json`` or ``.jsonl`` file, and what is wrong in it
    (each problem names the file and the entry or line)."""
    errors: list[str] = []
    try:
        text = meta_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return {}, [f"metadata_file {meta_path} cannot be read as UTF-8 text: {e}"]
    metadata: dict[str, dict] = {}
    if meta_path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                md = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"metadata_file {meta_path} line {n} is not valid UTF-8 JSON: {e}")
                continue
            if not isinstance(md, dict) or not isinstance(md.get("image_path"), str):
                errors.append(f'metadata_file {meta_path} line {n} has no "image_path" (one JSON object per line: '
                              '{"image_path": "...", "caption": "...", "image_size": [w, h]})')
                continue
            metadata[md["image_path"]] = {k: v for k, v in md.items() if k != "image_path"}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return {}, [f"metadata_file {meta_path} is not valid UTF-8 JSON: {e}"]
        if not isinstance(data, dict):
            return {}, [f"metadata_file {meta_path} must map each image key to an object "
                        '({"img.png": {"caption": "...", "tags": "..."}})']
        for key, md in data.items():
            if not isinstance(md, dict):
                errors.append(f"metadata_file {meta_path}: entry {key!r} is not an object "
                              '({"caption": "...", "tags": "..."})')
            else:
                metadata[key] = md
    for key, md in metadata.items():
        for field in ("image_size", "train_resolution"):
            if md.get(field) is not None and _pair(md[field]) is None:
                errors.append(f"metadata_file {meta_path}: entry {key!r} has {field} {md[field]!r}; "
                              "it must be [width, height] in pixels")
        for field in ("caption", "tags"):
            if md.get(field) is not None and not isinstance(md[field], str):
                errors.append(f"metadata_file {meta_path}: entry {key!r} has a {field} that is not text")
    return metadata, errors


def scan_finetune(subset: SubsetParams) -> SubsetScan:
    """A fine-tuning subset from its metadata JSON / JSONL; images it names that are missing are errors."""
    scan = SubsetScan(subset)
    meta_path = Path(subset.metadata_file or "")
    if not subset.metadata_file or not meta_path.is_file():
        scan.errors.append(f"metadata_file {subset.metadata_file} does not exist; create it with "
                           "tools/merge_captions_to_metadata.py or fix the path")
        return scan
    metadata, errors = read_finetune_metadata(meta_path)
    scan.errors += errors
    if errors:
        return scan
    if not metadata:
        scan.errors.append(f"metadata_file {meta_path} lists no images")
    image_dir = Path(subset.image_dir) if subset.image_dir else None
    for key, md in metadata.items():
        path = _find_finetune_image(key, image_dir)
        if path is None:
            scan.missing_images.append(key)
            continue
        scan.entries.append(ImageEntry(key, path, _finetune_caption(md, subset), None, False, subset.num_repeats,
                                       _pair(md.get("image_size")), bucket=_pair(md.get("train_resolution"))))
    if scan.missing_images:
        scan.errors.append(f"{meta_path} names {len(scan.missing_images)} images that do not exist"
                           f"{' in ' + str(image_dir) if image_dir else ''}: " + _list(scan.missing_images))
    return scan


def scan_subset(subset: SubsetParams) -> SubsetScan:
    """Scan one subset of any kind; repeats below 1 are an error (kohya silently drops the subset)."""
    scanner = {"dreambooth": scan_dreambooth, "finetune": scan_finetune, "controlnet": scan_controlnet}[subset.kind]
    scan = scanner(subset)
    if not isinstance(subset.num_repeats, int) or subset.num_repeats < 1:
        scan.errors.insert(0, f"num_repeats is {subset.num_repeats} for subset {scan.where}; it must be 1 or more")
    return scan


def balance_reg_repeats(num_train_images: int, reg_entries: list[ImageEntry]) -> list[ImageEntry]:
    """kohya's regularization balancing: reg images are used until they match the train images.

    First every reg image is taken once with its own repeats, in order, until the total reaches
    ``num_train_images`` (repeats included); if they fall short, reg images get one extra repeat
    each, round-robin, until the totals match. Reg images never reached are not used.

    Returns:
        The reg entries that are used, with ``num_repeats`` updated (copies; inputs unchanged).
    """
    used: list[ImageEntry] = []
    if not reg_entries:
        return used
    n = 0
    first = True
    while n < num_train_images:
        for i, entry in enumerate(reg_entries):
            if first:
                used.append(ImageEntry(**{**entry.__dict__}))
                n += entry.num_repeats
            else:
                used[i].num_repeats += 1
                n += 1
            if n >= num_train_images:
                break
        first = False
    return used
