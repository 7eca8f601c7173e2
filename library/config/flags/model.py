"""Flags that choose and load the base model (kohya's model, VAE and memory-loading options)."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, in_group, unsupported
from library.config.flags.scripts import EMBEDDING_TRAINERS, FULL_TRAINERS, NETWORK_TRAINERS

FLAGS = in_group("model", [
    F("--pretrained_model_name_or_path", str, None, DONE,
      "Base model: a .safetensors/.ckpt single file or a diffusers model folder."),
    F("--v2", bool, False, DONE,
      "The base model is Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, penultimate layer)."),
    F("--v_parameterization", bool, False, DONE,
      "The model predicts v (velocity) instead of noise, as SD 2.x 768-v models do."),
    F("--vae", str, None, DONE,
      "Replace the model's VAE with this one (a single file or a diffusers folder)."),
    F("--tokenizer_cache_dir", str, None, DONE,
      "Folder holding the CLIP tokenizer files, so that no download is needed."),
    F("--allow_pickle", bool, False, DONE,
      "sdtk only: allow loading pickle-based .ckpt/.pt files, which can run arbitrary code; "
      "without it only safetensors and diffusers folders are loaded.",
      scripts=NETWORK_TRAINERS + FULL_TRAINERS + EMBEDDING_TRAINERS),
    F("--clip_skip", int, None, DONE,
      "Use the output of the N-th text-encoder layer from the end (2 = penultimate, as many "
      "anime models were trained).", check=at_least(1)),
    F("--no_half_vae", bool, False, DONE,
      "Keep the VAE in float32 under mixed precision (the SDXL VAE overflows in fp16)."),
    F("--fp8_base", bool, False, DONE,
      "Store the frozen U-Net's Linear/Conv weights in float8 (one scale per output channel), "
      "upcast per layer while computing: 1 byte per weight (the text encoders are not changed)."),
    F("--fp8_base_unet", bool, False, DONE,
      "Store only the U-Net in float8; the text encoders stay in fp16/bf16 (in sdtk the same as "
      "--fp8_base)."),
    F("--lowram", bool, False, DONE,
      "Load the model directly to the GPU instead of building it in CPU memory (for machines "
      "with little RAM)."),
    F("--highvram", bool, False, DONE,
      "Keep models on the GPU between stages (e.g. after caching) instead of freeing memory."),
    F("--disable_mmap_load_safetensors", bool, False, DONE,
      "Read safetensors model files with plain reads instead of memory-mapping them (faster on "
      "some network file systems; the file's pages do not count as the process's memory)."),
    F("--mem_eff_attn", bool, False, unsupported("kohya's own attention kernel; use --sdpa"),
      "Use kohya's memory-efficient attention implementation."),
    F("--xformers", bool, False, DONE,
      "Use xformers memory-efficient attention (optional package, CUDA only)."),
    F("--sdpa", bool, False, DONE,
      "Use PyTorch's scaled_dot_product_attention (fast and memory-efficient; recommended)."),
    F("--torch_compile", bool, False, DONE, "Compile the U-Net with torch.compile."),
    F("--dynamo_backend", str, "inductor", DONE, "Backend for --torch_compile.",
      choices=["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs",
               "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm"]),
])
