"""Model families sdtk knows (SD1.x, SD2.x, SDXL), one module each, behind one interface.

``Family`` (see :mod:`.base`) works like the enum it replaced — ``Family.SD1``, ``Family("sdxl")``,
``family.value``, ``family.pretty``, ``for f in Family`` — and is open: a module that subclasses it
and calls :func:`register` adds a family without editing anything here.
"""

from __future__ import annotations

from library.models.families.base import (
    Conditioning,
    Family,
    FamilyAdapter,
    FamilyFacts,
    TinyTextEncoder,
    detection_order,
    families,
    get,
    register,
    unregister,
)
from library.models.families import sd1, sd2, sdxl  # noqa: F401,E402  (register the built-in families)

# Hub ids of the tokenizers, as kohya uses them (also the folder names in --tokenizer_cache_dir,
# with "/" replaced by "_"): ``TOKENIZER_IDS[Family.SD1]``.
TOKENIZER_IDS = FamilyFacts("tokenizer_ids")

__all__ = ["Conditioning", "Family", "FamilyAdapter", "FamilyFacts", "TOKENIZER_IDS", "TinyTextEncoder",
           "detection_order", "families", "get", "register", "unregister"]
