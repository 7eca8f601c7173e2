"""train_textual_inversion.py / sdxl_train_textual_inversion.py end to end on tiny models: only the new token
vectors change, files load in diffusers with the same text embeddings as sdtk's reading and training, gen_img
renders the token, exact resume, kohya's token names / init word / templates / --weights, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.trainer_fixtures import assert_same_tensors, make_dataset

pytestmark = pytest.mark.integration

TOKEN = "mychar"


def run_ti(argv: list[str], sdxl: bool = False, trainer_cls=None) -> int:
    """The script's ``main(argv)`` in this process (accelerate's process-wide state reset first)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    if sdxl:
        import sdxl_train_textual_inversion as script
    else:
        import train_textual_inversion as script
    return script.main(argv, trainer_cls)


def ti_argv(model, data, out, *extra: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--token_string", TOKEN, "--max_train_steps", str(steps),
            "--learning_rate", "5e-2", "--seed", "7", "--max_data_loader_n_workers", "0", *extra]


def capturing(base):
    """``base`` (a trainer class) that keeps its session, to inspect the trained model afterwards."""

    class Capture(base):
        sessions: list = []

        def save_output(self, s, path, steps, epoch):
            Capture.sessions.append(s)
            super().save_output(s, path, steps, epoch)

    return Capture


def _files(folder) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti_data")
    # captions "a photo of mychar <name>"; the other dataset's captions never name the token
    return make_dataset(root / "ti", token=TOKEN), make_dataset(root / "plain", token="dog")


@pytest.fixture(scope="module")
def sd1_run(tiny_model_dir, data, tmp_path_factory):
    """4 steps, 2 vectors from --init_word photo (2 tokens), saves + states every step (last 2 kept), a sample."""
    from train_textual_inversion import TextualInversionTrainer

    out = tmp_path_factory.mktemp("ti_sd1")
    model = tiny_model_dir("sd1")
    prompts = out.parent / "ti_prompts.txt"
    prompts.write_text(f"a photo of {TOKEN} --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    common = ("--num_vectors_per_token", "2", "--init_word", "photo", "--lr_scheduler", "cosine", "--flip_aug")
    cls = capturing(TextualInversionTrainer)
    argv = ti_argv(model, data[0], out, *common, "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                   "--save_state", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4")
    assert run_ti(argv, trainer_cls=cls) == 0
    return model, out, common, cls.sessions[-1]


def test_sd1_only_the_new_rows_train_and_everything_else_is_bit_identical(sd1_run):
    from library.models.loading import load_models

    model, out, _, s = sd1_run
    fresh = load_models(str(model))
    assert_same_tensors(s.model.unet.state_dict(), fresh.unet.state_dict())
    assert_same_tensors(s.model.vae.state_dict(), fresh.vae.state_dict())
    assert not any(p.requires_grad for p in s.model.unet.parameters())  # no UNet gradients, ever
    assert all(p.grad is None for p in s.model.unet.parameters())
    trained = s.model.text_encoders[0].state_dict()
    table = next(k for k in fresh.text_encoders[0].state_dict() if k.endswith("token_embedding.weight"))
    renamed = {k.replace("token_embedding.base.weight", "token_embedding.weight"): v for k, v in trained.items()
               if not k.endswith("token_embedding.new")}
    assert table in renamed
    assert_same_tensors(renamed, fresh.text_encoders[0].state_dict())  # the old rows included
    # the tokenizer: every existing id unchanged, kohya's names after the vocabulary
    tok, old = s.model.tokenizers[0], fresh.tokenizers[0]
    new_vocab = tok.get_vocab()
    assert all(new_vocab[w] == i for w, i in old.get_vocab().items())
    assert tok.convert_tokens_to_ids([TOKEN, f"{TOKEN}1"]) == [len(old), len(old) + 1]
    # the file holds the trained rows; they moved away from their start (the rows of "photo")
    emb = load_file(out / f"{TOKEN}.safetensors")["emb_params"]
    assert emb.shape == (2, 32) and torch.equal(emb, s.target.tables[0].vectors.detach())
    photo = fresh.text_encoders[0].get_input_embeddings().weight[old("photo", add_special_tokens=False).input_ids]
    assert (emb - photo).abs().min() > 0
    assert len(list((out / "sample").glob("*.png"))) == 1  # sampled with the token in the prompt


def test_sd1_file_layout_saves_and_keep_last(sd1_run):
    _, out, _, _ = sd1_run
    with safe_open(str(out / f"{TOKEN}.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        md = f.metadata()
    assert md["ss_token_string"] == TOKEN and md["ss_num_vectors_per_token"] == "2" and md["ss_steps"] == "4"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert md["modelspec.title"] == TOKEN
    names = sorted(p.name for p in out.iterdir() if p.name != "sample")
    # every step saved, only the last 2 (and the final file) kept, kohya's names
    assert names == [f"{TOKEN}-state", f"{TOKEN}-step00000002-state", f"{TOKEN}-step00000002.safetensors",
                     f"{TOKEN}-step00000003-state", f"{TOKEN}-step00000003.safetensors",
                     f"{TOKEN}-step00000004-state", f"{TOKEN}-step00000004.safetensors", f"{TOKEN}.safetensors"]
    assert not any(p.name.startswith(".sdtk-tmp") for p in out.rglob("*"))


def test_sd1_resume_is_bit_identical(sd1_run, data, tmp_path):
    model, out, common, _ = sd1_run
    argv = ti_argv(model, data[0], tmp_path, *common, "--resume", str(out / f"{TOKEN}-step00000002-state"))
    assert run_ti(argv) == 0
    assert_same_tensors(load_file(out / f"{TOKEN}.safetensors"), load_file(tmp_path / f"{TOKEN}.safetensors"))


def test_sd1_gradient_checkpointing_gives_the_same_embedding(sd1_run, data, tmp_path):
    model, out, common, _ = sd1_run
    assert run_ti(ti_argv(model, data[0], tmp_path, *common, "--gradient_checkpointing")) == 0
    assert_same_tensors(load_file(out / f"{TOKEN}.safetensors"), load_file(tmp_path / f"{TOKEN}.safetensors"))


def _sdtk_hidden(model_dir, emb_file, prompt: str) -> torch.Tensor:
    """gen_img's reading: the file loaded by library.inference.textual_inversion, the prompt encoded by sdtk."""
    from library.inference import prompt_weighting as pw
    from library.inference.textual_inversion import load_embeddings, read_embeddings
    from library.models.loading import load_models

    m = load_models(str(model_dir))
    words = load_embeddings(m, read_embeddings([str(emb_file)], allow_pickle=True))
    with torch.no_grad():
        return pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, [prompt],
                                 convert_prompt=words.convert_prompt).hidden_states


def test_sd1_diffusers_reads_the_file_like_sdtk_and_training(sd1_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    _, out, _, s = sd1_run
    file = out / f"{TOKEN}.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir("sd1")), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(file), token=TOKEN)
    prompt = f"a photo of {TOKEN} coffee"
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        during_training = s.family.encode_prompts(s.model.text_encoders, s.model.tokenizers, [prompt], None, None,
                                                  torch.device("cpu")).hidden_states
    ours = _sdtk_hidden(tiny_model_dir("sd1"), file, prompt)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(during_training, theirs, rtol=0, atol=1e-6)


def _gen_pair(model_dir, emb_file, tmp_path, word: str) -> tuple[np.ndarray, np.ndarray]:
    """gen_img with the embedding loaded: the prompt with the word, then the same prompt without it."""
    import gen_img

    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a photo of {word} --d 5\na photo of --d 5\n", encoding="utf-8")
    out = tmp_path / "gen"
    assert gen_img.main(["--ckpt", str(model_dir), "--from_file", str(prompts), "--W", "64", "--H", "64",
                         "--steps", "3", "--sampler", "euler", "--textual_inversion_embeddings", str(emb_file),
                         "--outdir", str(out), "--sequential_file_name"]) == 0
    return tuple(np.asarray(Image.open(out / f"im_00000{i}.png").convert("RGB"), dtype=np.int16) for i in (1, 2))


def test_sd1_gen_img_renders_the_token(sd1_run, tiny_model_dir, tmp_path):
    _, out, _, _ = sd1_run
    with_token, without = _gen_pair(tiny_model_dir("sd1"), out / f"{TOKEN}.safetensors", tmp_path, TOKEN)
    assert np.abs(with_token - without).max() > 0


def test_sdxl_trains_both_encoders_and_loads_in_diffusers_and_gen_img(tiny_model_dir, data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.models.loading import load_models
    from sdxl_train_textual_inversion import SdxlTextualInversionTrainer

    model = tiny_model_dir("sdxl")
    cls = capturing(SdxlTextualInversionTrainer)
    assert run_ti(ti_argv(model, data[0], tmp_path / "out", "--init_word", "dog", steps=2), sdxl=True,
                  trainer_cls=cls) == 0
    s = cls.sessions[-1]
    file = tmp_path / "out" / f"{TOKEN}.safetensors"
    sd = load_file(file)
    assert sorted(sd) == ["clip_g", "clip_l"] and sd["clip_l"].shape == (1, 32) and sd["clip_g"].shape == (1, 64)
    fresh = load_models(str(model))
    assert_same_tensors(s.model.unet.state_dict(), fresh.unet.state_dict())
    for te, old, part in zip(s.model.text_encoders, fresh.text_encoders, ("clip_l", "clip_g")):
        emb = te.get_input_embeddings()
        assert torch.equal(emb.base.weight, old.get_input_embeddings().weight)
        dog = old.get_input_embeddings().weight[fresh.tokenizers[0]("dog", add_special_tokens=False).input_ids]
        assert (sd[part] - dog).abs().max() > 0  # both encoders' vectors trained
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.load_textual_inversion(sd["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = f"a photo of {TOKEN}"
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    ours = _sdtk_hidden(model, file, prompt)
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-5)
    with_token, without = _gen_pair(model, file, tmp_path, TOKEN)
    assert np.abs(with_token - without).max() > 0


def test_templates_pt_weights_and_epoch_saves(sd1_run, data, tmp_path):
    """Captions without the token + --use_object_template; continue from the SD1 run's file; A1111's .pt."""
    from diffusers import StableDiffusionPipeline

    from library.inference.textual_inversion import read_embeddings

    model, out, _, _ = sd1_run
    start = out / f"{TOKEN}.safetensors"
    dest = tmp_path / "out"
    argv = ti_argv(model, data[1], dest, "--use_object_template", "--weights", str(start), "--num_vectors_per_token",
                   "2", "--save_model_as", "pt", "--max_train_epochs", "2", "--train_batch_size", "4",
                   "--save_every_n_epochs", "1", "--output_name", "obj")
    assert run_ti(argv) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["obj-000001.pt", "obj.pt"]
    pt = torch.load(dest / "obj.pt", weights_only=True)
    assert pt["name"] == TOKEN and pt["step"] == 2 and pt["string_to_token"] == {"*": 265}
    vec = pt["string_to_param"]["*"]
    assert vec.shape == (2, 32) and (vec - load_file(start)["emb_params"]).abs().max() > 0
    assert torch.equal(read_embeddings([str(dest / "obj.pt")], allow_pickle=True)[0].vectors[0], vec)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(dest / "obj.pt"), token="obj")
    ids = pipe.tokenizer.convert_tokens_to_ids(["obj", "obj_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vec)


def test_init_word_rows_repeat_and_tokens_follow_the_vocabulary():
    from argparse import Namespace

    from library.models.families import Family
    from library.models.tiny import tiny_loaded_model
    from library.training.targets.embeddings import EmbeddingTarget

    m = tiny_loaded_model(Family.SD1)
    tok, te = m.tokenizers[0], m.text_encoders[0]
    table = te.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([tok("a photo of a dog").input_ids])
    with torch.no_grad():
        before = te(ids)[0]
    target = EmbeddingTarget(Namespace(token_string="zq", num_vectors_per_token=3, init_word="photo", weights=None))
    target.add_tokens(m)
    photo = tok("photo", add_special_tokens=False).input_ids
    assert len(photo) == 2 and target.tables[0].ids == [len(table), len(table) + 1, len(table) + 2]
    assert target.tables[0].strings == ["zq", "zq1", "zq2"]  # kohya's names
    assert torch.equal(target.tables[0].vectors, table[[photo[0], photo[1], photo[0]]])  # repeated in turn
    with torch.no_grad():
        assert torch.equal(te(ids)[0], before)  # existing tokens encode exactly as before
        new = torch.tensor([tok("zq zq1 zq2").input_ids[1:4]])
        assert torch.equal(te.get_input_embeddings()(new)[0], target.tables[0].vectors)


def _bad(tmp_path, capsys, argv, sdxl=False) -> str:
    assert run_ti(argv + ["--console_log_level", "ERROR"], sdxl=sdxl) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert _files(tmp_path / "out") == []  # nothing written
    return err


@pytest.mark.parametrize("case, expected", [
    ("known_token", "'star' is already a token of the tokenizer"),
    ("init_word_too_long", "--init_word 'photo' is 2 tokens for the tokenizer, more than --num_vectors_per_token 1"),
    ("init_word_empty", "--init_word is empty"),
    ("weights_count", "holds 3 vectors, but --num_vectors_per_token is 1"),
    ("weights_width", "vectors of width 16, but the model's text encoder takes 32"),
    ("no_token_in_captions", "--token_string 'mychar' is in none of the 4 captions"),
    ("zero_vectors", "--num_vectors_per_token: must be >= 1, got 0"),
    ("both_templates", "--use_object_template and --use_style_template exclude each other"),
    ("sdxl_model", "use sdxl_train_textual_inversion.py for it"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, expected, tiny_model_dir, data, tmp_path, capsys):
    model = tiny_model_dir("sdxl" if case == "sdxl_model" else "sd1")
    argv = ti_argv(model, data[1] if case == "no_token_in_captions" else data[0], tmp_path / "out",
                   "--cache_latents_to_disk", steps=1)
    extra = {
        # a token of the tiny vocabulary ("star", from "stars"); templates, so the captions need not name it
        "known_token": ["--token_string", "star", "--use_object_template"],
        "init_word_too_long": ["--init_word", "photo"],
        "init_word_empty": ["--init_word", " "],
        "zero_vectors": ["--num_vectors_per_token", "0"],
        "both_templates": ["--use_object_template", "--use_style_template"],
    }.get(case, [])
    if case.startswith("weights"):
        w = tmp_path / "w.safetensors"
        save_file({"emb_params": torch.zeros((3, 32) if case == "weights_count" else (1, 16))}, str(w))
        extra = ["--weights", str(w)]
    err = _bad(tmp_path, capsys, argv + extra)
    assert expected in err, err
    if case == "no_token_in_captions":
        assert ".caption" in err and "--use_object_template" in err  # names a file and the way out
    assert not [p for d in data for p in d.rglob("*_sdtk.safetensors")]  # no latent cache written either
