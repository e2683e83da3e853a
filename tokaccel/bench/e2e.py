"""End-to-end benchmark (`tokaccel bench e2e`): greedy `model.generate` of M new tokens after an
N-token prompt, for the unpatched model (the baseline, "hf"), tokaccel policies and HF's own
peers, at several batch sizes.

Per (N, batch) every variant runs once per repeat, interleaved with the others (order rotated),
so ratios to "hf" are taken per repeat (timing.paired_ratio). One `generate` call gives both
times: a StoppingCriteria stamps the clock (after a CUDA synchronize on GPU) each time tokens
are emitted, so TTFT = first stamp - start (prefill + first token) and
TPOT = (last stamp - first stamp) / (tokens emitted after the first stamp).

Reported per row: ttft_ms, tpot_ms (median, min, max), tokens_per_s (B*M / whole call),
decode_tokens_per_s (B / TPOT), peak memory growth during the call (sampled RSS on CPU, CUDA
max allocated on GPU; the max over repeats), kv_bytes (the cache's tensors after generation,
prompt + M tokens), agree_with_hf (fraction of generated tokens equal to the baseline's: a
speedup is only reported next to the accuracy measured on the same run), tokens_per_step
(tokens per forward after prefill; > 1 when a speculative peer accepts drafts), and the tokaccel
counters of patched variants (keys_read_per_call, selection_hit_rate).

`--pack-linears` packs the model's linears (`tokaccel.cpu_linear`) for the whole run, every
variant included.

Variants (`--policies`, `--peers`):
- "hf": unpatched `generate` (always first);
- a policy spec ("dense", "tokenselect:k=1024"): `with tokaccel.patched(model, policy=spec)`;
- "prompt_lookup[:n=10]": `generate(prompt_lookup_num_tokens=n)` (HF: batch size 1 only);
- "quantized[:backend=quanto,nbits=4]": `generate(cache_implementation="quantized")` (needs
  optimum-quanto or hqq);
- "offloaded": `generate(cache_implementation="offloaded")` (CUDA only; on CPU it has nothing to
  offload to).
A variant that raises gets one "skipped" row with the error as its reason, and is not retried
for that batch size.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..cache import output_cache
from ..registry import parse_spec
from .timing import PeakMemory, Timing, is_cuda, paired_ratio, synchronize

logger = logging.getLogger(__name__)

BASELINE = "hf"
PEERS = ("prompt_lookup", "quantized", "offloaded")
TINY_MODEL = "tiny-random-llama"


@dataclass
class E2EConfig:
    """What `run_e2e` measures."""

    model: str = "smollm2"
    contexts: Sequence[int] = (1024, 4096)
    policies: Sequence[str] = ("dense",)
    peers: Sequence[str] = ("prompt_lookup",)
    batch_sizes: Sequence[int] = (1, 4)
    new_tokens: int = 32
    warmup: int = 1  # short runs per variant and batch size (64-token prompt, 4 new tokens)
    repeats: int = 3
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on CUDA
    prompt: str = "text"  # "text": repeated natural text (pydoc topics); "random": random token ids
    seed: int = 0
    pack_linears: bool = False  # tokaccel.cpu_linear packing for every variant, baseline included (CPU)


@dataclass
class Variant:
    name: str
    kind: str  # "baseline" | "policy" | "peer"
    generate_kwargs: dict = field(default_factory=dict)
    policy: str | None = None
    skip_reason: str | None = None  # known not to run here, without trying


def make_variants(policies: Sequence[str], peers: Sequence[str], device: str | torch.device) -> list[Variant]:
    variants = [Variant(BASELINE, "baseline")]
    for spec in policies:
        parse_spec(spec)  # syntax check now; the name is checked by make_policy at patch time
        variants.append(Variant(spec, "policy", policy=spec))
    for spec in peers:
        name, cfg = parse_spec(spec)
        if name == "prompt_lookup":
            variants.append(Variant(spec, "peer", {"prompt_lookup_num_tokens": int(cfg.get("n", 10))}))
        elif name == "quantized":
            cache_config = {"backend": cfg.get("backend", "quanto"), "nbits": int(cfg.get("nbits", 4))}
            variants.append(Variant(spec, "peer", {"cache_implementation": "quantized", "cache_config": cache_config}))
        elif name == "offloaded":
            reason = None if is_cuda(device) else "offloaded cache moves KV from the GPU to CPU memory: needs CUDA"
            variants.append(Variant(spec, "peer", {"cache_implementation": "offloaded"}, skip_reason=reason))
        else:
            raise ValueError(f"unknown peer {name!r}; valid peers: {PEERS}")
    return variants


def load_model(name: str, device: str | torch.device, dtype: torch.dtype):
    """(model, tokenizer or None). TINY_MODEL is a 2-layer random Llama (no tokenizer) for smoke runs."""
    if name == TINY_MODEL:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             attn_implementation="sdpa")
        return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval(), None
    from .. import models

    return models.load(name, dtype=dtype, device=device)


_TEXT_IDS: dict[int, torch.Tensor] = {}


def natural_text_ids(tokenizer) -> torch.Tensor:
    """Token ids [T] of Python's own documentation topics (pydoc_data; ships with CPython)."""
    if id(tokenizer) not in _TEXT_IDS:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        _TEXT_IDS[id(tokenizer)] = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _TEXT_IDS[id(tokenizer)]


def build_prompts(n: int, batch: int, tokenizer=None, vocab_size: int | None = None, mode: str = "text",
                  seed: int = 0) -> torch.Tensor:
    """input_ids [batch, n], exactly n tokens per row, no padding. "text": windows of natural text
    (repeated when shorter than n) at a different offset per row; "random": uniform token ids."""
    if mode == "random" or tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size or tokenizer.vocab_size, (batch, n), generator=gen)
    ids = natural_text_ids(tokenizer)
    if ids.numel() < n + 1009 * batch:
        ids = ids.repeat(-(-(n + 1009 * batch) // ids.numel()))
    offsets = [(1009 * b * 7) % (ids.numel() - n) for b in range(batch)]
    return torch.stack([ids[o:o + n] for o in offsets])


def cache_bytes(cache) -> int:
    """Bytes allocated for every tensor a HF cache holds (layer keys/values, quantized parts,
    metadata). Each storage counts once: a layer's `keys` may be a view of a larger buffer it
    also holds (tokaccel's SelectionLayer), and the buffer's headroom is counted, being allocated."""
    storages: dict[int, int] = {}

    def walk(obj, depth=0) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif depth <= 3 and isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth + 1)
        elif depth <= 3 and isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth + 1)

    for layer in getattr(cache, "layers", []) if cache is not None else []:
        walk(vars(layer))
    return sum(storages.values())


class _Stamps:
    """A StoppingCriteria that never stops: records (time, sequence length) each time it is called."""

    def __init__(self, device):
        import time

        from transformers import StoppingCriteria

        self._clock = time.perf_counter
        self.device = device
        self.times: list[float] = []
        self.lengths: list[int] = []
        stamps = self

        class Criterion(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                synchronize(stamps.device)
                stamps.times.append(stamps._clock())
                stamps.lengths.append(input_ids.shape[1])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.criterion = Criterion()

    def now(self) -> float:
        synchronize(self.device)
        return self._clock()


@dataclass
class GenResult:
    ttft_s: float
    tpot_s: float
    total_s: float
    new_tokens: int
    sequences: torch.Tensor  # [B, new_tokens]
    peak_mem: int
    kv_bytes: int
    stats: dict
    steps: int  # decoding steps (forwards after prefill that emitted tokens) + 1 for the first token


def generate_once(model, input_ids: torch.Tensor, new_tokens: int, variant: Variant, pad_token_id: int | None,
                  device) -> GenResult:
    """One greedy generate call of exactly `new_tokens` tokens, timed (see module docstring)."""
    from transformers import StoppingCriteriaList

    import tokaccel

    stamps = _Stamps(device)
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids), do_sample=False, min_new_tokens=new_tokens,
        max_new_tokens=new_tokens, pad_token_id=pad_token_id, return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([stamps.criterion]), **variant.generate_kwargs,
    )
    patch = tokaccel.patched(model, policy=variant.policy) if variant.policy else contextlib.nullcontext()
    stats: dict = {}
    with patch, torch.inference_mode(), PeakMemory(device) as memory:
        start = stamps.now()
        out = model.generate(input_ids, **kwargs)
        end = stamps.now()
        if variant.policy:
            stats = tokaccel.stats(model)
    prompt_len = input_ids.shape[1]
    first_len = stamps.lengths[0]
    after_first = stamps.lengths[-1] - first_len
    ttft = stamps.times[0] - start
    tpot = (stamps.times[-1] - stamps.times[0]) / after_first if after_first else float("nan")
    generated = out.sequences[:, prompt_len:]
    return GenResult(ttft, tpot, end - start, generated.shape[1], generated, memory.peak_delta,
                     cache_bytes(output_cache(out)), stats, len(stamps.times))


def _timing(values: list[float], warmup: int, device) -> Timing:
    return Timing.from_samples(values, warmup, "cuda-sync-perf_counter" if is_cuda(device) else "cpu-perf_counter")


def run_e2e(config: E2EConfig, metadata: dict | None = None, progress: bool = False,
            model_and_tokenizer: tuple[Any, Any] | None = None) -> list[dict]:
    """Run every (context, batch, variant); one row per combination (status "ok" or "skipped")."""
    device = torch.device(config.device)
    dtype = config.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = model_and_tokenizer or load_model(config.model, device, dtype)
    if config.pack_linears:
        from ..cpu_linear import packed_linears

        with packed_linears(model):
            return _run_e2e(config, model, tokenizer, device, dtype, metadata, progress)
    return _run_e2e(config, model, tokenizer, device, dtype, metadata, progress)


def _run_e2e(config: E2EConfig, model, tokenizer, device, dtype, metadata, progress) -> list[dict]:
    vocab = model.config.get_text_config().vocab_size
    pad = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    variants = make_variants(config.policies, config.peers, device)
    failed: dict[tuple[str, int], str] = {}
    rows: list[dict] = []
    combos = [(b, n) for b in config.batch_sizes for n in config.contexts]
    if progress:
        from tqdm import tqdm

        combos = tqdm(combos, desc="bench e2e", unit="case")
    warmed: set[int] = set()

    def attempt(variant: Variant, ids: torch.Tensor, new_tokens: int, batch: int) -> GenResult | None:
        try:
            return generate_once(model, ids, new_tokens, variant, pad, device)
        except Exception as exc:  # a peer that cannot run here: record why, do not retry
            if variant.kind == "baseline":
                raise
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            logger.warning("%s (batch %d) skipped: %s", variant.name, batch, reason)
            failed[(variant.name, batch)] = reason
            return None

    for batch, n in combos:
        runnable = [v for v in variants if not v.skip_reason and (v.name, batch) not in failed]
        if batch not in warmed and config.warmup:
            short = build_prompts(min(64, n), batch, tokenizer, vocab, config.prompt, config.seed).to(device)
            for _ in range(config.warmup):
                for variant in list(runnable):
                    if attempt(variant, short, min(4, config.new_tokens), batch) is None:
                        runnable.remove(variant)
            warmed.add(batch)
        ids = build_prompts(n, batch, tokenizer, vocab, config.prompt, config.seed).to(device)
        results: dict[str, list[GenResult]] = {v.name: [] for v in runnable}
        for r in range(config.repeats):
            order = runnable[r % len(runnable):] + runnable[:r % len(runnable)]
            for variant in order:
                if (variant.name, batch) in failed:
                    continue
                result = attempt(variant, ids, config.new_tokens, batch)
                if result is not None:
                    results[variant.name].append(result)
        base = results[BASELINE]
        base_ttft = _timing([g.ttft_s for g in base], config.warmup, device)
        base_tpot = _timing([g.tpot_s for g in base], config.warmup, device)
        base_total = _timing([g.total_s for g in base], config.warmup, device)
        common = {
            **(metadata or {}), "model": config.model, "dtype": str(dtype).replace("torch.", ""), "context": n,
            "batch": batch, "new_tokens": config.new_tokens, "prompt": config.prompt if tokenizer else "random",
            "packed_linears": config.pack_linears,
        }
        for variant in variants:
            row = {**common, "variant": variant.name, "kind": variant.kind}
            reason = variant.skip_reason or failed.get((variant.name, batch))
            got = results.get(variant.name) or []
            if reason or not got:
                rows.append({**row, "status": "skipped", "reason": reason or "no successful run"})
                continue
            ttft = _timing([g.ttft_s for g in got], config.warmup, device)
            tpot = _timing([g.tpot_s for g in got], config.warmup, device)
            total = _timing([g.total_s for g in got], config.warmup, device)
            agree = (got[0].sequences == base[0].sequences).float().mean().item()
            stats = got[0].stats
            rows.append({
                **row, "status": "ok", "reason": "",
                "ttft_ms": ttft.median_s * 1e3, "ttft_min_ms": ttft.min_s * 1e3, "ttft_max_ms": ttft.max_s * 1e3,
                "tpot_ms": tpot.median_s * 1e3, "tpot_min_ms": tpot.min_s * 1e3, "tpot_max_ms": tpot.max_s * 1e3,
                "total_ms": total.median_s * 1e3,
                "tokens_per_s": batch * got[0].new_tokens / total.median_s,
                "decode_tokens_per_s": batch / tpot.median_s,
                "peak_mem_mb": max(g.peak_mem for g in got) / 2**20,
                "mem_method": "cuda-max_allocated" if is_cuda(device) else "rss-sampled",
                "kv_bytes": got[0].kv_bytes, "kv_mb": got[0].kv_bytes / 2**20,
                "agree_with_hf": agree,
                "tokens_per_step": got[0].new_tokens / got[0].steps,  # > 1: speculative peers accepted drafts
                "speedup_ttft": paired_ratio(base_ttft, ttft), "speedup_tpot": paired_ratio(base_tpot, tpot),
                "speedup_total": paired_ratio(base_total, total),
                "repeats": len(got), "warmup": config.warmup, "timer": ttft.method, "threads": ttft.threads,
                "keys_read_per_call": stats.get("keys_read_per_call"),
                "selection_hit_rate": stats.get("selection_hit_rate"),
            })
    return rows


def smoke_config(**overrides) -> E2EConfig:
    """Tiny sizes for CI: 64-token context, 4 new tokens, batch 1 and 2, no warm-up, 1 repeat."""
    base = dict(contexts=(64,), batch_sizes=(1, 2), new_tokens=4, warmup=0, repeats=1)
    return E2EConfig(**{**base, **overrides})


TABLE_COLUMNS = ("context", "batch", "variant", "status", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_mem_mb", "kv_mb",
                 "agree_with_hf", "speedup_ttft", "speedup_tpot", "reason")
TABLE_HEADERS = ("context", "batch", "variant", "status", "TTFT ms", "TPOT ms", "tokens/s", "peak mem MiB", "KV MiB",
                 "agree w/ hf", "TTFT speedup", "TPOT speedup", "reason")
