"""Dynamic prompt variants (kohya's ``{a|b}``, ``{e$$...}``, ``{N-M$$sep$$...}``): parsing, kohya's
enumeration order, seeded random choices, how they meet --images_per_prompt / --n_iter / seeds,
one-line errors, and a real gen_img run whose PNGs record the resolved prompts."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from PIL import Image

import gen_img
from library.errors import ConfigError
from library.inference.dynamic_prompts import (choose, enumerate_group, expand_variants, find_groups, first_variant,
                                               image_prompts, variant_rng)
from library.inference.prompts import PromptOptions, parse_prompt, plan_images

D = PromptOptions(prompt="")


def test_group_syntax():
    g, = find_groups("x {e$$2-3$$ and $$a|b|c|d} y")
    assert (g.enumerate, g.min_count, g.max_count, g.separator) == (True, 2, 3, " and ")
    assert g.options == ("a", "b", "c", "d")
    g, = find_groups("{E$$3-1$$a|b}")  # reversed range swapped, upper bound capped at the options (kohya)
    assert (g.enumerate, g.min_count, g.max_count, g.separator) == (True, 1, 2, ", ")
    g, = find_groups("{a||b}")  # empty options are options
    assert g.options == ("a", "", "b") and (g.min_count, g.max_count) == (1, 1) and not g.enumerate
    assert find_groups("no groups | here $$") == []
    assert first_variant("a {red|blue} {2$$-$$x|y|z} --n {ugly|bad}") == "a red x-y --n ugly"


def test_enumeration_order_matches_kohya():
    # counts ascending, then itertools.combinations; several groups: the leftmost varies slowest
    g, = find_groups("{e$$1-2$$a|b|c}")
    assert enumerate_group(g) == ["a", "b", "c", "a, b", "a, c", "b, c"]
    exp = expand_variants("{e$$a|b} and {e$$x|y|z}", 5, random.Random(0))
    assert exp.enumerated and exp.prompts == ("a and x", "a and y", "a and z", "b and x", "b and y", "b and z")
    # images_per_prompt does not apply to enumerated lines; each variant once
    assert [p for p, _ in image_prompts(exp, 5)] == list(exp.prompts)


def test_random_choice_reproducible_and_covers_all_options():
    line = "a {red|green|blue} cat"
    first = expand_variants(line, 60, variant_rng(42))
    assert not first.enumerated and len(first.prompts) == 60
    assert first == expand_variants(line, 60, variant_rng(42))
    assert first != expand_variants(line, 60, variant_rng(43))
    assert set(first.prompts) == {"a red cat", "a green cat", "a blue cat"}


def test_n_of_with_separator_and_ranges():
    g, = find_groups("{2$$ + $$a|b|c}")
    rng = random.Random(0)
    picks = [choose(g, rng) for _ in range(200)]
    pairs = Counter(tuple(p.split(" + ")) for p in picks)
    assert all(len(set(p)) == 2 for p in pairs)  # distinct options, joined with the separator
    assert set(pairs) == set(itertools.permutations("abc", 2))  # random order, as kohya's random.sample
    g, = find_groups("{0-2$$a|b|c}")
    sizes = Counter(len(p.split(", ")) if p else 0 for p in (choose(g, rng) for _ in range(200)))
    assert set(sizes) == {0, 1, 2}
    g, = find_groups("{1-9$$a|b}")
    assert {choose(g, rng) for _ in range(100)} <= {"a", "b", "a, b", "b, a"}


def test_enumerated_and_random_groups_together():
    exp = expand_variants("{e$$a|b} {x|y|z}", 1, variant_rng(1))
    assert len(exp.prompts) == 2 and [p[0] for p in exp.prompts] == ["a", "b"]
    assert all(p[2] in "xyz" for p in exp.prompts)


@pytest.mark.parametrize("line,message", [
    ("a {red|blue cat", "never closed"),
    ("a red|blue} cat", "no '{' before it"),
    ("a {red|{dark|light} blue}", "cannot nest"),
    ("a {} cat", "empty group"),
    ("a {4$$red|blue|green} cat", "asks for 4 options but has only 3"),
    ("a {two$$red|blue} cat", "'two' is not a count"),
    ("a {1-2-3$$red|blue} cat", "'1-2-3' is not N or N-M"),
])
def test_malformed_syntax_is_a_one_line_error_naming_the_prompt(line, message):
    with pytest.raises(ConfigError) as e:
        plan_images(["ok", line], D, where=lambda i: f"p.txt line {i + 1}")
    text = str(e.value)
    assert "\n" not in text and text.startswith("p.txt line 2: dynamic prompt") and repr(line) in text
    assert message in text
    with pytest.raises(ConfigError, match=message):  # gen_img checks lines with parse_prompt before loading
        parse_prompt(line, D)


def test_plan_images_variants_seeds_and_rounds():
    # random variants: one choice per image, new choices every --n_iter round, reproducible from --seed
    tasks = plan_images(["a {x|y|z} --w {64|128}"], D, images_per_prompt=4, n_iter=3, seed=5)
    assert len(tasks) == 12 and [t.index for t in tasks] == [0, 1, 2, 3] * 3
    for t in tasks:  # each image parsed from its own resolved line
        assert t.options.prompt in ("a x", "a y", "a z") and t.options.width in (64, 128)
    again = plan_images(["a {x|y|z} --w {64|128}"], D, images_per_prompt=4, n_iter=3, seed=5)
    assert [(t.options, t.seed) for t in tasks] == [(t.options, t.seed) for t in again]
    assert len({t.options.prompt for t in tasks}) > 1
    # enumeration: one image per variant whatever --images_per_prompt; --d restarts for every variant (kohya)
    tasks = plan_images(["{e$$a|b|c} --d 7,8", "d"], D, images_per_prompt=2, n_iter=2, seed=0)
    assert [t.options.prompt for t in tasks] == ["a", "b", "c", "d", "d"] * 2
    assert [t.seed for t in tasks[:3]] == [7, 7, 7]
    # random variants take --d seeds in turn, as a line without variants does
    assert [t.seed for t in plan_images(["{a|b} --d 1,2,3"], D, images_per_prompt=3)] == [1, 2, 3]
    # --seed is the seed of the only image, but a line that enumerates to several images draws seeds
    assert [t.seed for t in plan_images(["{a|b}"], D, seed=9)] == [9]
    assert 9 not in [t.seed for t in plan_images(["{e$$a|b}"], D, seed=9)]
    # the choices do not move the image seeds
    plain = [t.seed for t in plan_images(["a"], D, images_per_prompt=3, seed=2)]
    assert plain == [t.seed for t in plan_images(["{a|b}"], D, images_per_prompt=3, seed=2)]


@pytest.mark.integration
def test_gen_img_enumerated_prompt_records_resolved_prompts(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    prompt = "a {e$$red|blue} {e$$cat|dog} --n {e$$1$$ugly}"
    rc = gen_img.main(["--ckpt", str(tiny_model_dir("sd1")), "--prompt", prompt,
                       "--W", "64", "--H", "64", "--steps", "2", "--seed", "3", "--images_per_prompt", "3",
                       "--batch_size", "4", "--sequential_file_name", "--outdir", str(out)])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"im_{i:06d}.png" for i in range(1, 5)]
    texts = [Image.open(f).text for f in files]
    assert [t["prompt"] for t in texts] == ["a red cat", "a red dog", "a blue cat", "a blue dog"]
    assert {t["negative-prompt"] for t in texts} == {"ugly"}
    assert len({t["seed"] for t in texts}) == 4
