"""The family registry: ``Family`` keeps the enum's behaviour and is open to a family added from
one module (tests/fake_family_module.py), which then trains a LoRA and generates an image with the
real entry scripts, with no edit anywhere else."""

from __future__ import annotations

import copy
import importlib
import json
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from library.errors import ModelLoadError
from library.models.families import TOKENIZER_IDS, Family, detection_order, register
from tests.trainer_fixtures import lora_metadata, make_dataset, run_in_process, train_argv

FAKE_MODULE = "tests.fake_family_module"


@pytest.fixture(scope="module")
def fake():
    """The fake family, registered by importing its module; removed from the registry afterwards."""
    from library.models.families import unregister

    module = importlib.import_module(FAKE_MODULE)
    yield module.FAKE_SD1
    unregister(module.FAKE_SD1)
    sys.modules.pop(FAKE_MODULE, None)


@pytest.fixture(scope="module")
def fake_single_file(fake, tmp_path_factory):
    from tools.make_tiny_model import make_tiny_model, tokenizer_dir_for

    path = make_tiny_model(fake, "single_file", tmp_path_factory.mktemp("fake") / "fake.safetensors")
    return path, tokenizer_dir_for(path)


# --------------------------------------------------------------------------- enum-like behaviour
def test_builtin_families_behave_like_the_enum():
    assert [f.value for f in Family][:3] == ["sd1", "sd2", "sdxl"]
    assert Family("sdxl") is Family.SDXL and Family(Family.SD2) is Family.SD2
    assert Family.SDXL == "sdxl" and Family.SD1.pretty == "SD1.x" and Family.SD2.v2 and not Family.SD1.v2
    assert json.dumps({"f": Family.SD2}) == '{"f": "sd2"}'
    assert pickle.loads(pickle.dumps(Family.SDXL)) is Family.SDXL
    assert copy.deepcopy([Family.SD1])[0] is Family.SD1
    assert TOKENIZER_IDS[Family.SD1] == (("openai/clip-vit-large-patch14", None),)
    assert len(TOKENIZER_IDS[Family.SDXL]) == Family.SDXL.n_text_encoders == 2
    with pytest.raises(ValueError, match="not a model family"):
        Family("sd3")
    with pytest.raises(AttributeError):
        Family.SD3  # noqa: B018


def test_family_facts_differ_where_the_families_do():
    assert [f.lora_key_layout for f in (Family.SD1, Family.SD2, Family.SDXL)] == ["sd", "sd", "sdxl"]
    assert Family.SDXL.check_bucket_steps(48) is not None and Family.SDXL.check_bucket_steps(32) is None
    assert Family.SD1.check_bucket_steps(48) is None
    assert Family.SDXL.supports_te_cache and not Family.SD1.supports_te_cache
    assert Family.SD2.modelspec_architecture(True) == "stable-diffusion-v2-768-v"
    assert Family.SDXL.adapter().pipeline_class().__name__ == "StableDiffusionXLPipeline"


def test_a_duplicate_name_is_refused():
    from library.models.families.sd1 import SD1

    class Again(SD1):
        value = "sd1"

    with pytest.raises(RuntimeError, match="already registered"):
        register(Again())


# --------------------------------------------------------------------------------- fake family
def test_fake_family_is_registered_from_its_module(fake):
    assert Family("fake_sd1") is fake and Family.FAKE_SD1 is fake and fake in list(Family)
    assert fake.is_a(Family.SD1) and fake.root is Family.SD1 and not fake.is_a(Family.SD2)
    assert detection_order()[0] is fake  # a variant is tried before its base
    assert TOKENIZER_IDS[fake] == TOKENIZER_IDS[Family.SD1]
    assert fake.check_bucket_steps(32) is not None  # its own bucket multiple (64)


def test_fake_family_files_are_recognised(fake, fake_single_file, tmp_path):
    from library.models.loading import load_models
    from library.models.saving import save_diffusers

    path, tokenizers = fake_single_file
    m = load_models(str(path), tokenizer_cache_dir=str(tokenizers))
    assert m.family is fake
    assert tuple(m.unet.config.block_out_channels) == (16, 32, 48)
    assert m.vae.config.scaling_factor == 0.5
    folder = tmp_path / "fake_diffusers"
    save_diffusers(m, folder)
    assert load_models(str(folder)).family is fake
    # an SD1-only expectation accepts the variant; an SDXL-only one names the right script
    assert load_models(str(folder), expected=[Family.SD1, Family.SD2]).family is fake
    with pytest.raises(ModelLoadError, match="train_network.py"):
        load_models(str(folder), expected=[Family.SDXL])


@pytest.mark.integration
def test_fake_family_trains_a_lora_and_generates(fake, fake_single_file, tmp_path):
    import gen_img

    path, tokenizers = fake_single_file
    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    out = tmp_path / "out"
    argv = train_argv(path, data, out, "--tokenizer_cache_dir", str(tokenizers), steps=2, name="fake_lora")
    assert run_in_process(argv) == 0
    lora = out / "fake_lora.safetensors"
    md = lora_metadata(lora)
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"

    images = tmp_path / "images"
    rc = gen_img.main(["--ckpt", str(path), "--tokenizer_cache_dir", str(tokenizers), "--prompt", "a photo of sks --d 3",
                       "--W", "64", "--H", "64", "--steps", "2", "--outdir", str(images),
                       "--network_module", "networks.lora", "--network_weights", str(lora)])
    assert rc == 0
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 1
    pixels = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
