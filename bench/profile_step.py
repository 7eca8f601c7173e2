"""Profile sdtk's training step on the peer's models (issue 12): per-step times, page faults, operators.

    python bench/profile_step.py --family sd1|sdxl [--steps 6] [--profile out.txt] [--extra "--gradient_checkpointing"]

Runs ``train_network.py`` / ``sdxl_train_network.py``'s trainer in this process with the flags of
``../shared/peer/compare_perf.py`` (LoRA dim 4 / alpha 1, 256 px, batch 1, fp32, AdamW, cached latents,
``--sdpa``, seed 42; SDXL: cached TE outputs, UNet only) on the random-weight models that
``setup_kohya.sh`` builds in ``$PEER`` (default ``~/peer``). Prints one line per optimizer step: wall
seconds, process CPU seconds and minor page faults of that step. ``--profile FILE`` runs
``torch.profiler`` over steps 3..N and writes the operator table (self CPU time) to FILE.
A/B the allocator with the environment, e.g. ``MALLOC_MMAP_THRESHOLD_=1048576``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from step_meter import StepMeter, common_parser  # noqa: E402


def peer_flags(peer: Path, sdxl: bool, steps: int, out: str) -> list[str]:
    """compare_perf.py's command line (kept in step with it by hand)."""
    model = peer / "models" / ("sdxl_random" if sdxl else "sd1_random")
    flags = ["--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(peer / "tokenizers"),
             "--dataset_config", str(peer / "data" / ("dataset_sdxl.toml" if sdxl else "dataset_sd1.toml")),
             "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1", "--resolution", "256",
             "--train_batch_size", "1", "--mixed_precision", "no", "--save_model_as", "safetensors", "--cache_latents",
             "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--seed", "42",
             "--sdpa", "--max_data_loader_n_workers", "0", "--output_dir", out, "--output_name", "p",
             "--max_train_steps", str(steps)]
    if sdxl:
        flags += ["--cache_text_encoder_outputs", "--network_train_unet_only"]
    return flags


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__, "/tmp/sdtk_profile_out")
    p.add_argument("--no-tune", action="store_true", help="leave glibc's malloc at its defaults (A/B)")
    o = p.parse_args(argv)
    sdxl = o.family == "sdxl"
    if sdxl:
        import sdxl_train_network as script
        from sdxl_train_network import SdxlNetworkTrainer as base
    else:
        import train_network as script
        from library.training.trainer import NetworkTrainer as base

    from library.config.args import parse_args
    from library.utils.logging import configure_logging

    if o.no_tune:
        import library.training.memory as memory

        memory._done = True  # tune_allocator() then does nothing
    meter = StepMeter(o.profile)

    class Trainer(base):
        def sample_images(self, s, steps, epoch):  # the loop calls this before step 1 and after every step
            if epoch is None:
                meter.mark()

    args = parse_args(script.SCRIPT, peer_flags(Path(o.peer), sdxl, o.steps, o.out) + shlex.split(o.extra))
    configure_logging(args)
    Trainer(args).train()
    meter.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
