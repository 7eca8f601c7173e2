"""kohya's dynamic prompt variants for gen_img: ``{a|b|c}``, ``{e$$a|b}``, ``{N-M$$sep$$a|b}``.

The syntax and its meaning follow kohya sd-scripts' gen_img (``handle_dynamic_prompt_variants``):

- ``{a|b|c}``: one option, at random, for each image.
- ``{N$$a|b|c}``: N distinct options in random order, joined with ``", "``.
- ``{N-M$$a|b|c}``: a random count between N and M (either order), then as above. M larger than
  the number of options means "up to all of them"; N may be 0 (possibly nothing).
- ``{N$$sep$$a|b|c}`` (or ``{N-M$$sep$$...}``): joined with ``sep`` instead of ``", "``.
- ``{e$$...}`` (or ``E$$``, before the count): enumerate. Every combination becomes its own
  prompt: counts ascending, and for each count the combinations in the order of the options
  (``itertools.combinations``). Several enumerated groups multiply, the leftmost varying slowest;
  random groups in an enumerated line are drawn once per resulting prompt.
- Options may be empty (``{|red }hat``); a group with one option is just that text.
- Groups apply to the whole prompt line, its inline options included (``--n {a|b}``).

Where kohya silently does something else, sdtk stops with a one-line error naming the prompt:
unbalanced or nested braces (kohya does not nest: ``{a|{b|c}}`` would end at the first ``}``),
``{}``, a count that is not ``N`` or ``N-M``, a separator without a count (kohya takes
``{x$$a|b}`` as separator ``x`` with count 1, which never uses it), and a count larger than the
number of options (kohya fails or renders nothing). There is no escape for literal braces (as in
kohya).

The choices come from a :class:`random.Random` of their own, seeded from ``--seed`` (kohya uses
the global ``random`` module, also seeded by ``--seed``, interleaved with its seed draws): the
same ``--seed`` gives the same choices, and the image seeds do not depend on the choices.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from library.errors import ConfigError

DEFAULT_SEPARATOR = ", "
_ENUM = re.compile(r"[eE]\$\$")
_COUNT = re.compile(r"([\d-]+)\$\$")  # kohya: digits and dashes before "$$" are a count
_SEPARATOR = re.compile(r"([^|]+?)\$\$")  # the shortest text without "|" before "$$"
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class VariantGroup:
    """One ``{...}`` group of a prompt line.

    Attributes:
        start, end: its span in the line (``line[start:end]`` is the group with its braces).
        enumerate: ``e$$`` was given: every combination is its own prompt.
        min_count, max_count: how many options one replacement joins (``max_count`` is at most
            the number of options).
        separator: what joins them.
        options: the ``|``-separated texts.
    """

    start: int
    end: int
    enumerate: bool
    min_count: int
    max_count: int
    separator: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Expansion:
    """A prompt line with its groups replaced: ``prompts`` (one, or one per image/variant)."""

    prompts: tuple[str, ...]
    enumerated: bool


def _fail(where: str, line: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: dynamic prompt {line!r}: {what}")


def _parse_group(body: str, start: int, end: int, line: str, where: str) -> VariantGroup:
    text = line[start:end]
    rest, enum = body, False
    if _ENUM.match(rest):
        rest, enum = rest[3:], True
    lo = hi = 1
    count = _COUNT.match(rest)
    if count:
        m = _RANGE.fullmatch(count.group(1))
        if not m:
            raise _fail(where, line, f"{text}: count {count.group(1)!r} is not N or N-M (e.g. {{2$$a|b|c}}, "
                                     "{1-3$$a|b|c})")
        lo, hi = sorted((int(m.group(1)), int(m.group(2) or m.group(1))))
        rest = rest[count.end():]
    separator = DEFAULT_SEPARATOR
    sep = _SEPARATOR.match(rest)
    if sep:
        if not count:
            raise _fail(where, line, f"{text}: {sep.group(1)!r} is not a count; write {{N$$a|b}} or "
                                     "{N-M$$a|b}, and a separator only after the count: {N$$sep$$a|b}")
        separator, rest = sep.group(1), rest[sep.end():]
    if not rest:
        raise _fail(where, line, f"{text} has no options after '$$'")
    options = tuple(rest.split("|"))
    if lo > len(options):
        raise _fail(where, line, f"{text} asks for {lo} options but has only {len(options)}")
    return VariantGroup(start, end, enum, lo, min(hi, len(options)), separator, options)


def find_groups(line: str, where: str = "--prompt") -> list[VariantGroup]:
    """The variant groups of ``line``, left to right.

    Raises:
        ConfigError: unbalanced, nested or empty braces, or a malformed group (naming ``where``
            and the line).
    """
    groups: list[VariantGroup] = []
    i = 0
    while i < len(line):
        opening, closing = line.find("{", i), line.find("}", i)
        if opening < 0 and closing < 0:
            break
        if opening < 0 or 0 <= closing < opening:
            raise _fail(where, line, f"'}}' at position {closing} has no '{{' before it")
        nxt_close, nxt_open = line.find("}", opening + 1), line.find("{", opening + 1)
        if nxt_close < 0:
            raise _fail(where, line, f"'{{' at position {opening} is never closed with '}}'")
        if 0 <= nxt_open < nxt_close:
            raise _fail(where, line, f"nested '{{' at position {nxt_open}; variant groups cannot nest")
        if nxt_close == opening + 1:
            raise _fail(where, line, f"empty group '{{}}' at position {opening}")
        groups.append(_parse_group(line[opening + 1:nxt_close], opening, nxt_close + 1, line, where))
        i = nxt_close + 1
    return groups


def enumerate_group(group: VariantGroup) -> list[str]:
    """Every replacement of ``group`` in kohya's order: counts ascending, then ``itertools.combinations``."""
    return [group.separator.join(c) for k in range(group.min_count, group.max_count + 1)
            for c in itertools.combinations(group.options, k)]


def choose(group: VariantGroup, rng: random.Random) -> str:
    """One random replacement: a count in ``[min_count, max_count]``, then that many distinct options
    in random order (kohya: ``randint`` then ``sample``)."""
    k = rng.randint(group.min_count, group.max_count)
    return group.separator.join(rng.sample(group.options, k))


def substitute(line: str, groups: list[VariantGroup], values: list[str]) -> str:
    """``line`` with each group replaced by the value at the same position."""
    out, pos = [], 0
    for g, v in zip(groups, values):
        out += [line[pos:g.start], v]
        pos = g.end
    return "".join(out) + line[pos:]


def expand_variants(line: str, images_per_prompt: int, rng: random.Random, where: str = "--prompt") -> Expansion:
    """kohya's expansion of one prompt line (done anew for every ``--n_iter`` round).

    Without groups: the line itself. Without enumerated groups: ``images_per_prompt`` prompts, each
    with its own random choices. With enumerated groups: one prompt per combination of their
    replacements (``images_per_prompt`` does not apply), the random groups drawn for each.

    Raises:
        ConfigError: malformed groups (see :func:`find_groups`).
    """
    groups = find_groups(line, where)
    if not groups:
        return Expansion((line,), False)
    if not any(g.enumerate for g in groups):
        return Expansion(tuple(substitute(line, groups, [choose(g, rng) for g in groups])
                               for _ in range(images_per_prompt)), False)
    combos = list(itertools.product(*[enumerate_group(g) for g in groups if g.enumerate]))
    # kohya draws the random groups group by group, each for every prompt in turn
    drawn = {gi: [choose(g, rng) for _ in combos] for gi, g in enumerate(groups) if not g.enumerate}
    prompts = []
    for ci, combo in enumerate(combos):
        enumerated = iter(combo)
        values = [next(enumerated) if g.enumerate else drawn[gi][ci] for gi, g in enumerate(groups)]
        prompts.append(substitute(line, groups, values))
    return Expansion(tuple(prompts), True)


def image_prompts(expansion: Expansion, images_per_prompt: int) -> list[tuple[str, int]]:
    """The line's images as ``(prompt line, index into its --d seeds)``, kohya's way.

    One prompt gives ``images_per_prompt`` images of it; several give one image each. Enumerated
    variants each start the ``--d`` list again (kohya parses each as its own prompt, so
    ``--d 7`` renders every variant with seed 7); random variants take the seeds in turn as a
    line without variants does (kohya restarts the list there too, which makes ``--d 1,2,3``
    give seed 1 to every image; sdtk does not copy that).
    """
    if len(expansion.prompts) == 1:
        return [(expansion.prompts[0], i) for i in range(images_per_prompt)]
    return [(p, 0 if expansion.enumerated else i) for i, p in enumerate(expansion.prompts)]


def first_variant(line: str, where: str = "--prompt") -> str:
    """``line`` with every group replaced by its first enumerated value (a check without randomness).

    Raises:
        ConfigError: malformed groups.
    """
    groups = find_groups(line, where)
    return substitute(line, groups, [enumerate_group(g)[0] for g in groups]) if groups else line


def variant_rng(seed: int | None) -> random.Random:
    """The generator of the random choices: seeded from ``--seed`` (apart from the image seeds), or
    from the OS when there is none."""
    return random.Random(f"sdtk dynamic prompts {seed}") if seed is not None else random.Random()
