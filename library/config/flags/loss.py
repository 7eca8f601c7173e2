"""Loss, noise and timestep flags (issue #6 items 1-2)."""

from __future__ import annotations

from library.config.flags.base import DONE, F, between, finite, in_group, non_negative, positive

FLAGS = in_group("loss_and_noise", [
    F("--min_snr_gamma", float, None, DONE,
      "Min-SNR loss weighting: weight each timestep by min(SNR, gamma)/SNR (5 is typical; "
      "0 = off, as in kohya).", check=non_negative),
    F("--noise_offset", float, None, DONE,
      "Add noise_offset * N(0,1) per image and channel to the noise, so the model can learn "
      "very dark and bright images (0.05-0.1 typical).", check=non_negative),
    F("--noise_offset_random_strength", bool, False, DONE,
      "Use a random noise offset between 0 and --noise_offset for each image."),
    F("--adaptive_noise_scale", float, None, DONE,
      "Add this times the latent mean's absolute value to --noise_offset.", check=finite, off=(0.0,)),
    F("--multires_noise_iterations", int, None, DONE,
      "Multi-resolution (pyramid) noise with this many levels (6-10 typical; 0 = off).",
      check=non_negative, off=(0,)),
    F("--multires_noise_discount", float, 0.3, DONE,
      "Strength decay per level of multi-resolution noise.", check=between(0, 1)),
    F("--ip_noise_gamma", float, None, DONE,
      "Input perturbation noise: perturb the noised latents by this times extra noise (0.1 typical).",
      check=non_negative, off=(0.0,)),
    F("--ip_noise_gamma_random_strength", bool, False, DONE,
      "Use a random input perturbation strength between 0 and --ip_noise_gamma."),
    F("--zero_terminal_snr", bool, False, DONE,
      "Rescale the noise schedule so the last timestep has zero SNR (pure noise)."),
    F("--min_timestep", int, None, DONE,
      "Smallest timestep sampled for training (default 0).", check=between(0, 1000), off=(0,)),
    F("--max_timestep", int, None, DONE,
      "Largest timestep sampled for training, exclusive (default 1000).", check=between(0, 1000), off=(1000,)),
    F("--loss_type", str, "l2", DONE,
      "Loss function between prediction and target.", choices=["l1", "l2", "huber", "smooth_l1"]),
    F("--huber_schedule", str, "snr", DONE,
      "How the Huber parameter c varies with the timestep.", choices=["constant", "exponential", "snr"]),
    F("--huber_c", float, 0.1, DONE, "Huber loss parameter c (decay base for the exponential schedule).",
      check=positive),
    F("--huber_scale", float, 1.0, DONE, "Scale applied to the Huber parameter.", check=positive),
    F("--scale_v_pred_loss_like_noise_pred", bool, False, DONE,
      "With v-prediction, scale the loss like an epsilon-prediction loss."),
    F("--v_pred_like_loss", float, None, DONE,
      "Add a v-prediction-like loss: loss * (1 + w * (SNR+1)/SNR), with this weight w.", check=non_negative,
      off=(0.0,)),
    F("--debiased_estimation_loss", bool, False, DONE,
      "Debiased estimation: weight the loss by 1/sqrt(SNR) (1/(SNR+1) with v-prediction), SNR capped at 1000."),
    F("--masked_loss", bool, False, DONE,
      "Compute the loss only where the mask (alpha channel or mask images) is set."),
])
