"""Prompt files, prompt-pair files, and a reproducible prompt-pair set for the shapes world.

Prompt file (plain text, UTF-8, a leading BOM is allowed): one prompt per line (lines end at
\n, \r\n or \r only: U+2028 and other Unicode separators stay inside a prompt). Leading and
trailing whitespace is stripped; blank lines and lines whose first non-blank character is '#'
are ignored (a '#' later in a line is part of the prompt). A file with no prompt left is an error.

Pair file: the same rules, and every remaining line is one pair `A || B`: exactly one `||`
separator, both sides non-empty after stripping. Used by the [EOS]-swap experiment (A's words,
B's [EOS]).

Every error is a ShapefirstError whose one-line message names the file (and the line number,
`path:line:`) and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ShapefirstError
from .outputs import check_regular_file
from .world.render import ATTRIBUTES, TEMPLATES, VALUES, Scene, sample_scenes

PAIR_SEPARATOR = "||"

# world_pairs kinds -> the attributes in which A and B differ ("both" = shape and color)
PAIR_KINDS = {
    "shape": ("shape",),
    "color": ("color",),
    "both": ("shape", "color"),
    "texture": ("texture",),
    "position": ("position",),
    "size": ("size",),
}
DEFAULT_PAIR_KINDS = ("shape", "color", "both", "texture", "position")


def _lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line that is neither blank nor a comment."""
    path = Path(path)
    if not path.exists():
        raise ShapefirstError(f"{what} file {path} does not exist", "check the path (one prompt per line, UTF-8)")
    if path.is_dir():
        raise ShapefirstError(f"{what} file {path} is a folder", "pass the path of a text file")
    check_regular_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ShapefirstError(f"cannot read {what} file {path} ({e.strerror or e})",
                              "check the file's permissions") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        line = raw[:max(e.start, bom)].count(b"\n") + 1
        raise ShapefirstError(f"{path}:{line}: {what} file is not UTF-8 (byte 0x{raw[e.start]:02x})",
                              "save the file as UTF-8 text") from e
    out = []
    for i, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        s = line.strip()
        if "\x00" in s:
            raise ShapefirstError(f"{path}:{i}: the line holds a NUL byte", "save the file as plain UTF-8 text")
        if s and not s.startswith("#"):
            out.append((i, s))
    if not out:
        fix = "write one prompt per line" if what == "prompt" else f"write one pair per line as `A {PAIR_SEPARATOR} B`"
        raise ShapefirstError(f"{what} file {path} holds no {what}s (only blank lines and # comments)", fix)
    return out


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompt file (see the module docstring), in file order."""
    return [s for _, s in _lines(path, "prompt")]


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The (A, B) pairs of a pair file: one `A || B` per line (see the module docstring)."""
    pairs = []
    for i, s in _lines(path, "pair"):
        n_sep = s.count(PAIR_SEPARATOR)
        if n_sep != 1:
            problem = "has no" if n_sep == 0 else f"has {n_sep}"
            raise ShapefirstError(f"{path}:{i}: pair line {problem} `{PAIR_SEPARATOR}` separator (needs exactly one)",
                                  f"write the line as `prompt A {PAIR_SEPARATOR} prompt B`")
        a, b = (x.strip() for x in s.split(PAIR_SEPARATOR))
        if not a or not b:
            side = "left (A)" if not a else "right (B)"
            raise ShapefirstError(f"{path}:{i}: the {side} side of the pair is empty",
                                  f"write a prompt on both sides of `{PAIR_SEPARATOR}`")
        pairs.append((a, b))
    return pairs


def world_pairs(n: int, seed: int = 0, kinds=DEFAULT_PAIR_KINDS, template: int | None = None) -> list[dict]:
    """n reproducible prompt pairs of the shapes world whose scenes differ in exactly the
    attributes of their kind ("shape", "color", "both" = shape and color, "texture", "position",
    "size"); kinds cycle over the pairs (pair i has kinds[i % len(kinds)]).

    A is a held-out scene (`render.sample_scenes(n, seed, split="test")`); B is A with the kind's
    attributes changed to other values drawn at random. B is usually a training combination: the
    held-out rule (a weighted index sum mod 8) makes every single-attribute change of a held-out
    combination a training one, so "test" for both sides is impossible. A and B use the same
    caption template (random per pair unless `template` is given), so their words differ only in
    the changed attribute words and, in the shapes world's vocabulary (one token per word; the
    five position phrases all have three words), their token counts are equal.

    Returns dicts {"a", "b", "labels_a", "labels_b", "kind", "template"}."""

    if int(n) != n or n < 1:
        raise ShapefirstError(f"number of pairs {n} is not a positive integer", "pass e.g. n=40")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in PAIR_KINDS]
    if not kinds or unknown:
        raise ShapefirstError(f"unknown pair kinds {unknown or '(none given)'}",
                              f"use some of {', '.join(PAIR_KINDS)}")
    if template is not None and template not in range(len(TEMPLATES)):
        raise ShapefirstError(f"template {template} does not exist", f"pass 0..{len(TEMPLATES) - 1} or None")
    scenes = sample_scenes(int(n), seed, split="test")
    rng = np.random.default_rng([int(seed), 0x5EED])
    out = []
    for i, a in enumerate(scenes):
        kind = kinds[i % len(kinds)]
        labels_b = a.labels()
        for attr in PAIR_KINDS[kind]:
            others = [v for v in VALUES[attr] if v != labels_b[attr]]
            labels_b[attr] = others[int(rng.integers(len(others)))]
        t = int(rng.integers(len(TEMPLATES))) if template is None else int(template)
        b = Scene(**{k: labels_b[k] for k in ATTRIBUTES}, dx=a.dx, dy=a.dy, ds=a.ds)
        out.append({"a": a.caption(t), "b": b.caption(t), "labels_a": a.labels(), "labels_b": b.labels(),
                    "kind": kind, "template": t})
    return out
