"""kohya's sampler names and the diffusers schedulers they stand for (gen_img ``--sampler``, sample ``--ss``)."""

from __future__ import annotations

from typing import Any

from library.errors import ConfigError

# kohya's sampler names -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # newer diffusers refuses final_sigmas_type "zero" with the first-order dpmsolver
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}


def make_scheduler(sampler: str, scheduler_config: dict[str, Any]):
    """A diffusers scheduler for kohya's sampler name, from the model's scheduler config."""
    import diffusers  # on use: importing diffusers takes seconds, and checking a prompt's sampler needs none of it

    key = sampler.lower()
    if key not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} is not known; choose one of {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[key]
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    cfg.update(extra)
    cfg.setdefault("clip_sample", False)
    return getattr(diffusers, cls_name).from_config(cfg)
