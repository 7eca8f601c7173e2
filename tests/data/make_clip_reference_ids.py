"""Regenerate ``clip_reference_ids.json``: token ids from the reference CLIP tokenizer implementation.

The reference is OpenCLIP's ``SimpleTokenizer`` (the tokenizer SD2 and SDXL's second text encoder were
trained with; OpenAI's CLIP tokenizer is the same algorithm and vocabulary). It is not a dependency of
sdtk or of its tests; to regenerate, unpack the ``open_clip_torch`` wheel and ``ftfy``/``regex`` into a
folder and run::

    python tests/data/make_clip_reference_ids.py --open_clip_site /tmp/oc/site > tests/data/clip_reference_ids.json

Ids are without the start/end tokens (49406, 49407), exactly as ``SimpleTokenizer.encode`` returns them.
"""

import argparse
import importlib.util
import json
import sys

PROMPTS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "(masterpiece:1.2), [low quality], (sks dog:0.8) on a beach",
    "((best quality)), {detailed}, (red:1.5) hair, [[blurry]]",
    "café crème brûlée, naïve façade",
    "東京の夜景, ネオン",
    "emoji 🐶🎉 party",
    "mobileclip",
    "it's a dog's life,   isn't it?",
    "A PHOTO of   the Eiffel Tower at 4k resolution!!!",
    "<lora:foo:0.7> BREAK hello",
    ", ".join(["a highly detailed photograph of a golden retriever puppy playing in autumn leaves"] * 6),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--open_clip_site", required=True, help="folder holding open_clip/, ftfy/ and regex/")
    a = p.parse_args()
    sys.path.insert(0, a.open_clip_site)
    spec = importlib.util.spec_from_file_location("oc_tokenizer", f"{a.open_clip_site}/open_clip/tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the tokenizer module alone: open_clip's package imports torchvision
    tok = mod.SimpleTokenizer()
    print(json.dumps({"source": "open_clip_torch 3.3.0 open_clip.tokenizer.SimpleTokenizer().encode",
                      "ids": {prompt: tok.encode(prompt) for prompt in PROMPTS}}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
