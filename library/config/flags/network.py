"""Network (LoRA) flags of train_network / sdxl_train_network."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, between, in_group, key_values, non_negative

FLAGS = in_group("network", [
    F("--network_module", str, None, DONE,
      "Python module of the network to train, by dotted path (networks.lora, lycoris.kohya, ...)."),
    F("--network_dim", int, None, DONE,
      "Rank of the LoRA matrices (module default when unset, 4 for networks.lora).", check=at_least(1)),
    F("--network_alpha", float, 1, DONE,
      "LoRA alpha: the update is scaled by alpha/rank (alpha = rank means no scaling).",
      check=non_negative),
    F("--network_dropout", float, None, DONE,
      "Dropout probability on the LoRA down-projection outputs (neuron dropout).",
      check=between(0, 1, hi_open=True)),
    F("--network_args", str, None, DONE,
      "Extra network options as key=value items (e.g. conv_dim=4 conv_alpha=1 algo=locon).",
      nargs="*", check=key_values),
    F("--network_weights", str, None, DONE, "Start from the weights of this network file."),
    F("--dim_from_weights", bool, False, DONE,
      "Take the rank (and alpha) from --network_weights instead of --network_dim."),
    F("--network_train_unet_only", bool, False, DONE, "Train only the U-Net part of the network."),
    F("--network_train_text_encoder_only", bool, False, DONE,
      "Train only the text-encoder part of the network."),
    F("--unet_lr", float, None, DONE,
      "Learning rate of the U-Net modules (default: --learning_rate).", check=non_negative),
    F("--text_encoder_lr", float, None, DONE,
      "Learning rate of the text-encoder modules (default: --learning_rate); for SDXL two "
      "values set text encoder 1 and 2 separately.", nargs="*", check=non_negative),
    F("--scale_weight_norms", float, None, DONE,
      "Max-norm regularization: rescale LoRA weights whose norm exceeds this (1 typical; 0 = off).",
      check=non_negative, off=(0.0,)),
    F("--base_weights", str, None, DONE,
      "Network files merged into the base model before training.", nargs="*"),
    F("--base_weights_multiplier", float, None, DONE,
      "Multiplier of each --base_weights file (default 1.0).", nargs="*"),
    F("--cache_text_encoder_outputs", bool, False, DONE,
      "SDXL: compute the text-encoder outputs once before training (needs frozen text encoders: "
      "--network_train_unet_only, or sdxl_train.py without --train_text_encoder; disables caption "
      "shuffling and dropout).",
      scripts=("sdxl_train_network", "sdxl_train")),
    F("--cache_text_encoder_outputs_to_disk", bool, False, DONE,
      "SDXL: like --cache_text_encoder_outputs, and keep the outputs in files for later runs.",
      scripts=("sdxl_train_network", "sdxl_train")),
])

