"""The dataset doctor, the metadata merge tools and the standalone latent cache tool, run for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from library.data import doctor
from tests.data_fixtures import copy_photo, write_image, write_truncated_jpeg
from tools import cache_latents, check_dataset, merge_captions_to_metadata, merge_dd_tags_to_metadata

BUCKET_FLAGS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                "--bucket_reso_steps", "32", "--caption_extension", ".txt"]


@pytest.fixture
def messy(tmp_path):
    """968-images-and-1141-captions in miniature: orphans, a missing caption, a duplicate, a broken file."""
    root = tmp_path / "train"
    d = root / "5_sks"
    for name in ("astronaut", "chelsea", "rocket"):
        copy_photo(name, d, max_side=96)
    (d / "astronaut.txt").write_text("sks, woman, space suit, white background", encoding="utf-8")
    (d / "chelsea.txt").write_text("sks, cat, orange fur", encoding="utf-8")
    (d / "rocket.txt").write_text("rocket, sky, sks", encoding="utf-8")  # trigger not first
    (d / "ghost1.txt").write_text("sks, nothing", encoding="utf-8")
    (d / "ghost2.txt").write_text("sks, nothing", encoding="utf-8")
    copy_photo("chelsea", d, stem="chelsea_copy", max_side=96)  # exact duplicate, no caption
    write_image(d / "tiny.png", (20, 20))  # smaller than the smallest bucket
    (d / "tiny.txt").write_text("sks, tiny", encoding="utf-8")
    return root


def _json(capsys, argv):
    rc = check_dataset.main(argv + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_doctor_reports_everything_file_by_file(messy, capsys):
    rc, rep = _json(capsys, ["--train_data_dir", str(messy), "--keep_tokens", "1"] + BUCKET_FLAGS)
    assert rc == 0 and rep["ok"]  # only warnings
    sub = rep["datasets"][0]["subsets"][0]
    assert sub["images"] == 5 and sub["num_repeats"] == 5 and sub["effective_images"] == 25
    assert [p.rsplit("/", 1)[1] for p in sub["orphan_captions"]] == ["ghost1.txt", "ghost2.txt"]
    assert [p.rsplit("/", 1)[1] for p in sub["missing_captions"]] == ["chelsea_copy.png"]
    assert len(rep["duplicates"]) == 1 and {p.rsplit("/", 1)[1] for p in rep["duplicates"][0]} == {
        "chelsea.png", "chelsea_copy.png"}
    assert [s["path"].rsplit("/", 1)[1] for s in rep["small_images"]] == ["tiny.png"]
    # one entry per image with its size and bucket, and a histogram that adds up
    images = {i["path"].rsplit("/", 1)[1]: i for i in rep["datasets"][0]["images"]}
    assert images["chelsea.png"]["original_size"] == [96, 64] and images["chelsea.png"]["bucket"] == [64, 64]
    assert images["chelsea.png"]["resized_size"] == [96, 64] and images["tiny.png"]["scale"] == pytest.approx(3.2)
    assert sum(b["count"] for b in rep["datasets"][0]["buckets"]) == 25
    keep = rep["captions"]["keep_tokens"][0]
    assert keep["prefix"] == "sks" and keep["starting_with_prefix"] == 4 and keep["others"][0].endswith("rocket.jpg")
    assert dict(rep["captions"]["tag_frequency"])["sks"] == 5
    assert any("no tokenizer" in n for n in rep["notes"])


def test_doctor_text_output_and_strict(messy, capsys):
    assert check_dataset.main(["--train_data_dir", str(messy)] + BUCKET_FLAGS) == 0
    out = capsys.readouterr().out
    assert "ghost1.txt" in out and "caption files without an image (2)" in out and "bucket" in out
    rc, rep = _json(capsys, ["--train_data_dir", str(messy), "--strict"] + BUCKET_FLAGS)
    assert rc == 1 and any("caption files without an image" in e for e in rep["errors"])


def test_doctor_unreadable_images_exit_1(messy, capsys):
    write_truncated_jpeg(messy / "5_sks" / "broken.jpg")
    rc, rep = _json(capsys, ["--train_data_dir", str(messy)] + BUCKET_FLAGS)
    assert rc == 1 and rep["unreadable"][0]["path"].endswith("broken.jpg")


def test_doctor_bad_config_is_one_line_error(tmp_path, capsys):
    assert check_dataset.main(["--train_data_dir", str(tmp_path / "missing"), "--resolution", "64"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_token_limit_with_tokenizer_cache(messy, tmp_path, capsys):
    from library.models.families import TOKENIZER_IDS, Family
    from library.models.tiny import tiny_tokenizer
    from library.models.tokenizers import cache_folder

    cache = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(str(cache_folder(cache, TOKENIZER_IDS[Family.SD1][0][0])))
    long = ", ".join(["photo of a dog"] * 30)  # 4 tokens x 30 > 75
    (messy / "5_sks" / "chelsea.txt").write_text(long, encoding="utf-8")
    rc, rep = _json(capsys, ["--train_data_dir", str(messy), "--tokenizer_cache_dir", str(cache)] + BUCKET_FLAGS)
    over = rep["captions"]["over_limit"]
    assert len(over) == 1 and over[0]["path"].endswith("chelsea.png") and over[0]["over"] > 0
    assert over[0]["cut"] and "dog" in over[0]["cut"]


def test_similarity_stats_and_diversity_index():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=-1)
    st = doctor.similarity_stats(e, 0.95)
    assert st["captions"] == 3
    assert st["similar_share"] == pytest.approx(1 / 3, abs=1e-3)  # only the first pair is near-identical
    assert st["mean_similarity"] == pytest.approx((1.0 + 0.0 + 0.01) / 3, abs=1e-3)
    # two captions have a near twin (distance ~0), the third's nearest is at distance ~0.99
    assert st["diversity_index"] == pytest.approx(0.99 / 3, abs=1e-2)


def test_diversity_with_a_tiny_sdxl_model(messy, tiny_model_dir, capsys):
    model = tiny_model_dir("sdxl", "diffusers")
    rc, rep = _json(capsys, ["--train_data_dir", str(messy), "--pretrained_model_name_or_path", str(model),
                             "--te2_min_diversity", "2.0"] + BUCKET_FLAGS)
    assert [e["encoder"] for e in rep["embeddings"]] == ["te1", "te2"]
    for e in rep["embeddings"]:
        assert e["captions"] == 5 and -1 <= e["mean_similarity"] <= 1 and 0 <= e["diversity_index"] <= 2
    # chelsea_copy has the class tokens "sks" as caption, the others differ: a threshold of 2 must warn
    assert rep["embeddings"][1]["warnings"] and any("TE2" in w for w in rep["warnings"])
    assert rc == 0


def test_merge_tools_build_finetune_json(tmp_path, capsys):
    d = tmp_path / "imgs"
    copy_photo("coffee", d, max_side=64)
    copy_photo("rocket", d, max_side=64)
    (d / "coffee.caption").write_text("a cup of coffee\n", encoding="utf-8")
    (d / "coffee.txt").write_text("coffee, cup, table", encoding="utf-8")
    (d / "rocket.txt").write_text("rocket, sky", encoding="utf-8")
    out = tmp_path / "meta.json"
    assert merge_captions_to_metadata.main([str(d), str(out)]) == 0
    assert "no caption file for" in capsys.readouterr().err
    assert merge_dd_tags_to_metadata.main([str(d), str(out)]) == 0  # updates the existing file
    meta = json.loads(out.read_text(encoding="utf-8"))
    assert meta == {"coffee": {"caption": "a cup of coffee", "tags": "coffee, cup, table"},
                    "rocket": {"tags": "rocket, sky"}}
    assert merge_captions_to_metadata.main([str(d), str(tmp_path / "x.json"), "--recursive"]) == 1
    # the JSON trains as a fine-tuning subset
    from library.config.dataset_params import SubsetParams
    from library.data.subsets import scan_subset

    scan = scan_subset(SubsetParams(kind="finetune", image_dir=str(d), metadata_file=str(out)))
    assert not scan.errors and {e.caption for e in scan.entries} == {"a cup of coffee,coffee, cup, table", "rocket, sky"}


def test_cache_latents_tool(messy, tiny_model_dir, capsys):
    model = tiny_model_dir("sd1", "diffusers")
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(messy), "--vae_batch_size", "2",
            "--flip_aug"] + BUCKET_FLAGS
    assert cache_latents.main(argv) == 0
    assert "5 images encoded" in capsys.readouterr().out
    assert len(list((messy / "5_sks").glob("*_sdtk.safetensors"))) == 5
    assert cache_latents.main(argv + ["--skip_existing"]) == 0
    assert "0 images encoded, 5 valid" in capsys.readouterr().out
    assert cache_latents.main(argv + ["--color_aug"]) == 1
    assert "color_aug" in capsys.readouterr().err


def test_tools_run_as_scripts(repo_root, messy):
    for tool in ("check_dataset", "cache_latents", "merge_captions_to_metadata", "merge_dd_tags_to_metadata"):
        r = subprocess.run([sys.executable, str(repo_root / "tools" / f"{tool}.py"), "--help"], capture_output=True,
                           text=True, cwd=repo_root, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout
