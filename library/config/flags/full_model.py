"""Flags of the full-model trainers (``train_db.py``, ``fine_tune.py``, ``sdxl_train.py``): saving a
whole model and training its text encoders."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, between, in_group, unsupported
from library.config.flags.scripts import FULL_TRAINERS

FLAGS = in_group("full model", [
    F("--save_model_as", str, None, DONE,
      "Format of the saved model: ckpt or safetensors (one file in the original layout, which "
      "A1111, ComfyUI and diffusers' from_single_file load), diffusers or diffusers_safetensors "
      "(a diffusers folder). Default: the layout of the source model.",
      choices=[None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"], scripts=FULL_TRAINERS),
    F("--ema", bool, False, DONE,
      "sdtk only: keep an exponential moving average of the trained weights (float32, one more copy); "
      "saves and samples use it, states resume it.", scripts=FULL_TRAINERS),
    F("--ema_decay", float, 0.9999, DONE,
      "sdtk only: decay of --ema per optimizer step (the average spans about 1 / (1 - decay) steps).",
      check=between(0, 1, hi_open=True), scripts=FULL_TRAINERS),
    F("--use_safetensors", bool, False, DONE,
      "Without --save_model_as: write safetensors (.safetensors file, or safetensors weights in "
      "a diffusers folder) instead of .ckpt / .bin.", scripts=FULL_TRAINERS),
    F("--learning_rate_te", float, None, DONE,
      "Learning rate of the text encoder (default: --learning_rate).", scripts=("train_db", "fine_tune")),
    F("--train_text_encoder", bool, False, DONE, "Train the text encoder(s) too (default: only the UNet).",
      scripts=("fine_tune", "sdxl_train")),
    F("--diffusers_xformers", bool, False, unsupported("use --xformers (the same kernels)"),
      "Use xformers through diffusers.", scripts=("fine_tune", "sdxl_train")),
    F("--learning_rate_te1", float, None, DONE,
      "SDXL: learning rate of text encoder 1 (CLIP ViT-L) with --train_text_encoder (default: "
      "--learning_rate; 0: not trained).", scripts=("sdxl_train",)),
    F("--learning_rate_te2", float, None, DONE,
      "SDXL: learning rate of text encoder 2 (OpenCLIP ViT-bigG) with --train_text_encoder (default: "
      "--learning_rate; 0: not trained).", scripts=("sdxl_train",)),
    F("--block_lr", str, None, DONE,
      "SDXL: 23 comma-separated learning rates for the UNet's blocks (time/label embedding, 9 input "
      "blocks, 3 middle, 9 output, out); 0 leaves a block untrained.", scripts=("sdxl_train",)),
    F("--fused_backward_pass", bool, False, DONE,
      "Apply the optimizer step inside the backward pass, so no full set of gradients is held "
      "(Adafactor, AdamW, Lion, SGDNesterov; not with gradient accumulation; kohya: sdxl_train only).",
      scripts=FULL_TRAINERS),
    F("--fused_optimizer_groups", int, None, DONE,
      "Split the trained parameters into about N optimizer groups, each stepped during the backward "
      "pass once its gradients are complete (about 1/N of the gradients held; same optimizers as "
      "--fused_backward_pass).", check=at_least(1), scripts=("sdxl_train",)),
    F("--stop_text_encoder_training", int, None, DONE,
      "Stop training the text encoder after N steps (it is frozen and leaves the optimizer); "
      "-1: never train it. Default: train it for the whole run.", check=at_least(-1), scripts=("train_db",)),
    F("--no_token_padding", bool, False, DONE,
      "Do not pad captions to 77 tokens: the text conditioning is as long as the longest caption "
      "of the batch (diffusers' original DreamBooth).", scripts=("train_db",)),
])
