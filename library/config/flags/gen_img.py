"""Flags of ``gen_img.py`` (kohya's image generation script).

Declared for the ``gen_img`` script only: several dests (``v2``, ``vae``, ``seed``, ``network_weights``...)
also exist for the trainers, with other defaults, nargs or meanings. kohya flags of gen_img that are not
declared here are still recognised and rejected with "not implemented yet" (see ``library.config.args``).
"""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, between, in_group, unsupported
from library.config.flags.sampling import SAMPLERS

_S = ("gen_img",)


def _g(*a, **kw):
    return F(*a, scripts=_S, **kw)


def _highres_scale(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be > 0 and <= 1 (the first stage's fraction of the size), got {v}"


FLAGS = in_group("gen_img", [
    # model
    _g("--ckpt", str, None, DONE, "Base model: a .safetensors/.ckpt single file or a diffusers model folder."),
    _g("--sdxl", bool, False, DONE, "The model is SDXL (detected from the weights; checked when given)."),
    _g("--v1", bool, False, DONE, "The model is SD 1.x (detected from the weights; checked when given)."),
    _g("--v2", bool, False, DONE, "The model is SD 2.x (detected from the weights; checked when given)."),
    _g("--v_parameterization", bool, False, DONE, "The model predicts v (SD 2.x 768-v models and their fine-tunes)."),
    _g("--vae", str, None, DONE, "Replace the model's VAE with this one (a single file or a diffusers folder)."),
    _g("--tokenizer_cache_dir", str, None, DONE, "Folder holding the CLIP tokenizer files, so no download is needed."),
    _g("--allow_pickle", bool, False, DONE,
       "sdtk only: allow loading pickle-based .ckpt/.pt files, which can run arbitrary code."),
    _g("--clip_skip", int, None, DONE,
       "Use the output of the N-th text-encoder layer from the end (default: 1 for SD 1.x/2.x, 2 for SDXL).",
       check=at_least(1)),
    _g("--fp16", bool, False, DONE, "Run the models in float16."),
    _g("--bf16", bool, False, DONE, "Run the models in bfloat16."),
    _g("--xformers", bool, False, DONE, "Use xformers attention (optional package: pip install sdtk[xformers])."),
    _g("--diffusers_xformers", bool, False, DONE, "Same as --xformers (diffusers' xformers attention)."),
    _g("--sdpa", bool, False, DONE, "Use PyTorch's scaled_dot_product_attention (diffusers' default)."),
    _g("--opt_channels_last", bool, False, DONE, "Store the U-Net in channels-last memory format."),
    # prompts
    _g("--prompt", str, None, DONE, "The prompt; A1111 weighting (word:1.2), (word), [word] and kohya's inline "
       "options (--n negative --w --h --s --d --l --ss --nl --t --am) are understood."),
    _g("--from_file", str, None, DONE, "Read prompts from this text file, one per line with inline options "
       "('#' lines are comments)."),
    _g("--max_embeddings_multiples", int, None, DONE,
       "Allow prompts of up to N x 75 tokens (default 1: longer prompts are truncated with a warning).",
       check=at_least(1)),
    _g("--emb_normalize_mode", str, "original", DONE,
       "How weighted prompt embeddings are renormalised: original (mean), abs (mean of |x|) or none.",
       choices=["original", "none", "abs"]),
    _g("--from_module", str, None, unsupported("prompter modules are not supported; use --from_file"),
       "Read prompts from a Python module."),
    _g("--interactive", bool, False, unsupported("interactive mode is not supported; use --prompt or --from_file"),
       "Type prompts interactively."),
    # generation
    _g("--images_per_prompt", int, 1, DONE, "Images generated for each prompt.", check=at_least(1)),
    _g("--n_iter", int, 1, DONE, "Go through all prompts this many times.", check=at_least(1)),
    _g("--batch_size", int, 1, DONE, "Images rendered together (consecutive images with equal settings).",
       check=at_least(1)),
    _g("--W", int, None, DONE, "Image width (default 512, SDXL 1024); rounded down to a multiple of 8.",
       check=at_least(64)),
    _g("--H", int, None, DONE, "Image height (default 512, SDXL 1024); rounded down to a multiple of 8.",
       check=at_least(64)),
    _g("--steps", int, 50, DONE, "Sampling steps.", check=between(1, 1000)),
    _g("--sampler", str, "ddim", DONE, "Sampler, mapped to a diffusers scheduler.", choices=SAMPLERS),
    _g("--force_scheduler_zero_steps_offset", bool, False, DONE, "Use steps_offset 0 in the scheduler."),
    _g("--scale", float, 7.5, DONE, "Classifier-free guidance scale (1 or less: no guidance)."),
    _g("--negative_scale", float, None, DONE,
       "Guidance away from the negative prompt, measured from the empty prompt: "
       "uncond + scale * (cond - uncond) - negative_scale * (negative - uncond)."),
    _g("--seed", int, None, DONE,
       "Seed of a single image, or of the seeds of all images when several are generated."),
    _g("--iter_same_seed", bool, False, DONE, "Use one seed for every prompt of an iteration (--n_iter)."),
    _g("--image_path", str, None, DONE, "img2img: an image file, or a folder of images used in turn."),
    _g("--strength", float, None, DONE,
       "img2img strength (default 0.8): how much of the image is repainted; with highres fix, the second stage's.",
       check=between(0, 1)),
    _g("--mask_path", str, None, unsupported("inpainting is not supported"), "Inpainting mask."),
    # highres fix (library/inference/highres.py)
    _g("--highres_fix_scale", float, None, DONE,
       "Highres fix: render first at this fraction of the size (e.g. 0.5), upscale, then img2img at the full size "
       "with --steps and --strength.", check=_highres_scale),
    _g("--highres_fix_steps", int, 28, DONE, "Highres fix: steps of the first stage.", check=between(1, 1000)),
    _g("--highres_fix_strength", float, None, DONE,
       "Highres fix with --image_path: img2img strength of the first stage (default --strength); the second "
       "stage uses --strength.", check=between(0, 1)),
    _g("--highres_fix_save_1st", bool, False, DONE, "Highres fix: also save the first-stage images (im_..._0...)."),
    _g("--highres_fix_latents_upscaling", bool, False, DONE,
       "Highres fix: upscale the first stage's latents (bilinear) instead of the decoded image (LANCZOS)."),
    _g("--highres_fix_upscaler", str, None,
       unsupported("upscaler modules (tools.latent_upscaler) are not supported; the image is upscaled with LANCZOS, "
                   "or use --highres_fix_latents_upscaling"), "Highres fix: upscaler module."),
    _g("--highres_fix_upscaler_args", str, None,
       unsupported("upscaler modules (--highres_fix_upscaler) are not supported"), "Arguments of the upscaler module."),
    _g("--highres_fix_disable_control_net", bool, False, DONE,
       "Highres fix: no ControlNet in the second stage (sdtk has no ControlNet, so this changes nothing)."),
    _g("--original_width", int, None, DONE, "SDXL: original width of the size conditioning (default: the width)."),
    _g("--original_height", int, None, DONE, "SDXL: original height of the size conditioning (default: the height)."),
    _g("--original_width_negative", int, None, DONE, "SDXL: original width for the negative prompt."),
    _g("--original_height_negative", int, None, DONE, "SDXL: original height for the negative prompt."),
    _g("--crop_top", int, None, DONE, "SDXL: crop top of the size conditioning (default 0)."),
    _g("--crop_left", int, None, DONE, "SDXL: crop left of the size conditioning (default 0)."),
    # output and logging
    _g("--console_log_level", str, None, DONE, "Console log level.",
       choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    _g("--console_log_file", str, None, DONE, "Also write the console log to this file."),
    _g("--console_log_simple", bool, False, DONE, "Plain console log format."),
    _g("--outdir", str, "outputs", DONE, "Folder for the images (PNG, prompt and settings in text chunks)."),
    _g("--sequential_file_name", bool, False, DONE, "Name images im_000001.png, im_000002.png, ..."),
    _g("--use_original_file_name", bool, False, DONE, "img2img: name each image after its source image."),
    # networks
    _g("--network_module", str, None, DONE,
       "Network module of each --network_weights file (networks.lora, lycoris.kohya, ...); one value is used "
       "for all files.", nargs="*"),
    _g("--network_weights", str, None, DONE, "Network files to apply (several at once).", nargs="*"),
    _g("--network_mul", float, None, DONE, "Multiplier of each network (default 1.0 each).", nargs="*"),
    _g("--network_args", str, None, DONE,
       "Extra arguments of each network: 'key=value;key=value', one item per network.", nargs="*"),
    _g("--network_show_meta", bool, False, DONE, "Log the metadata of each network file."),
    _g("--network_merge", bool, False, DONE, "Merge the networks into the model weights instead of hooking them."),
    _g("--network_merge_n_models", int, None, DONE, "Merge only the first N networks; hook the others.",
       check=at_least(0)),
    _g("--textual_inversion_embeddings", str, None, DONE,
       "Textual inversion embedding files (.safetensors; .pt/.bin with --allow_pickle); each file's name "
       "(without extension) is the word to use in prompts, standing for all its vectors.", nargs="*"),
    _g("--XTI_embeddings", str, None, DONE,
       "Extended Textual Inversion files (kohya's layout: one [vectors, width] tensor per cross-attention layer "
       "IN01 ... OUT11; SD 1.x only); each file's name (without extension) is the word to use in prompts, and "
       "every UNet cross-attention layer gets that layer's vectors.", nargs="*"),
    _g("--network_regional_mask_max_color_codes", int, None,
       unsupported("regional prompting (AND) is not supported"), "Regional LoRA masks."),
])
