"""Image generation (``gen_img.py``): prompt weighting, prompts and seeds, networks, the job itself.

* :mod:`library.inference.prompt_weighting` — A1111 weighting and long prompts -> embeddings.
* :mod:`library.inference.prompts` — kohya's inline prompt options, prompt files, seeds, batches.
* :mod:`library.inference.networks` — several LoRAs at once, hooked or merged.
* :mod:`library.inference.schedulers` — kohya's sampler names -> diffusers schedulers.
* :mod:`library.inference.pipeline` — the one way to build a diffusers pipeline (also for training samples).
* :mod:`library.inference.generate` — negative scale, PNG metadata, saving.
"""
