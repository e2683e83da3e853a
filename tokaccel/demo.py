"""`tokaccel demo`: where tokaccel pays on this machine, each speed figure beside the accuracy
measured in the same run.

1. End to end, on the embedded default model (SmolLM2-135M-Instruct): `samples` needle-in-a-
   haystack prompts (the eval harness's niah_single_2) of `context` tokens (default 8K, SmolLM2's
   trained length), each answered by the unpatched model and by the policy, one greedy `generate`
   call each: time to first token and per output token (speedups paired per prompt), answers
   correct, tokens equal to the unpatched model's, selection-cache hit rate.
2. Op level: one decode step of one attention layer of SmolLM2's shape at 32K and 128K cached
   tokens (random keys with planted "needle" keys that the query attends to): torch SDPA against
   the policy's selection-cache hit and miss steps, with the needles the selection keeps and the
   share of SDPA's attention weight on the keys the policy reads.
3. Optional (`--eval`): the quick accuracy suite of the eval harness.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from . import models

DEMO_POLICY = "tokenselect:position_mode=original"
DEMO_TASK = "niah_single_2"
NEEDLE_LOGIT = 12.0  # the planted keys' logit (random keys: about N(0, 1)): they hold most of the weight


def _correct(tokenizer, sample, generated: torch.Tensor) -> float:
    """The eval harness's score of one answer, read up to the first end-of-sequence token."""
    from .evals import metrics

    ids = generated.tolist()
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, token in enumerate(ids):
        if token in stops:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return metrics.score(sample.metric, text, sample.questions[0].answers, **sample.metric_args)


def end_to_end(model, tokenizer, policy: str, context: int, samples: int, progress: bool = True) -> dict:
    """The unpatched model and `policy` on `samples` niah_single_2 prompts of `context` tokens.

    Returns {variant: {"ttft": [s], "tpot": [s], "correct": [0/1], "same": [fraction], "stats": dict}}
    plus "prompt_tokens". Each prompt is one timed greedy call per variant (order alternating per
    prompt), after one short warm-up call per variant."""
    from .bench.e2e import BASELINE, Variant, generate_once
    from .evals.tasks import make_samples

    variants = [Variant(BASELINE, "baseline"), Variant(policy, "policy", policy=policy)]
    prompts = make_samples(DEMO_TASK, tokenizer, context, samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    warm = torch.tensor([prompts[0].prompt_ids()[:128]])
    for variant in variants:
        generate_once(model, warm, 2, variant, pad, "cpu")
    out: dict = {v.name: {"ttft": [], "tpot": [], "correct": [], "same": [], "stats": {}} for v in variants}
    out["prompt_tokens"] = prompts[0].prompt_tokens
    bar = tqdm(total=samples * len(variants), desc=f"end to end, {context} tokens", disable=not progress)
    for i, sample in enumerate(prompts):
        ids = torch.tensor([sample.prompt_ids()])
        order = variants if i % 2 == 0 else variants[::-1]
        results = {}
        for variant in order:
            results[variant.name] = generate_once(model, ids, sample.max_new_tokens, variant, pad, "cpu")
            bar.update()
        reference = results[BASELINE].sequences[0]
        for name, r in results.items():
            row = out[name]
            row["ttft"].append(r.ttft_s)
            row["tpot"].append(r.tpot_s)
            row["correct"].append(_correct(tokenizer, sample, r.sequences[0]))
            row["same"].append((r.sequences[0] == reference).float().mean().item())
            for key in ("selection_hits", "selection_misses", "keys_read", "calls"):
                row["stats"][key] = row["stats"].get(key, 0) + r.stats.get(key, 0)
    bar.close()
    return out


def end_to_end_table(result: dict, policy: str) -> str:
    from .bench.e2e import BASELINE

    base = result[BASELINE]
    lines = ["| variant | TTFT s | per token ms | TTFT speedup | per-token speedup | answers correct "
             "| same tokens as unpatched | keys read / call | selection-cache hit rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in (BASELINE, policy):
        row = result[name]
        ttft_x = statistics.median(b / c for b, c in zip(base["ttft"], row["ttft"]))
        tpot_x = statistics.median(b / c for b, c in zip(base["tpot"], row["tpot"]))
        s = row["stats"]
        keys = f"{s['keys_read'] / s['calls']:.0f}" if s.get("calls") else f"{result['prompt_tokens']} (all)"
        lookups = s.get("selection_hits", 0) + s.get("selection_misses", 0)
        hit = f"{s['selection_hits'] / lookups:.2f}" if lookups else "-"
        label = "unpatched (HF sdpa)" if name == BASELINE else name
        lines.append(f"| {label} | {statistics.median(row['ttft']):.2f} | {statistics.median(row['tpot']) * 1e3:.1f} "
                     f"| {ttft_x:.2f}x | {tpot_x:.2f}x | {sum(row['correct']):.0f} / {len(row['correct'])} "
                     f"| {statistics.mean(row['same']):.2f} | {keys} | {hit} |")
    return "\n".join(lines)


def _plant_needles(x, n_init: int, n_local: int, needles: int, logit: float, seed: int = 0) -> torch.Tensor:
    """Overwrite `needles` keys, spread over the candidates [n_init, N - n_local), of every KV head
    with its query group's mean direction, scaled so that the group's mean logit on each is `logit`
    (random keys give logits of about N(0, 1)). Returns the needle positions [needles]."""
    B, H, _, D = x.q.shape
    Hk = x.k.shape[1]
    g = torch.Generator().manual_seed(seed)
    span = x.n - n_local - n_init
    positions = n_init + (torch.arange(needles) * span // needles + torch.randint(0, span // needles, (needles,), generator=g))
    q = x.q[:, :, 0].reshape(B, Hk, H // Hk, D)
    direction = q.mean(2)
    direction = direction / direction.norm(dim=-1, keepdim=True)  # [B, Hk, D]
    mean_logit_per_unit = (q * direction[:, :, None]).sum(-1).mean(2) * D ** -0.5  # [B, Hk]
    x.k[:, :, positions] = (direction * (logit / mean_logit_per_unit)[..., None])[:, :, None]
    return positions


def op_level(policy: str, lengths: list[int], repeats: int = 5, needles: int = 16, progress: bool = True) -> list[dict]:
    """One decode step of one SmolLM2-shaped layer per N in `lengths`: SDPA vs the policy's hit and miss
    steps (timed interleaved, paired ratios), and what the miss step's selection keeps."""
    from .bench.ops import SHAPES, OpCase, OpInputs, sdpa_setup
    from .bench.selection_ops import selection_setup
    from .bench.timing import paired_ratio, time_interleaved
    from .registry import make_policy

    shape, spec = SHAPES["smollm2"], make_policy(policy)
    rows = []
    for n in tqdm(lengths, desc="op level", disable=not progress):
        x = OpInputs.random(shape, n, 1, 1, torch.float32, torch.device("cpu"))
        positions = _plant_needles(x, spec.n_init, spec.n_local, needles, logit=NEEDLE_LOGIT)

        def case(impl, phase):
            return OpCase(impl, {}, shape, n, phase, 1, 1, torch.float32, torch.device("cpu"), x)

        sdpa = sdpa_setup(case("sdpa", "decode"))
        hit, miss = selection_setup(case(policy, "decode_hit")), selection_setup(case(policy, "decode_miss"))
        timings = time_interleaved({"sdpa": sdpa.parts["total"], "hit": hit.parts["total"],
                                    "miss": miss.parts["total"]}, warmup=1, repeats=repeats)
        sparse = miss.parts["total"]()[0][:, 0]  # [B, H, D]
        dense = sdpa.parts["total"]()[:, :, 0]
        error = ((sparse - dense).norm() / dense.norm()).item()
        read = _keys_read(miss.state.selection, spec.n_init, n - spec.n_local, n)
        logits = torch.einsum("bhd,bhnd->bhn", x.q[:, :, 0],
                              x.k.repeat_interleave(shape.groups, dim=1)) * shape.head_dim ** -0.5
        weight = logits.softmax(-1)[0, :, read].sum(-1).mean().item()  # mean over query heads
        found = torch.isin(positions, read).sum().item()
        rows.append({"n": n, "sdpa_ms": timings["sdpa"].median_s * 1e3, "hit_ms": timings["hit"].median_s * 1e3,
                     "miss_ms": timings["miss"].median_s * 1e3, "hit_x": paired_ratio(timings["sdpa"], timings["hit"]),
                     "miss_x": paired_ratio(timings["sdpa"], timings["miss"]), "keys_read": len(read),
                     "needles_found": found, "needles": needles, "weight_read": weight,
                     "output_error": error})
    return rows


def _keys_read(selection, n_init: int, local_start: int, n: int) -> torch.Tensor:
    """Token positions a decode step with this selection reads: sinks, selected candidates, local window."""
    mid = selection.mid[0][selection.mid_valid[0]]
    return torch.cat([torch.arange(n_init), mid.cpu(), torch.arange(local_start, n)])


def op_level_table(rows: list[dict]) -> str:
    lines = ["| cached tokens | SDPA ms | hit ms | miss ms | keys read | needles in the selection "
             "| SDPA attention weight on the keys read | output error vs SDPA |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n'] // 1024}K | {r['sdpa_ms']:.2f} | {r['hit_ms']:.2f} ({r['hit_x']:.1f}x) "
                     f"| {r['miss_ms']:.2f} ({r['miss_x']:.1f}x) | {r['keys_read']} "
                     f"| {r['needles_found']} / {r['needles']} | {r['weight_read']:.3f} | {r['output_error']:.4f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    """The CPU model and the vector extension torch dispatches to (bf16 is emulated without AVX-512)."""
    from .bench.results import device_name

    return f"{device_name('cpu')}, {torch.backends.cpu.get_cpu_capability()}"


def _write_result(out: str, record: dict) -> None:
    """`record` plus the run's provenance (commit, dirty tree, CPU, versions) as DIR/demo-<time>.json."""
    import json
    from pathlib import Path

    from .bench.results import run_metadata

    meta = {**run_metadata("cpu"), "cpu": _cpu_name()}
    path = Path(out) / f"demo-{meta['timestamp'].replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": meta, **record}, indent=1), encoding="utf-8")
    print(f"\nresult written to {path}")


def _demo_command(args) -> int:
    started = time.perf_counter()
    record: dict = {"options": {k: v for k, v in vars(args).items() if k != "func"}}
    lengths = [int(n) for n in args.op_lengths.split(",") if n]
    print(f"tokaccel demo: {args.policy} against the unpatched model; {_cpu_name()}, "
          f"{torch.get_num_threads()} threads, fp32\n")
    loaded = None
    if args.samples > 0 or args.eval:
        loaded = models.load(args.model)
    if args.samples > 0:
        result = end_to_end(*loaded, args.policy, args.context, args.samples)
        table = end_to_end_table(result, args.policy)
        print(f"\n1. End to end: {args.model}, {args.samples} {DEMO_TASK} prompts of {result['prompt_tokens']} tokens "
              "(a fact hidden in an essay, asked for at the end), greedy; medians, speedups paired per prompt\n")
        print(table)
        record["end_to_end"] = {"model": args.model, "task": DEMO_TASK, "samples": args.samples, **result, "table": table}
        print("\nTTFT: the policy's chunked sparse prefill attends each 512-token chunk to a fixed budget "
              "instead of the whole prefix. Per token: every step still runs all MLPs and the 49K-word head, "
              "and a selection-cache miss scores every cached key, so on a 135M model at 8K the time per token "
              "is about the unpatched model's; the attention step's gain grows with the context (part 2). Below "
              "~4K tokens the budget covers most of the prompt and the policy is slower than the unpatched model.")
    if lengths:
        rows = op_level(args.policy, lengths)
        table = op_level_table(rows)
        print("\n2. Op level: one decode step of one attention layer, SmolLM2's shape (9 query / 3 KV heads, "
              f"D=64), random keys (logits ~ N(0, 1)) with 16 planted needles (logit {NEEDLE_LOGIT:.0f}); medians of 5 "
              "interleaved repeats, speedup vs SDPA; error: relative L2 distance of the miss step's output to SDPA's\n")
        print(table)
        record["op_level"] = {"shape": "smollm2", "needle_logit": NEEDLE_LOGIT, "rows": rows, "table": table}
        print("\nA hit reuses the last selection and reads a fixed budget whatever the context; a miss also "
              "scores every key. How often a step hits depends on the model (SmolLM2: about 1 step in 4 at "
              "theta=0.9).")
    if args.eval:
        from .evals import QUICK, run_eval, summary_table
        from .models import cache_dir

        suite = {**QUICK, "model": loaded}
        print(f"\n3. Quick accuracy suite ({', '.join(suite['tasks'])} at {suite['lengths']} tokens, "
              f"{suite['samples']} samples; cached under {cache_dir() / 'demo-results'}):\n")
        results = run_eval(**suite, model_name=args.model, policies=["dense", args.policy],
                           out=cache_dir() / "demo-results", write_summary=False)
        print(summary_table(results))
    record["seconds"] = time.perf_counter() - started
    print(f"\ndemo took {record['seconds']:.0f} s")
    if args.out:
        _write_result(args.out, record)
    return 0


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="where tokaccel pays: end to end at 8K and one decode step at "
                                 "32K / 128K, each beside its accuracy", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--model", default=models.DEFAULT_MODEL, help="embedded name, HF id or path")
    demo.add_argument("--policy", default=DEMO_POLICY, help="policy spec")
    demo.add_argument("--context", type=int, default=8000,
                      help="end-to-end prompt length in tokens (8000 + the answer stays inside SmolLM2's 8,192)")
    demo.add_argument("--samples", type=int, default=4, help="end-to-end prompts (0 skips part 1)")
    demo.add_argument("--op-lengths", default="32768,131072", help="op-level cache lengths ('' skips part 2)")
    demo.add_argument("--eval", action="store_true", help="also run the quick accuracy suite (~3 min per policy)")
    demo.add_argument("--out", default=None, help="also write the measurements with their provenance to DIR/demo-*.json")
    demo.set_defaults(func=_demo_command)
