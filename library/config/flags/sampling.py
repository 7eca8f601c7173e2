"""Sample-image generation during training."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, in_group

SAMPLERS = [
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]

FLAGS = in_group("sampling", [
    F("--sample_prompts", str, None, DONE,
      "Prompts for sample images: kohya's .txt format (--n negative, --w/--h size, --s steps, "
      "--d seed, --l CFG scale, --ss sampler per line) or .toml/.json."),
    F("--sample_every_n_steps", int, None, DONE, "Generate samples every N steps.", check=at_least(1)),
    F("--sample_every_n_epochs", int, None, DONE,
      "Generate samples every N epochs (overrides --sample_every_n_steps).", check=at_least(1)),
    F("--sample_at_first", bool, False, DONE, "Generate samples before training starts."),
    F("--sample_sampler", str, "ddim", DONE, "Default sampler for sample images.", choices=SAMPLERS),
])
