"""train_textual_inversion_XTI.py on full-size SD1.5 (random weights, CLIP's real vocabulary, no tokenizer folder):
2 steps at 64 px on the real 16 cross-attention layers, kohya's XTI layout, gen_img.py --XTI_embeddings rendering
the token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.models.xti import XTI_LAYERS
from tests.fullsize.helpers import run_script_peak

pytestmark = pytest.mark.fullsize

TOKEN = "mychar"


def test_sd1_xti(full_model, photos, tmp_path):
    model, out = full_model("sd1"), tmp_path / "out"
    log, peak = run_script_peak(
        "train_textual_inversion_XTI.py", "--pretrained_model_name_or_path", model, "--train_data_dir",
        photos("xti_sd1"), "--resolution", "64", "--output_dir", out, "--token_string", TOKEN, "--init_word",
        "person", "--num_vectors_per_token", "2", "--use_object_template", "--max_train_steps", "2",
        "--learning_rate", "5e-3", "--seed", "7", "--max_data_loader_n_workers", "0", "--cache_latents")
    print(f"SD1.5 XTI: peak RSS {peak:.1f} GiB")
    # 16 layers x 2 vectors after CLIP's 49,408 tokens
    assert f"{TOKEN}_in01 {TOKEN}1_in01 {TOKEN}_in02" in log and "(ids 49408-49439)" in log
    path = out / f"{TOKEN}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(XTI_LAYERS)
        vec = torch.stack([f.get_tensor(k) for k in XTI_LAYERS])
        md = f.metadata()
    assert vec.shape == (16, 2, 768) and torch.isfinite(vec).all()
    assert md["ss_token_string"] == TOKEN and md["ss_num_vectors_per_token"] == "2"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of {TOKEN} --d 5\na photo of --d 5\n", encoding="utf-8")
    images = tmp_path / "images"
    log, _ = run_script_peak("gen_img.py", "--ckpt", model, "--XTI_embeddings", path, "--from_file", prompts,
                             "--W", "64", "--H", "64", "--steps", "3", "--outdir", images, "--sequential_file_name")
    assert "2 image(s) written" in log
    with_token, without = (np.asarray(Image.open(images / f"im_00000{i}.png").convert("RGB")).astype(np.int16)
                           for i in (1, 2))
    assert np.abs(with_token - without).max() > 0
