"""Core training-loop flags: length, batch, precision, gradient handling, distributed settings."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, in_group, non_negative, unsupported
from library.config.flags.scripts import NETWORK_TRAINERS

FLAGS = in_group("training", [
    F("--max_train_steps", int, 1600, DONE, "Number of optimizer steps to train.", check=at_least(1)),
    F("--max_train_epochs", int, None, DONE,
      "Number of epochs to train; overrides --max_train_steps.", check=at_least(1)),
    F("--train_batch_size", int, 1, DONE, "Images per batch (per process).", check=at_least(1)),
    F("--gradient_accumulation_steps", int, 1, DONE,
      "Accumulate gradients over N batches before each optimizer step.", check=at_least(1)),
    F("--seed", int, None, DONE, "Random seed for reproducible training (random when unset)."),
    F("--gradient_checkpointing", bool, False, DONE,
      "Recompute activations in the backward pass: much less memory, somewhat slower."),
    F("--mixed_precision", str, "no", DONE,
      "Compute in half precision (fp16 or bf16) with float32 master weights.",
      choices=["no", "fp16", "bf16"]),
    F("--full_fp16", bool, False, DONE,
      "Keep the trained weights and gradients in fp16 too (less memory, less stable; needs "
      "--mixed_precision fp16)."),
    F("--full_bf16", bool, False, DONE,
      "Keep the trained weights and gradients in bf16 too (needs --mixed_precision bf16)."),
    F("--max_grad_norm", float, 1.0, DONE,
      "Clip the gradient norm to this value (0 disables clipping).", check=non_negative),
    F("--initial_epoch", int, None, DONE,
      "Start counting epochs from this number (for schedules), without loading a state.",
      check=at_least(1)),
    F("--initial_step", int, None, DONE,
      "Start counting steps from this number (overrides --initial_epoch).", check=non_negative),
    F("--skip_until_initial_step", bool, False, DONE,
      "Skip the data of the first --initial_step steps so that the data order continues."),
    F("--cpu_offload_checkpointing", bool, False, unsupported("kohya uses it only for SD3/Flux"),
      "Offload checkpointed activations to CPU memory."),
    F("--fused_backward_pass", bool, False, unsupported("it is for full-model training (train_db, fine_tune, sdxl_train)"),
      "Apply the optimizer step inside the backward pass to save memory.", scripts=NETWORK_TRAINERS),
    F("--ddp_timeout", int, None, DONE,
      "Timeout for the multi-process group, in minutes.", check=at_least(1)),
    F("--ddp_gradient_as_bucket_view", bool, False, DONE,
      "DistributedDataParallel option gradient_as_bucket_view (saves memory)."),
    F("--ddp_static_graph", bool, False, DONE, "DistributedDataParallel option static_graph."),
    # --deepspeed and its options: library/config/flags/deepspeed.py
])
