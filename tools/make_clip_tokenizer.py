"""Write the standard CLIP tokenizers into a kohya-style ``--tokenizer_cache_dir``, fully offline.

    python tools/make_clip_tokenizer.py --tokenizer_cache_dir tokenizers

The tokenizers are rebuilt from the CLIP BPE vocabulary bundled with sdtk, so SD1.x, SD2.x and SDXL
single-file models can be trained on machines that cannot reach a model hub. Folders written:
``openai_clip-vit-large-patch14`` (SD1.x, SDXL text encoder 1), ``stabilityai_stable-diffusion-2``
(SD2.x, pads with "!"), ``laion_CLIP-ViT-bigG-14-laion2B-39B-b160k`` (SDXL text encoder 2, pads with "!").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import SdtkError  # noqa: E402
from library.models.families import Family  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer_cache_dir", required=True, help="folder to write (kohya's layout)")
    p.add_argument("--family", choices=["all"] + [f.value for f in Family], default="all",
                   help="which families' tokenizers to write (default: all)")
    args = p.parse_args(argv)
    from library.models.tokenizers import write_builtin_tokenizers

    families = list(Family) if args.family == "all" else [Family(args.family)]
    try:
        written: set[Path] = set()
        for fam in families:
            written.update(write_builtin_tokenizers(fam, args.tokenizer_cache_dir))
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in sorted(written):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
