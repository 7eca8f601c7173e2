"""Image generation (``gen_img.py``): prompt weighting, prompts and seeds, networks, the job itself.

* :mod:`library.inference.prompt_weighting` — A1111 weighting and long prompts -> embeddings.
* :mod:`library.inference.prompts` — kohya's inline prompt options, prompt files, seeds, batches.
* :mod:`library.inference.networks` — several LoRAs at once, hooked or merged.
* :mod:`library.inference.generate` — diffusers pipelines, negative scale, PNG metadata, saving.
"""
