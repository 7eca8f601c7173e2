"""Model families sdtk knows, and the facts that differ between them."""

from __future__ import annotations

import enum


class Family(str, enum.Enum):
    """A Stable Diffusion model family. The value is the name users write (``--family sd1``)."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def pretty(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]

    @property
    def train_network_script(self) -> str:
        return "sdxl_train_network.py" if self is Family.SDXL else "train_network.py"


# Hub ids of the tokenizers, as kohya uses them (also the folder names in --tokenizer_cache_dir,
# with "/" replaced by "_").
TOKENIZER_IDS: dict[Family, list[tuple[str, str | None]]] = {
    Family.SD1: [("openai/clip-vit-large-patch14", None)],
    Family.SD2: [("stabilityai/stable-diffusion-2", "tokenizer")],
    Family.SDXL: [("openai/clip-vit-large-patch14", None), ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None)],
}
