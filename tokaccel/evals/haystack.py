"""Haystack text for the synthetic tasks, available offline on every machine.

Two kinds, both deterministic:
- "noise": RULER's repeated sentences ("The grass is green. The sky is blue. ...").
- "essay": natural English prose from the Python docs that ship with the interpreter
  (`pydoc_data.topics.topics`, topics in sorted order, code blocks and headings dropped).
  Its content depends on the Python version, which result folders record.

A haystack is handled as *units* (sentences), each tokenized once with a leading space, so that
prompts are assembled from token ids and hit an exact length; needles go between units.
"""

from __future__ import annotations

import functools
import re

from ..validation import check_number

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KINDS = ("noise", "essay")
_MAX_UNIT_WORDS = 40  # long sentences are split so a needle can be placed near any depth


def noise_sentences() -> list[str]:
    return [s + "." for s in NOISE.rstrip(".").split(". ")]


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Prose sentences of the stdlib's pydoc topics, in a fixed order."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            lines = paragraph.splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue  # code samples, grammar rules and indented lists
            if len(lines) == 2 and set(lines[1].strip()) <= set("*=-~^"):
                continue  # a heading with its underline
            text = " ".join(paragraph.split())
            if len(text) < 40 or not text[0].isalpha():
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = sentence.split()
                for start in range(0, len(words), _MAX_UNIT_WORDS):
                    sentences.append(" ".join(words[start : start + _MAX_UNIT_WORDS]))
    return tuple(sentences)


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Distinct lowercase English words (4-10 letters) of the essay text, sorted: keys, word
    values and the lists of the word-frequency tasks are drawn from it."""
    words = set()
    for sentence in essay_sentences():
        words.update(re.findall(r"\b[a-z]{4,10}\b", sentence))
    return tuple(sorted(words))


def sentences(kind: str) -> list[str] | tuple[str, ...]:
    if kind == "noise":
        return noise_sentences()
    if kind == "essay":
        return essay_sentences()
    raise ValueError(f"unknown haystack {kind!r}; valid: {', '.join(KINDS)}")


def encode_units(tokenizer, texts) -> list[list[int]]:
    """Token ids of each text with a leading space and no special tokens (batched)."""
    texts = [" " + t for t in texts]
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


_unit_cache: dict[tuple[int, str], tuple[object, list[list[int]]]] = {}


def haystack_units(tokenizer, kind: str) -> list[list[int]]:
    """All units of a haystack kind, tokenized once per tokenizer (cached)."""
    key = (id(tokenizer), kind)
    cached = _unit_cache.get(key)
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, encode_units(tokenizer, sentences(kind)))
        if len(_unit_cache) > 8:
            _unit_cache.clear()
        _unit_cache[key] = cached
    return cached[1]


def take_units(units: list[list[int]], start: int, n_tokens: int) -> list[list[int]]:
    """Units from index `start` (cycling) until they hold at least `n_tokens` tokens."""
    out, total, i = [], 0, start
    if not units:
        raise ValueError("empty haystack")
    while total < n_tokens:
        unit = units[i % len(units)]
        out.append(unit)
        total += len(unit)
        i += 1
    return out


def assemble(filler: list[list[int]], n_fill: int, inserts: list[tuple[float, list[int]]]) -> tuple[list[int], list[int], list[int]]:
    """Exactly `n_fill` filler tokens (the units in order, the last one cut at token level) with
    each insert placed at the unit boundary nearest to its depth in [0, 1].

    Returns (ids, insert_offsets, filler_offsets): where each insert starts in `ids`, and how many
    filler tokens precede it (its depth is `filler_offset / n_fill`)."""
    boundaries, total = [0], 0
    for unit in filler:
        if total + len(unit) > n_fill:
            break
        total += len(unit)
        boundaries.append(total)
    flat = [t for unit in filler for t in unit][:n_fill]
    if len(flat) < n_fill:
        raise ValueError(f"filler holds {len(flat)} tokens, {n_fill} needed")
    if boundaries[-1] != n_fill:
        boundaries.append(n_fill)
    placed = []
    for order, (depth, ids) in enumerate(inserts):
        check_number("haystack", "depth", depth, 0, 1)
        target = depth * n_fill
        at = min(boundaries, key=lambda b: (abs(b - target), b))
        placed.append((at, order, ids))
    placed.sort()
    out: list[int] = []
    offsets = [0] * len(inserts)
    filler_offsets = [0] * len(inserts)
    prev = 0
    for at, order, ids in placed:
        out.extend(flat[prev:at])
        offsets[order] = len(out)
        filler_offsets[order] = at
        out.extend(ids)
        prev = at
    out.extend(flat[prev:])
    return out, offsets, filler_offsets
