"""The training-method contract, for every entry script: network (LoRA), full model and embeddings.

Every method must resume bit for bit: a run resumed from the state saved after step 3 (mid-epoch,
after an epoch boundary, so the data order, the RNGs, the optimizer and the LR schedule all have to
come back) ends with the uninterrupted run's output, byte-identical tensors, on CPU in fp32. And its
output must load where users load it: diffusers' ``load_lora_weights`` / ``from_single_file`` /
``load_textual_inversion`` (XTI files have no diffusers reader; gen_img's is tested in test_xti.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers_resume import run_script_in_process, state_progress
from tests.trainer_fixtures import assert_same_tensors, make_dataset

pytestmark = pytest.mark.integration

TOKEN = "mychar"
STEPS, STATE_AT = 4, 3  # 2 images, batch 1: epoch 1 is steps 1-2, the state is mid epoch 2


@dataclass(frozen=True)
class Method:
    """One training method: its entry script, the tiny model family and the script's own flags.

    Attributes:
        kind: "network", "full" or "embedding": what the output file holds.
        diffusers: diffusers reads the output file.
    """

    script: str
    family: str
    kind: str
    args: tuple[str, ...]
    diffusers: bool = True


NETWORK = ("--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
           "--network_dropout", "0.1", "--learning_rate", "1e-3")
FULL = ("--save_model_as", "safetensors", "--learning_rate", "1e-4")
EMBEDDING = ("--token_string", TOKEN, "--init_word", "photo", "--num_vectors_per_token", "2", "--learning_rate", "5e-2")
METHODS = {
    "train_network": Method("train_network", "sd1", "network", NETWORK),
    "sdxl_train_network": Method("sdxl_train_network", "sdxl", "network", NETWORK),
    "train_db": Method("train_db", "sd1", "full", FULL),
    "fine_tune": Method("fine_tune", "sd1", "full", FULL + ("--train_text_encoder",)),
    "sdxl_train": Method("sdxl_train", "sdxl", "full", FULL + ("--train_text_encoder",)),
    "train_textual_inversion": Method("train_textual_inversion", "sd1", "embedding", EMBEDDING),
    "sdxl_train_textual_inversion": Method("sdxl_train_textual_inversion", "sdxl", "embedding", EMBEDDING),
    "train_textual_inversion_XTI": Method("train_textual_inversion_XTI", "sd1", "embedding", EMBEDDING,
                                          diffusers=False),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A kohya DreamBooth folder ``1_mychar/`` (captions "a photo of mychar <name>") and, for fine_tune, the
    same images in a metadata JSON."""
    root = make_dataset(tmp_path_factory.mktemp("contract_data"), names=("astronaut", "chelsea"), token=TOKEN)
    folder = root / f"1_{TOKEN}"
    meta = {p.name: {"caption": p.with_suffix(".caption").read_text(encoding="utf-8"),
                     "image_size": list(Image.open(p).size)} for p in sorted(folder.glob("*.png"))}
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def _argv(method: Method, model, data, out, *extra: str) -> list[str]:
    dataset = ["--train_data_dir", str(data)]
    if method.script == "fine_tune":
        dataset = ["--train_data_dir", str(data / f"1_{TOKEN}"), "--in_json", str(data / "meta.json")]
    return ["--pretrained_model_name_or_path", str(model), *dataset, "--resolution", "64", "--output_dir", str(out),
            "--output_name", "out", "--max_train_steps", str(STEPS), "--seed", "7", "--max_data_loader_n_workers", "0",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--flip_aug", "--noise_offset", "0.05",
            *method.args, *extra]


@pytest.fixture(scope="module", params=[pytest.param(m, id=n) for n, m in METHODS.items()])
def run(request, tiny_model_dir, data, tmp_path_factory):
    """The uninterrupted run (a state saved after step 3) and a run resumed from that state, of one method."""
    method: Method = request.param
    model = tiny_model_dir(method.family)
    root = tmp_path_factory.mktemp(f"contract_{method.script}")
    ref, resumed = root / "ref", root / "resumed"
    assert run_script_in_process(method.script, _argv(method, model, data, ref, "--save_every_n_steps",
                                                      str(STATE_AT), "--save_state")) == 0
    state = ref / f"out-step{STATE_AT:08d}-state"
    assert state_progress(state)["global_step"] == STATE_AT
    assert run_script_in_process(method.script, _argv(method, model, data, resumed, "--resume", str(state))) == 0
    return method, model, ref / "out.safetensors", resumed / "out.safetensors"


def test_resume_is_bit_identical(run):
    method, _, ref, resumed = run
    a, b = load_file(str(ref)), load_file(str(resumed))
    assert_same_tensors(a, b)
    assert a and all(torch.isfinite(v.float()).all() for v in a.values())


def test_output_loads_in_diffusers(run, tmp_path):
    method, model, out, _ = run
    if not method.diffusers:
        pytest.skip(f"{method.script} writes kohya's XTI layout, which diffusers has no reader for")
    from library.models.loading import load_models
    from tests.helpers_networks import pipeline_of, unet_out

    if method.kind == "network":
        pytest.importorskip("peft")
        m = load_models(str(model))
        before = unet_out(m)
        pipeline_of(m).load_lora_weights(str(out))
        assert (unet_out(m) - before).abs().max() > 0  # the trained LoRA acts on diffusers' UNet
    elif method.kind == "full":
        from library.training.family import get_family_adapter

        src = load_models(str(model))
        cls = get_family_adapter(src.family).pipeline_class()
        pipe = cls.from_single_file(str(out), config=str(model), local_files_only=True)
        ours = load_models(str(out), with_tokenizers=False)
        theirs = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if len(ours.text_encoders) > 1 else [])
        for t, o in zip(theirs, [ours.unet, ours.vae, *ours.text_encoders]):
            assert_same_tensors(t.state_dict(), o.state_dict())
        assert any(not torch.equal(a, b) for a, b in zip(src.unet.state_dict().values(), ours.unet.state_dict().values()))
    else:
        m = load_models(str(model))
        pipe = pipeline_of(m)
        sd = load_file(str(out))
        parts = [("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)] \
            if "clip_g" in sd else [(None, pipe.text_encoder, pipe.tokenizer)]
        for key, te, tok in parts:
            expected = sd[key] if key else next(iter(sd.values()))  # [vectors, width]
            pipe.load_textual_inversion(sd[key] if key else str(out), token=TOKEN, text_encoder=te, tokenizer=tok)
            ids = tok.convert_tokens_to_ids([TOKEN] + [f"{TOKEN}_{i}" for i in range(1, expected.shape[0])])
            assert torch.equal(te.get_input_embeddings().weight[ids], expected)
