"""Flags of the full-model trainers (``train_db.py``, ``fine_tune.py``, ``sdxl_train.py``): saving a
whole model and training its text encoders."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, in_group, unsupported
from library.config.flags.scripts import FULL_TRAINERS

FLAGS = in_group("full model", [
    F("--save_model_as", str, None, DONE,
      "Format of the saved model: ckpt or safetensors (one file in the original layout, which "
      "A1111, ComfyUI and diffusers' from_single_file load), diffusers or diffusers_safetensors "
      "(a diffusers folder). Default: the layout of the source model.",
      choices=[None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"], scripts=FULL_TRAINERS),
    F("--use_safetensors", bool, False, DONE,
      "Without --save_model_as: write safetensors (.safetensors file, or safetensors weights in "
      "a diffusers folder) instead of .ckpt / .bin.", scripts=FULL_TRAINERS),
    F("--learning_rate_te", float, None, DONE,
      "Learning rate of the text encoder (default: --learning_rate).", scripts=("train_db", "fine_tune")),
    F("--train_text_encoder", bool, False, DONE, "Train the text encoder(s) too (default: only the UNet).",
      scripts=("fine_tune",)),
    F("--diffusers_xformers", bool, False, unsupported("use --xformers (the same kernels)"),
      "Use xformers through diffusers.", scripts=("fine_tune",)),
    F("--stop_text_encoder_training", int, None, DONE,
      "Stop training the text encoder after N steps (it is frozen and leaves the optimizer); "
      "-1: never train it. Default: train it for the whole run.", check=at_least(-1), scripts=("train_db",)),
    F("--no_token_padding", bool, False, DONE,
      "Do not pad captions to 77 tokens: the text conditioning is as long as the longest caption "
      "of the batch (diffusers' original DreamBooth).", scripts=("train_db",)),
])
