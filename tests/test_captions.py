"""Caption processing follows kohya's process_caption, with randomness only from the given rng."""

from __future__ import annotations

import random

import pytest

from library.config.dataset_params import SubsetParams
from library.data.captions import process_caption, read_caption_file, warmup_step_count
from library.errors import DatasetError


def sub(**kw) -> SubsetParams:
    return SubsetParams(kind="dreambooth", **kw)


def run(caption: str, subset: SubsetParams, seed: int = 0, epoch: int = 1, step: int = 0, max_steps: int | None = 100):
    return process_caption(caption, subset, epoch=epoch, step=step, max_steps=max_steps, rng=random.Random(seed))


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",")]


CAPTION = "sks dog, red collar, grass, sunny day, outdoors, looking at viewer"


def test_plain_caption_is_unchanged_and_uses_first_line():
    assert run(CAPTION, sub()) == CAPTION
    assert run("first line\nsecond line", sub()) == "first line"


def test_prefix_and_suffix():
    assert run("a dog", sub(caption_prefix="sks", caption_suffix="photo")) == "sks a dog photo"


def test_shuffle_keeps_first_keep_tokens_and_is_seeded():
    s = sub(shuffle_caption=True, keep_tokens=1)
    outs = {run(CAPTION, s, seed=k) for k in range(20)}
    assert len(outs) > 5  # really shuffled
    for out in outs:
        assert tags(out)[0] == "sks dog"
        assert sorted(tags(out)) == sorted(tags(CAPTION))
    assert run(CAPTION, s, seed=3) == run(CAPTION, s, seed=3)


def test_shuffle_is_a_shuffle_of_the_flexible_tags_with_the_rng():
    # kohya: random.shuffle(flex_tokens) -- here the same call on the rng that is passed in
    flex = tags(CAPTION)[2:]
    random.Random(7).shuffle(flex)
    assert run(CAPTION, sub(shuffle_caption=True, keep_tokens=2), seed=7) == ", ".join(tags(CAPTION)[:2] + flex)


def test_keep_tokens_separator_fixed_prefix_and_suffix():
    s = sub(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "sks, dog ||| red, blue, green, white ||| masterpiece, best quality"
    for seed in range(10):
        out = tags(run(caption, s, seed=seed))
        assert out[:2] == ["sks", "dog"]  # keep_tokens is ignored when the separator is present
        assert out[-2:] == ["masterpiece", "best quality"]
        assert sorted(out[2:-2]) == ["blue", "green", "red", "white"]
    # the separator is absent: keep_tokens applies
    out = tags(run("a, b, c, d, e, f", s, seed=1))
    assert len(out) == 6 and out[:5] == ["a", "b", "c", "d", "e"]


def test_secondary_separator_keeps_groups_together():
    s = sub(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(10):
        out = run("black;;;white dress, hat, shoes", s, seed=seed)
        assert "black,white dress" in out


def test_wildcards_and_escaped_braces():
    s = sub(enable_wildcard=True)
    outs = {run("a {red|blue|green} dog {{literal}}", s, seed=k) for k in range(30)}
    assert outs == {f"a {c} dog {{literal}}" for c in ("red", "blue", "green")}
    # multi-line captions: one line per step
    assert {run("line one\nline two", s, seed=k) for k in range(30)} == {"line one", "line two"}
    # without enable_wildcard nothing is expanded
    assert run("a {red|blue} dog", sub()) == "a {red|blue} dog"


def test_caption_dropout_rate():
    assert run(CAPTION, sub(caption_dropout_rate=1.0)) == ""
    dropped = sum(run(CAPTION, sub(caption_dropout_rate=0.3), seed=k) == "" for k in range(1000))
    assert 240 < dropped < 360
    # deterministic per seed: the first draw of the rng decides
    for k in range(20):
        assert (run(CAPTION, sub(caption_dropout_rate=0.3), seed=k) == "") == (random.Random(k).random() < 0.3)


def test_caption_dropout_every_n_epochs():
    s = sub(caption_dropout_every_n_epochs=2)
    assert [run(CAPTION, s, epoch=e) == "" for e in (1, 2, 3, 4)] == [False, True, False, True]


def test_tag_dropout_only_touches_flexible_tags():
    assert run(CAPTION, sub(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "sks dog"
    outs = [tags(run(CAPTION, sub(caption_tag_dropout_rate=0.5, keep_tokens=1), seed=k)) for k in range(50)]
    assert all(o[0] == "sks dog" for o in outs)
    assert 1 < sum(len(o) for o in outs) / 50 < 6
    # without shuffle, the order is kept
    assert all(o == [t for t in tags(CAPTION) if t in o] for o in outs)


def test_token_warmup():
    s = sub(token_warmup_min=1, token_warmup_step=4)
    caption = "a, b, c, d, e"
    # tags = floor(step * (5 - 1) / 4) + 1
    assert [run(caption, s, step=k) for k in range(5)] == ["a", "a, b", "a, b, c", "a, b, c, d", caption]
    # fractional warm-up: 0.5 of 8 steps = 4 steps
    frac = sub(token_warmup_min=1, token_warmup_step=0.5)
    assert run(caption, frac, step=2, max_steps=8) == "a, b, c"
    assert warmup_step_count(0.5, 8) == 4 and warmup_step_count(10, None) == 10
    # a fractional warm-up is counted exactly: 0.29 of 100 steps is 29 (floor(0.29 * 100) is 28 in floats)
    assert warmup_step_count(0.29, 100) == 29
    assert run("a, b, c, d", sub(token_warmup_min=1, token_warmup_step=0.29), step=28, max_steps=100) == "a, b, c"
    # keep_tokens are always there; warm-up counts the flexible tags
    assert run(caption, sub(keep_tokens=2, token_warmup_min=1, token_warmup_step=4), step=0) == "a, b, c"


def test_empty_tags_are_kept_like_kohya():
    out = run("a,,b", sub(shuffle_caption=True), seed=1)
    assert sorted(t.strip() for t in out.split(",")) == ["", "a", "b"]


def test_read_caption_file(tmp_path):
    p = tmp_path / "img.txt"
    p.write_bytes("\ufeffsks dog, grass \n\n  second line\n".encode("utf-8"))
    assert read_caption_file(p) == "sks dog, grass\nsecond line"
    p.write_bytes("caf\u00e9".encode("utf-8"))
    assert read_caption_file(p) == "caf\u00e9"
    p.write_bytes(b"")
    assert read_caption_file(p) == ""


def test_undecodable_caption_file_names_the_file(tmp_path):
    p = tmp_path / "bad.caption"
    p.write_bytes("café, dog".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"bad\.caption is not valid UTF-8.*re-save it as UTF-8"):
        read_caption_file(p)


def test_missing_caption_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read caption file"):
        read_caption_file(tmp_path / "nope.txt")
