"""Build or update a fine-tuning metadata JSON from tag files (kohya's finetune tool of the same name).

    python tools/merge_dd_tags_to_metadata.py train_images meta_cap_dd.json --in_json meta_cap.json

Like ``merge_captions_to_metadata.py``, but each ``<stem><caption_extension>`` (default ``.txt``,
as written by taggers) becomes the image's ``"tags"``. At training time a fine-tuning caption is
``caption + caption_separator + tags``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.merge_captions_to_metadata import build_parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run(build_parser("tags", ".txt", __doc__).parse_args(argv), "tags")


if __name__ == "__main__":
    sys.exit(main())
