"""sdxl_train.py (SDXL full fine-tune) end to end on the tiny SDXL model: text encoders with their own
learning rates, --block_lr, text-encoder output caching, diffusers reading the result, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.trainer_fixtures import assert_same_tensors, make_dataset

pytestmark = pytest.mark.integration


def run_sdxl_train(argv: list[str]) -> int:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import sdxl_train

    return sdxl_train.main(argv)


def argv_for(model, data, out, *extra: str, steps: int = 2) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--output_name", "xl", "--max_train_steps", str(steps), "--learning_rate",
            "1e-4", "--seed", "5", "--max_data_loader_n_workers", "0", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("xl_data"))


def _changed(a, b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_trains_with_text_encoder_2_only_and_diffusers_reads_it(tiny_model_dir, data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.models.loading import load_models

    folder = tiny_model_dir("sdxl")
    argv = argv_for(folder, data, tmp_path, "--train_text_encoder", "--learning_rate_te1", "0",
                    "--learning_rate_te2", "5e-5", "--save_model_as", "safetensors")
    assert run_sdxl_train(argv) == 0
    final = tmp_path / "xl.safetensors"
    pipe = StableDiffusionXLPipeline.from_single_file(str(final), config=str(folder), local_files_only=True)
    ours, src = load_models(str(final), with_tokenizers=False), load_models(str(folder))
    for theirs, mine in ((pipe.unet, ours.unet), (pipe.text_encoder, ours.text_encoders[0]),
                         (pipe.text_encoder_2, ours.text_encoders[1])):
        assert_same_tensors(theirs.state_dict(), mine.state_dict())
    assert _changed(src.unet, ours.unet) and _changed(src.text_encoders[1], ours.text_encoders[1])
    assert not _changed(src.text_encoders[0], ours.text_encoders[0])  # learning_rate_te1 0: not trained
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_block_lr_and_cached_text_encoder_outputs_from_metadata(tiny_model_dir, tmp_path):
    from library.models.loading import load_models
    from tests.data_fixtures import copy_photo

    images = tmp_path / "img"
    md = {}
    for n in ("astronaut", "coffee"):
        p = copy_photo(n, images, max_side=96)
        from PIL import Image

        md[p.stem] = {"caption": f"a photo of {n}", "image_size": list(Image.open(p).size)}
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(md), encoding="utf-8")
    lrs = ["0"] + ["1e-4"] * 21 + ["0"]  # embeddings and the out block frozen
    folder = tiny_model_dir("sdxl")
    argv = argv_for(folder, images, tmp_path / "o", "--in_json", str(meta), "--block_lr", ",".join(lrs),
                    "--cache_text_encoder_outputs", "--cache_latents")
    assert run_sdxl_train(argv) == 0
    ours, src = load_models(str(tmp_path / "o" / "xl"), with_tokenizers=False), load_models(str(folder))
    assert not _changed(src.unet.time_embedding, ours.unet.time_embedding)
    assert not _changed(src.unet.conv_out, ours.unet.conv_out)
    assert _changed(src.unet.down_blocks, ours.unet.down_blocks)
    assert not _changed(src.text_encoders[1], ours.text_encoders[1])


@pytest.mark.parametrize("case", ["block_lr_count", "sd1_model", "cache_with_te", "fused_prodigy", "fused_accum",
                                  "fused_both", "groups_zero"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    model = tiny_model_dir("sdxl")
    extra, expect = [], ""
    if case == "block_lr_count":
        extra, expect = ["--block_lr", ",".join(["1e-4"] * 22)], "--block_lr needs 23 learning rates"
    elif case == "sd1_model":
        model, expect = tiny_model_dir("sd1"), "is an SD1.x model; use train_db.py or fine_tune.py"
    elif case == "cache_with_te":
        extra, expect = ["--cache_text_encoder_outputs", "--train_text_encoder"], "cannot be used with --train_text_encoder"
    elif case == "fused_prodigy":
        extra = ["--fused_optimizer_groups", "4", "--optimizer_type", "Prodigy"]
        expect = "--fused_optimizer_groups works with --optimizer_type Adafactor, AdamW, Lion or SGDNesterov"
    elif case == "fused_both":
        extra, expect = ["--fused_backward_pass", "--fused_optimizer_groups", "4"], "give one"
    elif case == "groups_zero":
        extra, expect = ["--fused_optimizer_groups", "0"], "--fused_optimizer_groups"
    else:
        extra = ["--fused_backward_pass", "--optimizer_type", "Adafactor", "--gradient_accumulation_steps", "2"]
        expect = "--fused_backward_pass cannot be used with --gradient_accumulation_steps > 1"
    assert run_sdxl_train(argv_for(model, data, out, *extra)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], errors
    assert not out.exists() or not any(out.iterdir())


def test_fused_backward_pass_equals_the_plain_step_and_resumes(tiny_model_dir, data, tmp_path):
    """Adafactor's update of a tensor needs only that tensor: stepping each one inside the backward
    pass gives the same weights (without clipping, which fused clips per tensor, as kohya); a fused
    run continues bit-identically from its state."""
    from safetensors.torch import load_file

    folder = tiny_model_dir("sdxl")
    common = ("--optimizer_type", "Adafactor", "--max_grad_norm", "0", "--train_text_encoder",
              "--save_model_as", "safetensors")
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "plain", *common, steps=3)) == 0
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "fused", *common, "--fused_backward_pass",
                                   "--save_every_n_steps", "1", "--save_state", steps=3)) == 0
    fused = load_file(tmp_path / "fused" / "xl.safetensors")
    assert_same_tensors(load_file(tmp_path / "plain" / "xl.safetensors"), fused)
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "resumed", *common, "--fused_backward_pass", "--resume",
                                   str(tmp_path / "fused" / "xl-step00000001-state"), steps=3)) == 0
    assert_same_tensors(fused, load_file(tmp_path / "resumed" / "xl.safetensors"))


def test_fused_optimizer_groups_equal_the_plain_step_and_resume(tiny_model_dir, data, tmp_path):
    """kohya's --fused_optimizer_groups: groups of parameters stepped in the backward pass once their
    gradients are in give AdamW's plain weights (no clipping: fused clips per tensor); the text
    encoders' unused last layers (penultimate states) leave partial groups, stepped at the end; a
    grouped run resumes bit-identically; --fused_backward_pass with AdamW gives the same weights."""
    from safetensors.torch import load_file

    folder = tiny_model_dir("sdxl")
    common = ("--optimizer_type", "AdamW", "--max_grad_norm", "0", "--train_text_encoder",
              "--save_model_as", "safetensors")
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "plain", *common, steps=3)) == 0
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "groups", *common, "--fused_optimizer_groups", "5",
                                   "--save_every_n_steps", "1", "--save_state", steps=3)) == 0
    plain, grouped = (load_file(tmp_path / d / "xl.safetensors") for d in ("plain", "groups"))
    assert_same_tensors(plain, grouped)
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "resumed", *common, "--fused_optimizer_groups", "5",
                                   "--resume", str(tmp_path / "groups" / "xl-step00000001-state"), steps=3)) == 0
    assert_same_tensors(grouped, load_file(tmp_path / "resumed" / "xl.safetensors"))
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "fused", *common, "--fused_backward_pass", steps=3)) == 0
    assert_same_tensors(plain, load_file(tmp_path / "fused" / "xl.safetensors"))


def test_split_groups_follows_kohya():
    """ceil(total / n) parameters per group, in order, and a new group at each learning-rate change."""
    from library.training.targets.fused_backward import split_groups

    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(7)]
    groups = split_groups([{"params": ps[:5], "lr": 1.0}, {"params": ps[5:], "lr": 2.0}], 3)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(3, 1.0), (2, 1.0), (2, 2.0)]
    assert [p for g in groups for p in g["params"]] == ps


def test_copy_stochastic_rounds_up_with_the_remainders_probability():
    from library.training.targets.fused_backward import copy_stochastic_

    gen = torch.Generator().manual_seed(0)
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e-4]).bfloat16().float()  # already bf16 values: unchanged
    out = torch.empty(4, dtype=torch.bfloat16)
    copy_stochastic_(out, exact, gen)
    assert torch.equal(out.float(), exact)
    x = torch.full((20000,), 1.0 + 2.0 ** -9)  # a quarter of the way from 1 to the next bf16 value (1 + 2^-7)
    out = torch.empty(20000, dtype=torch.bfloat16)
    copy_stochastic_(out, x, gen)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs((out.float() == 1.0 + 2.0 ** -7).float().mean().item() - 0.25) < 0.02


def test_full_bf16_fused_adafactor_rounds_stochastically_and_resumes(tiny_model_dir, data, tmp_path):
    """kohya's fused Adafactor + --full_bf16 rounds the updated weights stochastically: updates far
    below a bf16 step (lr 1e-7) still move weights, where round-to-nearest (the plain step) drops
    nearly all of them; the random bits are reproducible, so a resumed run is bit-identical."""
    from safetensors.torch import load_file

    from library.models.loading import load_models

    folder = tiny_model_dir("sdxl")
    common = ("--optimizer_type", "Adafactor", "--optimizer_args", "scale_parameter=False", "relative_step=False",
              "warmup_init=False", "--learning_rate", "1e-7", "--mixed_precision", "bf16", "--full_bf16",
              "--save_model_as", "diffusers_safetensors")
    base = load_models(str(folder), with_tokenizers=False).unet.state_dict()

    def moved(out) -> float:
        unet = load_models(str(out / "xl"), with_tokenizers=False).unet.state_dict()
        changed = sum(int((unet[k].bfloat16() != base[k].bfloat16()).sum()) for k in base if base[k].ndim > 1)
        return changed / sum(base[k].numel() for k in base if base[k].ndim > 1)

    assert run_sdxl_train(argv_for(folder, data, tmp_path / "nearest", *common, steps=3)) == 0
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "sr", *common, "--fused_backward_pass",
                                   "--save_every_n_steps", "1", "--save_state", steps=3)) == 0
    nearest, stochastic = moved(tmp_path / "nearest"), moved(tmp_path / "sr")
    assert stochastic > 0.003 and stochastic > 5 * nearest, (nearest, stochastic)  # measured: 0.0052 vs 0.00065
    assert run_sdxl_train(argv_for(folder, data, tmp_path / "resumed", *common, "--fused_backward_pass", "--resume",
                                   str(tmp_path / "sr" / "xl-step00000001-state"), steps=3)) == 0
    a = load_file(tmp_path / "sr" / "xl" / "unet" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(a, load_file(tmp_path / "resumed" / "xl" / "unet" / "diffusion_pytorch_model.safetensors"))
