"""Script names used by flag declarations.

``COVERED_SCRIPTS`` are the scripts whose flags sdtk declares itself; a declaration without an
explicit ``scripts=`` applies to each covered script in which kohya has the same flag. Every
other kohya script still gets all its kohya flags (typed, "not implemented yet") from
``kohya_flags.json``. Adding a script here makes the shared declarations apply to it: check
their statuses for that script first.
"""

from __future__ import annotations

NETWORK_TRAINERS = ("train_network", "sdxl_train_network")
FULL_TRAINERS = ("train_db", "fine_tune", "sdxl_train")  # full-model training (library/training/targets/full_trainer.py)
# textual inversion (library/training/targets/embedding_trainer.py)
EMBEDDING_TRAINERS = ("train_textual_inversion", "sdxl_train_textual_inversion", "train_textual_inversion_XTI")
SDXL_SCRIPTS = ("sdxl_train_network", "sdxl_train", "sdxl_train_textual_inversion")
COVERED_SCRIPTS = NETWORK_TRAINERS + FULL_TRAINERS + EMBEDDING_TRAINERS
