"""Speculative-decoding benchmark (`tokaccel bench spec`): greedy `generate` vs Token Recycling and
HF's prompt lookup decoding on the 32-prompt set of `spec_prompts` (chat, summarization, code,
repetitive), batch 1, up to `new_tokens` tokens each (EOS ends a row early, as in real use).

Per prompt every variant runs once, the order rotated from prompt to prompt (no variant always
runs first). Speedups are ratios of summed wall time over the same
prompts, measured side by side in one run. Each row also says whether the variant's tokens equal
greedy's (they must, all three are lossless) and its tokens per forward after the prefill.

Token Recycling keeps its matrix across prompts (hot start) as a user's process would, one state
per recycling variant (so two variants never share what they learned); `--warmup` prompts (not
timed) run first, which also calibrates its tree sizes on this machine.

Variants: "recycling[:tree=auto|paper|N]", "prompt_lookup[:n=10]" and "greedy" (the baseline
always runs; list it with an option to compare). `pack_linears=True` packs the model's linears
(`tokaccel.cpu_linear`) for every variant, baseline included; a variant's `packed=0|1` overrides
that for it alone (packing happens outside the timed region).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..registry import parse_spec
from ..validation import invalid
from .spec_prompts import PROMPTS, WARMUP, prompt_set

BASELINE = "greedy"
VARIANTS = ("recycling", "prompt_lookup", "greedy")


@dataclass
class SpecConfig:
    model: str = "smollm2"
    variants: Sequence[str] = ("recycling", "prompt_lookup")
    per_class: int | None = None  # prompts per class (default: all 8)
    new_tokens: int = 128
    warmup: int = 2  # untimed prompts first (spec_prompts.WARMUP, not in the timed set)
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on CUDA
    pack_linears: bool = False  # tokaccel.cpu_linear packing for every variant (CPU only)


_OPTIONS = {"recycling": {"tree", "packed"}, "prompt_lookup": {"n", "packed"}, "greedy": {"packed"}}


def _variant_kwargs(spec: str, pack_default: bool) -> tuple[str, dict, bool]:
    """(name, generate kwargs, packed linears) of a variant spec."""
    name, cfg = parse_spec(spec)
    if name not in _OPTIONS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)} (greedy always runs)")
    unknown = set(cfg) - _OPTIONS[name]
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; valid: {', '.join(sorted(_OPTIONS[name]))}")
    if name == "greedy" and not cfg:
        raise ValueError("greedy always runs as the baseline; list it only with an option (greedy:packed=1)")
    packed = cfg.get("packed", pack_default)
    if packed not in (0, 1):  # True and False are 1 and 0
        raise invalid(f"bench spec variant {spec!r}", "packed", packed, "packed must be 0 or 1")
    if name == "recycling":
        from .. import recycling

        return spec, {"custom_generate": recycling.generate, "tree": cfg.get("tree", "auto")}, bool(packed)
    if name == "prompt_lookup":
        return spec, {"prompt_lookup_num_tokens": int(cfg.get("n", 10))}, bool(packed)
    return spec, {}, bool(packed)


def _set_packing(model, packed: bool) -> None:
    from ..cpu_linear import pack_linears, packed_count, unpack_linears

    if packed and not packed_count(model):
        pack_linears(model)
    elif not packed and packed_count(model):
        unpack_linears(model)


def encode(tokenizer, prompt: str, device) -> torch.Tensor:
    """input_ids [1, T]: the chat template when the tokenizer has one, else the plain prompt."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt + "\n\n", return_tensors="pt")["input_ids"]
    return ids.to(device)


class _ForwardCounter:
    """Counts model forward calls (a forward pre-hook) to report tokens per forward."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def run_spec(config: SpecConfig, metadata: dict | None = None, progress: bool = False) -> list[dict]:
    """Rows: one per (prompt, variant) and one summary per (class, variant) plus class "all"."""
    from .e2e import TINY_MODEL, load_model

    device = torch.device(config.device)
    dtype = config.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = load_model(config.model, device, dtype)
    variants = [(BASELINE, {}, config.pack_linears)] + [_variant_kwargs(v, config.pack_linears)
                                                         for v in config.variants]
    if len({name for name, _, _ in variants}) < len(variants):
        raise ValueError(f"variants listed twice: {config.variants}")
    prompts = prompt_set(config.per_class)
    if config.model == TINY_MODEL:  # no tokenizer: prompts become fixed random ids
        gen = torch.Generator().manual_seed(0)
        encoded = [torch.randint(0, model.config.vocab_size, (1, 24 + i), generator=gen).to(device)
                   for i in range(len(prompts) + len(WARMUP))]
        encoded, warm = encoded[:len(prompts)], encoded[len(prompts):]
        pad = 0
    else:
        encoded = [encode(tokenizer, text, device) for _, text in prompts]
        warm = [encode(tokenizer, text, device) for text in WARMUP]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    warm = (warm * config.warmup)[:config.warmup]
    counter = _ForwardCounter(model)
    states: dict = {}
    rows = []
    base = dict(metadata or {})
    base.update(model=config.model, dtype=str(dtype).replace("torch.", ""), new_tokens_max=config.new_tokens,
                threads=torch.get_num_threads(), packed_linears=config.pack_linears)
    try:
        with torch.inference_mode():
            for ids in warm:
                for name, kwargs, packed in variants:
                    _switch_state(model, states, name)
                    _set_packing(model, packed)
                    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=config.new_tokens, pad_token_id=pad, **kwargs)
            for i, ((cls, _), ids) in enumerate(zip(prompts, encoded)):
                order = variants[i % len(variants):] + variants[:i % len(variants)]
                results = {}
                for name, kwargs, packed in order:
                    _switch_state(model, states, name)
                    _set_packing(model, packed)
                    counter.calls = 0
                    start = time.perf_counter()
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=config.new_tokens, pad_token_id=pad, **kwargs)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - start
                    results[name] = (out[0, ids.shape[1]:], seconds, counter.calls)
                greedy_tokens = results[BASELINE][0]
                for name, _, _ in variants:
                    tokens, seconds, calls = results[name]
                    rows.append({**base, "class": cls, "prompt": i, "variant": name, "prompt_tokens": ids.shape[1],
                                 "new_tokens": tokens.numel(), "seconds": seconds,
                                 "tokens_per_s": tokens.numel() / seconds,
                                 "tokens_per_forward": tokens.numel() / max(calls - 1, 1),
                                 "identical": bool(torch.equal(tokens, greedy_tokens)),
                                 "speedup": results[BASELINE][1] / seconds})
                if progress:
                    print(f"[{i + 1}/{len(prompts)}] {cls}: " + ", ".join(
                        f"{n} {results[BASELINE][1] / results[n][1]:.2f}x" for n, _, _ in variants[1:]), flush=True)
    finally:
        counter.handle.remove()
        _switch_state(model, states, None)
        _set_packing(model, False)
    return rows + summarize(rows)


def _switch_state(model, states: dict, name: str | None) -> None:
    """Give each recycling variant its own hot-start state (matrix, tree timings), so one variant
    never drafts from what another just learned on the same prompt."""
    from ..recycling import recycling_state, set_recycling_state

    current = states.get("_current")
    if current is not None:
        states[current] = recycling_state(model)
    set_recycling_state(model, None)
    states["_current"] = name
    if name is not None:
        set_recycling_state(model, states.get(name))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (class, variant) and ("all", variant): summed-time speedup over greedy on the same
    prompts, the worst single prompt, tokens per forward, share of prompts identical to greedy."""
    out = []
    classes = [c for c in PROMPTS if any(r["class"] == c for r in rows)] + ["all"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for cls in classes:
        picked = [r for r in rows if cls == "all" or r["class"] == cls]
        greedy = {r["prompt"]: r for r in picked if r["variant"] == BASELINE}
        for name in variants:
            mine = [r for r in picked if r["variant"] == name]
            seconds = sum(r["seconds"] for r in mine)
            tokens = sum(r["new_tokens"] for r in mine)
            forwards = sum(r["new_tokens"] / r["tokens_per_forward"] for r in mine)
            meta = {k: v for k, v in mine[0].items()
                    if k not in ("class", "prompt", "variant", "prompt_tokens", "new_tokens", "seconds",
                                 "tokens_per_s", "tokens_per_forward", "identical", "speedup")}
            out.append({**meta, "class": cls, "prompt": "all", "variant": name, "prompts": len(mine),
                        "new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                        "tokens_per_forward": tokens / max(forwards, 1e-9),
                        "identical": sum(r["identical"] for r in mine) / len(mine),
                        "speedup": sum(greedy[r["prompt"]]["seconds"] for r in mine) / seconds,
                        "min_speedup": min(r["speedup"] for r in mine)})
    return out


def smoke_config(**overrides) -> SpecConfig:
    """For CI: the tiny random Llama, one prompt per class, 8 new tokens, no warm-up."""
    from .e2e import TINY_MODEL

    return SpecConfig(**{**dict(model=TINY_MODEL, per_class=1, new_tokens=8, warmup=0), **overrides})


TABLE_COLUMNS = ("class", "variant", "prompts", "new_tokens", "tokens_per_s", "tokens_per_forward", "speedup",
                 "min_speedup", "identical")
TABLE_HEADERS = ("class", "variant", "prompts", "tokens", "tokens/s", "tokens / forward", "speedup vs greedy",
                 "worst prompt", "identical to greedy")
