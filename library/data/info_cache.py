"""``cache_info``: image sizes and captions of a DreamBooth/ControlNet folder kept in one file.

kohya writes ``metadata_cache.json`` into the subset's ``image_dir``, shaped
``{image path: {"caption": str, "resolution": [w, h]}}``, and on later runs trusts it blindly
(it does not even list the folder again). sdtk keeps kohya's file name and keys, so either tool
reads the other's file, and adds what it needs to trust an entry:

* ``image_stat`` / ``caption_stat``: ``[size in bytes, mtime in ns]`` of the image and of the
  caption file when the entry was written; ``caption_file``: the caption file used (None when
  the caption came from ``class_tokens``).

An entry is used only while those stats still match, so an edited image or caption file is read
again; the folder is always listed, so added and removed images are noticed. An entry without
stats (written by kohya) is re-read once. A file that is not valid JSON of this shape is ignored
with a warning and rewritten. The file is rewritten (atomically) only when its content changes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import ModelSaveError
from library.utils.atomic import write_json

logger = logging.getLogger(__name__)

INFO_CACHE_FILE = "metadata_cache.json"  # kohya's name (IMAGE_INFO_CACHE_FILE)

Reso = tuple[int, int]
Stat = list[int]  # [size in bytes, mtime in ns]


def file_stat(path: Path) -> Stat | None:
    """``[size, mtime_ns]`` of ``path``, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _resolution(value: Any) -> Reso | None:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _stat(value: Any) -> Stat | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    return None


@dataclass
class InfoCache:
    """The ``metadata_cache.json`` of one folder, as loaded (entries are checked when used).

    Attributes:
        folder: the subset's ``image_dir``.
        raw: the file's content (``{}`` when absent or unusable).
    """

    folder: Path
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / INFO_CACHE_FILE

    @classmethod
    def load(cls, folder: str | Path) -> InfoCache:
        """Read ``folder``'s cache file; a missing one is empty, a broken one is ignored with a warning."""
        cache = cls(Path(folder))
        try:
            text = cache.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cache
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("cache_info: cannot read %s (%s); it is ignored and will be rewritten", cache.path, e)
            return cache
        try:
            data = json.loads(text)
        except ValueError as e:
            logger.warning("cache_info: %s is not valid JSON (%s); it is ignored and will be rewritten", cache.path, e)
            return cache
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in data.items()):
            logger.warning("cache_info: %s is not a kohya metadata cache ({image path: {caption, resolution}}); "
                           "it is ignored and will be rewritten", cache.path)
            return cache
        cache.raw = data
        return cache

    def _entry(self, image: Path) -> dict[str, Any] | None:
        """The entry of ``image`` when the image file is unchanged since it was written."""
        entry = self.raw.get(str(image))
        if entry is None:
            return None
        stat = _stat(entry.get("image_stat"))
        return entry if stat is not None and stat == file_stat(image) else None

    def caption(self, image: Path, caption_path: Path | None) -> str | None:
        """The cached caption of ``image`` read from ``caption_path``, or None (read the file).

        Only non-empty captions from an unchanged caption file are returned: an empty file must
        reach the scan's error again, and ``class_tokens`` captions are not cached (they may change).
        """
        entry = self.raw.get(str(image))  # an edited image does not change its caption file
        if entry is None or caption_path is None or entry.get("caption_file") != str(caption_path):
            return None
        stat = _stat(entry.get("caption_stat"))
        caption = entry.get("caption")
        if stat is None or stat != file_stat(caption_path) or not isinstance(caption, str) or not caption:
            return None
        return caption

    def size(self, image: Path) -> Reso | None:
        """``(w, h)`` of ``image`` when its file is unchanged since it was cached, else None."""
        entry = self._entry(image)
        return None if entry is None else _resolution(entry.get("resolution"))

    def save(self, items: list[tuple[Path, str, Path | None, Reso]]) -> bool:
        """Write ``(image, caption, caption file, (w, h))`` for every image of the folder, if changed.

        Returns:
            Whether the file was (re)written.
        """
        data: dict[str, dict[str, Any]] = {}
        for image, caption, caption_path, size in items:
            stat = file_stat(image)
            if stat is None:
                continue
            data[str(image)] = {
                "caption": caption, "resolution": [int(size[0]), int(size[1])], "image_stat": stat,
                "caption_file": None if caption_path is None else str(caption_path),
                "caption_stat": None if caption_path is None else file_stat(caption_path),
            }
        if data == self.raw:
            return False
        try:
            write_json(self.path, data)
        except (OSError, ModelSaveError) as e:  # a read-only dataset folder must not stop training
            logger.warning("cache_info: cannot write %s (%s); image sizes will be read again next time", self.path, e)
            return False
        self.raw = data
        logger.info("cache_info: wrote %s (%d images)", self.path, len(data))
        return True
