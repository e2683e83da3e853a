"""Synthetic long-context tasks, built as token ids of an exact length for a given tokenizer.

A prompt is `head + context + tail`:
- head: chat template up to the user message (chat models) or BOS (base models), then the
  task's instruction;
- context: haystack units with needles between them, cut at token level to the exact budget;
- tail: the question, the end of the chat template (`add_generation_prompt=True`) and an answer
  prefix that starts the assistant turn (base models: question + " " + answer prefix).

Segments are tokenized separately and concatenated, so `len(prompt) == length` holds exactly.
They split at whitespace, so for both embedded tokenizers re-tokenizing the decoded prompt gives
the same ids (tested; the only exceptions seen are equal-length re-splits of fwe's dot runs).
Several questions on one context share `context_ids`, so the runner prefills the context once
(`niah_multiquery_sep`; RULER's `niah_multiquery` asks all keys in one question).

Tasks (RULER names, arXiv 2404.06654; RULER's few-shot examples for vt/cwe are omitted):
passkey, niah_single_1/2/3 (alias niah_single = _2), niah_single_word, niah_multikey_1/2/3
(alias niah_multikey = _1), niah_multivalue, niah_multiquery, niah_multiquery_sep, vt, cwe, fwe,
and ppl (a plain document for `perplexity`). Options override a task's parameters:
"niah_single:haystack=noise,value=uuids,max_new_tokens=48".
"""

from __future__ import annotations

import dataclasses
import random
import string
import uuid

from ..validation import check_int
from . import haystack
from .samples import PromptFormat, Question, Sample, Task

# ---------------------------------------------------------------- task registry


def _niah(name, desc, haystack_kind="essay", key="words", value="numbers", keys=1, values=1, queries=1, separate=False, tokens=24):
    params = dict(haystack=haystack_kind, key=key, value=value, num_keys=keys, num_values=values, num_queries=queries, separate_questions=separate)
    return Task(name, "niah", "string_match_all", tokens, desc, params, has_depth=True)


SYNTHETIC: dict[str, Task] = {
    t.name: t
    for t in (
        Task("passkey", "passkey", "first_int_match", 8, "5-digit pass key in repeated noise", {"haystack": "noise", "digits": 5}, has_depth=True),
        _niah("niah_single_1", "one needle (word key, 7-digit value) in noise", haystack_kind="noise"),
        _niah("niah_single_2", "one needle (word key, 7-digit value) in essay text"),
        _niah("niah_single_3", "one needle (word key, UUID value) in essay text", value="uuids", tokens=48),
        _niah("niah_single_word", "one needle (word key, word value) in essay text", value="words"),
        _niah("niah_multikey_1", "target needle + 3 distractor needles in essay text", keys=4),
        _niah("niah_multikey_2", "target needle in a haystack made of distractor needles", haystack_kind="needle"),
        _niah("niah_multikey_3", "UUID key and value in a haystack of UUID needles", haystack_kind="needle", key="uuids", value="uuids", tokens=48),
        _niah("niah_multivalue", "4 values for one key, all asked", values=4, tokens=64),
        _niah("niah_multiquery", "4 keys asked in one question", keys=4, queries=4, tokens=64),
        _niah("niah_multiquery_sep", "4 keys, one question each on the same context (prefilled once)", keys=4, queries=4, separate=True),
        Task("vt", "vt", "string_match_all", 30, "variable tracking: a chain of 4 hops in noise", {"haystack": "noise", "num_chains": 1, "num_hops": 4}),
        Task("cwe", "cwe", "string_match_all", 120, "the 10 most common words of a numbered list", {"num_common": 10, "freq_common": 30, "freq_uncommon": 3}),
        Task("fwe", "fwe", "string_match_all", 50, "the 3 most frequent coded words (Zipf, alpha=2)", {"alpha": 2.0, "vocab": 1000}),
        Task("ppl", "ppl", "ppl", 0, "perplexity of the last eval_len tokens of essay text, fed eval_chunk at a time",
             {"eval_len": 128, "eval_chunk": 1}),
    )
}
ALIASES = {"niah_single": "niah_single_2", "niah_multikey": "niah_multikey_1", "niah": "niah_single_2"}


def task_names() -> list[str]:
    return sorted(SYNTHETIC) + sorted(ALIASES)


def get_task(spec: str | Task) -> Task:
    """A Task from "name", "name:key=value,..." or "longbench:<dataset>" / "infbench:<task>"."""
    if isinstance(spec, Task):
        return spec
    from ..registry import parse_spec

    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if prefix in ("longbench", "infbench"):
        from . import loaders

        dataset, _, options = rest.partition(":")
        task = loaders.dataset_task(prefix, dataset)
        _, opts = parse_spec("x:" + options) if options else ("", {})
    else:
        name, opts = parse_spec(spec)
        name = ALIASES.get(name, name)
        if name not in SYNTHETIC:
            raise ValueError(f"unknown task {name!r}; valid: {', '.join(task_names())}, longbench:<dataset>, infbench:<task>")
        task = SYNTHETIC[name]
    if not opts:
        return dataclasses.replace(task, spec=task.name)
    top = {k: opts.pop(k) for k in ("metric", "max_new_tokens") if k in opts}
    unknown = sorted(set(opts) - set(task.params))
    if unknown:
        raise ValueError(f"task {task.name}: unknown option(s) {unknown}; valid: {sorted(task.params) + ['max_new_tokens', 'metric']}")
    canonical = task.name + ":" + ",".join(f"{k}={v}" for k, v in sorted({**opts, **top}.items()))
    return dataclasses.replace(task, params={**task.params, **opts}, spec=canonical, **top)


def default_depths(n: int) -> list[float]:
    """Evenly spaced needle depths 0, 1/(n-1), ..., 1 (0.5 for one sample)."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def make_samples(task: str | Task, tokenizer, length: int, n: int, seed: int = 0, chat: bool | None = None,
                 depths: list[float] | None = None, data_dirs: dict | None = None) -> list[Sample]:
    """`n` samples of `task` whose prompts are exactly `length` tokens (dataset tasks: at most)."""
    task = get_task(task)
    if task.kind in ("longbench", "infbench"):
        from . import loaders

        return loaders.dataset_samples(task, tokenizer, length, n, chat=chat, data_dirs=data_dirs)
    fmt = PromptFormat(tokenizer, chat)
    depths = depths or default_depths(n)
    if len(depths) != n:
        raise ValueError(f"{len(depths)} depths for {n} samples")
    builder = _BUILDERS[task.kind]
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}/{task.spec or task.name}/{length}/{i}")
        sample = builder(task, fmt, length, rng, depths[i])
        sample.index = i
        out.append(sample)
    return out


# ---------------------------------------------------------------- random values


def _word_key(rng: random.Random) -> str:
    pool = haystack.word_pool()
    return f"{rng.choice(pool)}-{rng.choice(pool)}"


def _random_value(kind: str, rng: random.Random, digits: int = 7) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if kind == "words":
        return _word_key(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value type {kind!r}; valid: numbers, words, uuids")


def _distinct(make, n: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        value = make()
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _budget(length: int, *parts) -> int:
    used = sum(len(p) for p in parts)
    if used > length:
        raise ValueError(f"length {length} is too short: the prompt needs at least {used} tokens without haystack")
    return length - used


def _filler(kind: str, fmt: PromptFormat, rng: random.Random, n_tokens: int, make_needle=None) -> list[list[int]]:
    """Haystack units holding at least n_tokens tokens, starting at a seeded offset."""
    if kind == "needle":  # a haystack of distractor needles, generated for this sample
        units: list[list[int]] = []
        total = 0
        while total < n_tokens:
            batch = haystack.encode_units(fmt.tokenizer, [make_needle() for _ in range(64)])
            units.extend(batch)
            total += sum(map(len, batch))
        return units
    units = haystack.haystack_units(fmt.tokenizer, kind)
    return haystack.take_units(units, rng.randrange(len(units)), n_tokens)


# ---------------------------------------------------------------- builders


def _build_passkey(task: Task, fmt: PromptFormat, length: int, rng: random.Random, depth: float) -> Sample:
    key = _random_value("numbers", rng, task.params.get("digits", 5))
    pre = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\n"
    head, tail = fmt.head_tail(pre, "\n\nWhat is the pass key?", "The pass key is")
    needle = fmt.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    n_fill = _budget(length, head, tail, needle)
    ctx, _, at = haystack.assemble(_filler(task.params["haystack"], fmt, rng, n_fill), n_fill, [(depth, needle)])
    return Sample(task.name, 0, head + ctx, [Question(tail, [key])], task.metric, task.max_new_tokens,
                  depth=at[0] / max(n_fill, 1), info={"needle": f"The pass key is {key}."})


def _niah_text(type_v: str, query: str, single: bool) -> tuple[str, str, str]:
    templates = (
        "Some special magic {t} are hidden within the following text. Make sure to memorize it. I will quiz you about the {t} afterwards.\n",
        "\nWhat are all the special magic {t} for {q} mentioned in the provided text?",
        "The special magic {t} for {q} mentioned in the provided text are",
    )
    if single:  # RULER's singular wording for one answer
        templates = tuple(t.replace("Some", "A").replace("are all", "is").replace("are", "is") for t in templates)
        type_v = type_v[:-1]
    return tuple(t.format(t=type_v, q=query) for t in templates)


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _build_niah(task: Task, fmt: PromptFormat, length: int, rng: random.Random, depth: float) -> Sample:
    p = task.params
    type_k, type_v = p["key"], p["value"]
    num_queries = p["num_queries"]
    num_keys = max(p["num_keys"], num_queries)
    taken: set = set()

    def make_key() -> str:
        return _random_value(type_k, rng)

    def question(keys: list[str]):
        single = len(keys) * p["num_values"] == 1
        return _niah_text(type_v, _join_keys(keys), single)

    keys = _distinct(make_key, 1, taken)
    if p["separate_questions"]:
        # every question's tail must have the same length so all prompts are exactly `length`
        want = len(fmt.head_tail(*question(keys))[1])
        for _ in range(10_000):
            if len(keys) == num_queries:
                break
            cand = make_key()
            if cand not in taken and len(fmt.head_tail(*question([cand]))[1]) == want:
                taken.add(cand)
                keys.append(cand)
        else:
            raise RuntimeError("could not find keys with equal question lengths")
    keys += _distinct(make_key, num_keys - len(keys), taken)
    values = [_distinct(lambda: _random_value(type_v, rng), p["num_values"], taken) for _ in keys]
    queried = keys[:num_queries]
    answers = [v for k, vs in zip(keys, values) for v in vs if k in queried]

    def needle_text(k, v):
        return f"One of the special magic {type_v} for {k} is: {v}."

    needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
    needle_ids = haystack.encode_units(fmt.tokenizer, [needle_text(k, v) for k, v in needles])
    # the first needle (queried key, first value) goes at the asked depth, the others at random depths
    inserts = [(depth if i == 0 else rng.random(), ids) for i, ids in enumerate(needle_ids)]

    if p["separate_questions"]:
        parts = [fmt.head_tail(*question([k])) for k in queried]
        head = parts[0][0]
        questions = [Question(tail, vs) for (_, tail), vs in zip(parts, values[:num_queries])]
    else:
        pre, post, answer = question(queried)
        head, tail = fmt.head_tail(pre, post, answer)
        questions = [Question(tail, answers)]
    n_fill = _budget(length, head, max((q.ids for q in questions), key=len), *needle_ids)

    def distractor():
        return needle_text(_distinct(make_key, 1, set(taken))[0], _random_value(type_v, rng))

    filler = _filler(p["haystack"], fmt, rng, n_fill, make_needle=distractor)
    ctx, _, at = haystack.assemble(filler, n_fill, inserts)
    return Sample(task.name, 0, head + ctx, questions, task.metric, task.max_new_tokens, depth=at[0] / max(n_fill, 1),
                  info={"needles": [needle_text(k, v) for k, v in needles], "keys": queried})


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _build_vt(task: Task, fmt: PromptFormat, length: int, rng: random.Random, depth: float) -> Sample:
    p = task.params
    taken: set = set()
    chains, values = [], _distinct(lambda: _random_value("numbers", rng, 5), p["num_chains"], set())
    for value in values:
        names = _distinct(lambda: _var_name(rng), p["num_hops"] + 1, taken)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(p["num_hops"])]
        chains.append((names, chain))
    statements = [s for _, chain in chains for s in chain]
    statement_ids = haystack.encode_units(fmt.tokenizer, statements)
    answers, value = chains[0][0], values[0]
    pre = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    post = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    answer = f"Answer: According to the chain(s) of variable assignment in the text above, {len(answers)} variables are assigned the value {value}, they are:"
    head, tail = fmt.head_tail(pre, post, answer)
    n_fill = _budget(length, head, tail, *statement_ids)
    # each chain in order, at sorted random depths
    inserts = []
    for names, chain in chains:
        depths = sorted(rng.random() for _ in chain)
        inserts += list(zip(depths, statement_ids[len(inserts) : len(inserts) + len(chain)]))
    ctx, _, _ = haystack.assemble(_filler(p["haystack"], fmt, rng, n_fill), n_fill, inserts)
    return Sample(task.name, 0, head + ctx, [Question(tail, answers)], task.metric, task.max_new_tokens,
                  info={"value": value, "chain": chains[0][1]})


def _cut_fill(pieces: list[list[int]], n_tokens: int, spare: list[int]) -> list[int]:
    """Concatenate pieces and top up with the start of `spare` to exactly n_tokens."""
    out = [t for piece in pieces for t in piece]
    if len(out) > n_tokens:
        raise ValueError("pieces exceed the budget")
    extra = n_tokens - len(out)
    while len(spare) < extra:
        spare = spare + spare
    return out + spare[:extra]


def _build_cwe(task: Task, fmt: PromptFormat, length: int, rng: random.Random, depth: float) -> Sample:
    p = task.params
    k = p["num_common"]
    pre = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    post = f"\nQuestion: What are the {k} most common words in the above list?"
    answer = f"Answer: The top {k} words that appear most often in the list are:"
    head, tail = fmt.head_tail(pre, post, answer)
    budget = _budget(length, head, tail)
    words = list(haystack.word_pool())
    rng.shuffle(words)
    word_ids = dict(zip(words, haystack.encode_units(fmt.tokenizer, words)))
    mean_word = sum(map(len, word_ids.values())) / len(word_ids)
    est_entries = max(k + 1, int(budget / (mean_word + 3)))
    numbers = haystack.encode_units(fmt.tokenizer, [f"{i}." for i in range(1, 2 * est_entries + 10)])
    common, uncommon = words[:k], words[k:-1]
    # RULER: common words 30x, others 3x; scaled down for short lists, and more repeats when the
    # list needs more distinct words than the pool has
    freq_u = max(1 if est_entries < 4 * k * 3 else p["freq_uncommon"], -(-est_entries // len(uncommon)))
    freq_c = max(freq_u + 2, min(p["freq_common"], int(0.3 * est_entries / k)))
    shuffle_seed = rng.random()

    def entries(n_entries: int) -> list[str]:
        n_unc = max(0, n_entries - k * freq_c)
        distinct = -(-n_unc // freq_u)
        items = common * freq_c + (uncommon[:distinct] * freq_u)[:n_unc]
        random.Random(f"{shuffle_seed}/{n_entries}").shuffle(items)
        return items

    def cost(items: list[str]) -> int:
        return sum(len(numbers[i]) + len(word_ids[w]) for i, w in enumerate(items))

    lo, hi = k * freq_c, min(len(numbers) - 1, k * freq_c + freq_u * len(uncommon))
    if cost(entries(lo)) > budget:
        raise ValueError(f"length {length} is too short for {task.name}")
    while lo < hi:  # largest entry count that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(entries(mid)) <= budget else (lo, mid - 1)
    items = entries(lo)
    pieces = [numbers[i] + word_ids[w] for i, w in enumerate(items)]
    spare = numbers[len(items)] + word_ids[words[-1]]  # a partial extra entry fills the last tokens
    ctx = _cut_fill(pieces, budget, spare)
    return Sample(task.name, 0, head + ctx, [Question(tail, common)], task.metric, task.max_new_tokens,
                  info={"freq_common": freq_c, "freq_uncommon": freq_u, "entries": len(items)})


def _build_fwe(task: Task, fmt: PromptFormat, length: int, rng: random.Random, depth: float) -> Sample:
    p = task.params
    pre = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. "
    post = "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
    answer = "Answer: According to the coded text above, the three most frequently appeared words are:"
    head, tail = fmt.head_tail(pre, post, answer)
    budget = _budget(length, head, tail)
    vocab = ["...."] + _distinct(lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(6)), p["vocab"], set())
    vocab_ids = haystack.encode_units(fmt.tokenizer, vocab)
    weights = [1.0 / (r**p["alpha"]) for r in range(1, len(vocab) + 1)]
    for _ in range(50):  # resample until the top 3 (dots excluded) are unambiguous
        picks, total = [], 0
        while total < budget:
            batch = rng.choices(range(len(vocab)), weights=weights, k=256)
            for i in batch:
                if total >= budget:
                    break
                picks.append(i)
                total += len(vocab_ids[i])
        whole = picks[:-1] if total > budget else picks
        counts = sorted(((c, i) for i, c in _count(whole).items() if i != 0), reverse=True)
        if len(counts) >= 3 and (len(counts) == 3 or counts[2][0] > counts[3][0]):
            break
    answers = [vocab[i] for _, i in counts[:3]]
    ctx = _cut_fill([vocab_ids[i] for i in whole], budget, vocab_ids[picks[-1]])
    return Sample(task.name, 0, head + ctx, [Question(tail, answers)], task.metric, task.max_new_tokens,
                  info={"counts": [c for c, _ in counts[:4]]})


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _build_ppl(task: Task, fmt: PromptFormat, length: int, rng: random.Random, depth: float) -> Sample:
    """A plain essay document of exactly `length` tokens (BOS included when the tokenizer adds one)."""
    n = _budget(length, fmt.lead)
    units = haystack.haystack_units(fmt.tokenizer, "essay")
    ids = [t for u in haystack.take_units(units, rng.randrange(len(units)), n) for t in u][:n]
    eval_len = int(task.params["eval_len"])
    check_int("ppl", "eval_len", eval_len, 1, length - 1)
    return Sample(task.name, 0, fmt.lead + ids, [], task.metric, 0, info={"eval_len": eval_len, "eval_chunk": int(task.params["eval_chunk"])})


_BUILDERS = {"passkey": _build_passkey, "niah": _build_niah, "vt": _build_vt, "cwe": _build_cwe, "fwe": _build_fwe, "ppl": _build_ppl}
