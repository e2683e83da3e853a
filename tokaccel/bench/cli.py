"""`tokaccel bench ops | e2e | spec | vision | vllm`: run a benchmark, append its rows to `<out>/bench_<name>.csv`,
append a markdown table (headed by the command that reproduces it) to `<out>/bench_<name>.md`, and print the table.

    tokaccel bench ops --shapes smollm2,llama3-8b --n 4K,16K,128K --phases decode
    tokaccel bench e2e --model smollm2 --contexts 1K,4K --batch 1,4 --policies dense --peers prompt_lookup
    tokaccel bench vision --keeps 1.0,0.5,0.25,0.1 --methods divprune,fastv   # VLM prefill vs image tokens kept
    tokaccel bench vllm --contexts 2048,8000 --concurrency 1,4 --tasks niah_single_2 --samples 3   # vLLM vs tokaccel's backend
    tokaccel bench ops --smoke          # tiny sizes, 1 repeat: what CI runs
    tokaccel plot results/bench         # PNGs from the CSVs
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_OUT = "results/bench"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_size(text: str) -> int:
    """'4096', '4K' (x1024), '1M' (x2**20) -> int."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 2**20}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
    """Comma-separated names; a policy spec's own commas ("tokenselect:k=1,theta=0.9") are kept."""
    from ..registry import split_specs

    return split_specs(text)


def _dtype(text: str | None):
    if text is None:
        return None
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; valid: {sorted(DTYPES)}")
    return DTYPES[text]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 (default: cpu)")
    parser.add_argument("--dtype", type=_dtype, default=None, help="float32 | float16 | bfloat16 (default: fp32 on "
                        "CPU, bf16 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median, min, max reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, seconds: what CI runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="latency / memory benchmarks (op level and end to end)")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    ops = sub.add_parser("ops", help="one attention step of one layer on random K/V, per policy and part",
                         description="Decode steps and prefill chunks of every registered op bench vs dense "
                                     "SDPA, over a sweep of cache lengths N.")
    ops.add_argument("--shapes", type=_names, default=None,
                     help="smollm2,gemma3-global,llama3-8b (default: all three)")
    ops.add_argument("--n", type=_sizes, default=None, help="cache lengths, e.g. 4K,16K,128K "
                     "(default: 4K..128K on CPU, 4K..1M on CUDA)")
    ops.add_argument("--impls", type=_names, default=None, help="registered op benches / policy specs "
                     "(default: sdpa,dense,flash,gqa_matmul,tokenselect; sdpa, the baseline, always runs)")
    ops.add_argument("--phases", type=_names, default=None,
                     help="decode,decode_hit,decode_miss,prefill_chunk (default: all)")
    ops.add_argument("--batch", type=int, default=1)
    ops.add_argument("--chunk", type=int, default=None, help="prefill chunk length c (default 512)")
    ops.add_argument("--prefill-max-n", type=parse_size, default=None, help="skip prefill chunks above this N")
    ops.add_argument("--plugin", action="append", default=[], help="module that registers op benches (repeatable)")
    _common(ops)
    ops.set_defaults(func=run_ops_command)

    e2e = sub.add_parser("e2e", help="generate(): TTFT, TPOT, tokens/s, peak memory, KV bytes per variant",
                         description="Greedy generate of M tokens after an N-token prompt: unpatched HF (the "
                                     "baseline), tokaccel policies and HF peers, interleaved per repeat.")
    e2e.add_argument("--model", default=None, help="embedded name (smollm2, gemma3), HF id or path, or "
                     "tiny-random-llama (default: smollm2)")
    e2e.add_argument("--contexts", type=_sizes, default=None, help="prompt lengths (default: 1K,4K)")
    e2e.add_argument("--policies", type=_names, default=None, help="policy specs (default: dense)")
    e2e.add_argument("--peers", type=_names, default=None,
                     help="prompt_lookup[:n=10], quantized[:backend=quanto,nbits=4], offloaded; 'none' for none "
                          "(default: prompt_lookup)")
    e2e.add_argument("--batch", type=_sizes, default=None, help="batch sizes (default: 1,4)")
    e2e.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default: 32)")
    e2e.add_argument("--prompt", choices=("text", "random"), default="text",
                     help="natural text (default) or random token ids")
    e2e.add_argument("--pack-linears", action="store_true",
                     help="pack every CPU linear (tokaccel.cpu_linear) for all variants, the baseline included")
    _common(e2e)
    e2e.set_defaults(func=run_e2e_command)

    spec = sub.add_parser("spec", help="speculative decoding: greedy vs Token Recycling vs prompt lookup",
                          description="Greedy generate on 32 prompts (chat, summarization, code, repetitive), "
                                      "batch 1, vs lossless speculative variants, interleaved per prompt.")
    spec.add_argument("--model", default=None, help="embedded name (smollm2, gemma3), HF id or path, or "
                      "tiny-random-llama (default: smollm2)")
    spec.add_argument("--variants", type=_names, default=None,
                      help="recycling[:tree=auto|paper|N], prompt_lookup[:n=10] (default: both; greedy always runs), "
                           "each with an optional packed=0|1; greedy:packed=0|1 adds greedy with the other packing")
    spec.add_argument("--pack-linears", action="store_true",
                      help="pack every CPU linear (tokaccel.cpu_linear) for all variants, the greedy baseline included")
    spec.add_argument("--per-class", type=int, default=None, help="prompts per class (default: all 8)")
    spec.add_argument("--new-tokens", type=int, default=None, help="max new tokens per prompt (default: 128)")
    _common(spec)
    spec.set_defaults(func=run_spec_command)

    vision = sub.add_parser("vision", help="VLM prefill time and FLOPs vs visual tokens kept (random wide LLaVA)",
                            description="Prefill of a random LLaVA (768-wide, 6-layer Llama decoder, one 576-token "
                                        "image + 41 text tokens, batch 1, fp32, CPU) with each pruning policy at "
                                        "each keep ratio vs the unpatched model; FLOPs = the decoder's matmuls.")
    vision.add_argument("--keeps", default="1.0,0.5,0.25,0.1", help="keep ratios (default: 1.0,0.5,0.25,0.1)")
    vision.add_argument("--methods", type=_names, default=None, help="vision policies (default: divprune,fastv)")
    vision.add_argument("--repeats", type=int, default=None, help="timed prefills per cell, median (default: 3)")
    vision.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    vision.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    vision.add_argument("--smoke", action="store_true", help="a 64-wide 3-layer decoder, 36-token image, 1 repeat")
    vision.set_defaults(func=run_vision_command)

    vllm = sub.add_parser("vllm", help="decode tok/s and task accuracy through vLLM: its own backend vs tokaccel's",
                          description="vLLM's CPU engine (the environment of ./run.sh vllm-setup, $TOKACCEL_VLLM_VENV) "
                                      "with its own attention backend and with tokaccel's backend and a policy, on "
                                      "the same prompts: decode throughput per (context, concurrency) with the "
                                      "prefill served by prefix caching, and the score of task samples (built as "
                                      "`tokaccel eval` builds them) per (backend, task, context).")
    vllm.add_argument("--model", default="smollm2-135m-instruct",
                      help="the embedded smollm2 (its export by ./run.sh vllm-setup) or a local model folder")
    vllm.add_argument("--contexts", type=_sizes, default=[2048, 8000], help="prompt tokens (default: 2048,8000)")
    vllm.add_argument("--concurrency", type=_sizes, default=[1, 4], help="requests decoding at once (default: 1,4)")
    vllm.add_argument("--policy", type=_names, default=None,
                      help="tokaccel spec(s) for tokaccel's backend, tokenselect:... or quest:... (page = --block-size "
                           "selects whole cache blocks; default: quest:k=768,page=32,n_init=64,n_local=192)")
    vllm.add_argument("--new-tokens", type=int, default=32, help="timed decode tokens per request (default: 32)")
    vllm.add_argument("--tasks", type=_names, default=["niah_single_2"],
                      help="eval tasks for accuracy (default: niah_single_2, which SmolLM2 answers at 2K)")
    vllm.add_argument("--samples", type=int, default=3, help="samples per (task, context); 0: no accuracy (default: 3)")
    vllm.add_argument("--block-size", type=int, default=32, help="vLLM KV cache block size (default: 32)")
    vllm.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    vllm.add_argument("--seed", type=int, default=0, help="task samples' seed, as `tokaccel eval --seed`")
    vllm.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    vllm.add_argument("--no-progress", action="store_true", help="no progress lines")
    vllm.set_defaults(func=run_vllm_command)


def _set(config, **values):
    """Override the config fields that were given (not None)."""
    for key, value in values.items():
        if value is not None:
            setattr(config, key, value)
    return config


def _finish(rows: list[dict], out: Path, csv_name: str, command: str, columns, headers, table_rows=None) -> int:
    from .results import append_rows, markdown_table

    if not rows:
        logger.warning("no rows measured")
        return 1
    csv_path = append_rows(out / csv_name, rows)
    first = rows[0]
    table = markdown_table(table_rows if table_rows is not None else rows, columns, headers)
    heading = (f"### {first.get('timestamp', '')} {first.get('device_name', '')}, {first.get('threads', '')} threads, "
               f"torch {first.get('torch', '')}, commit {first.get('git_commit') or 'none'}"
               f"{' (dirty)' if first.get('git_dirty') in (True, 'True') else ''}\n\n`{command}`\n\n")
    with (out / csv_name.replace(".csv", ".md")).open("a") as f:
        f.write(heading + table + "\n\n")
    print(table)
    logger.info("rows appended to %s", csv_path)
    return 0


def _command(args, parts: list[tuple[str, object]]) -> str:
    words = ["tokaccel", "bench", args.bench_command]
    for flag, value in parts:
        if value is None or value is False or value == []:
            continue
        if value is True:
            words.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        words += [flag, str(value)]
    return shlex.join(words)


def run_ops_command(args) -> int:
    from .ops import TABLE_COLUMNS, TABLE_HEADERS, OpsConfig, run_ops, smoke_config
    from .results import OPS_CSV, run_metadata

    if args.threads:
        torch.set_num_threads(args.threads)
    config = smoke_config() if args.smoke else OpsConfig()
    _set(config, shapes=args.shapes, ns=None if args.smoke else args.n, impls=args.impls, phases=args.phases,
         batch=args.batch, chunk=None if args.smoke else args.chunk, dtype=args.dtype, device=args.device,
         warmup=args.warmup, repeats=args.repeats, prefill_max_n=args.prefill_max_n, plugins=args.plugin or None)
    config = config.resolved()
    command = _command(args, [("--shapes", config.shapes), ("--n", config.ns), ("--impls", config.impls),
                              ("--phases", config.phases), ("--batch", config.batch), ("--chunk", config.chunk),
                              ("--prefill-max-n", config.prefill_max_n), ("--dtype", config.dtype),
                              ("--device", args.device), ("--warmup", config.warmup), ("--repeats", config.repeats),
                              ("--threads", torch.get_num_threads()), ("--smoke", args.smoke),
                              *[("--plugin", p) for p in args.plugin], ("--out", args.out)])
    rows = run_ops(config, run_metadata(config.device), progress=not args.no_progress)
    return _finish(rows, Path(args.out), OPS_CSV, command, TABLE_COLUMNS, TABLE_HEADERS)


def run_e2e_command(args) -> int:
    from .e2e import TABLE_COLUMNS, TABLE_HEADERS, E2EConfig, run_e2e, smoke_config
    from .results import E2E_CSV, run_metadata

    if args.threads:
        torch.set_num_threads(args.threads)
    config = smoke_config() if args.smoke else E2EConfig()
    peers = [] if args.peers == ["none"] else args.peers
    _set(config, model=args.model, contexts=None if args.smoke else args.contexts, policies=args.policies,
         peers=peers, batch_sizes=None if args.smoke else args.batch,
         new_tokens=None if args.smoke else args.new_tokens, dtype=args.dtype, device=args.device,
         warmup=args.warmup, repeats=args.repeats, prompt=args.prompt)
    config.pack_linears = args.pack_linears
    command = _command(args, [("--model", config.model), ("--contexts", config.contexts),
                              ("--policies", config.policies), ("--peers", config.peers or ["none"]),
                              ("--batch", config.batch_sizes), ("--new-tokens", config.new_tokens),
                              ("--prompt", config.prompt), ("--pack-linears", config.pack_linears),
                              ("--dtype", config.dtype), ("--device", args.device),
                              ("--warmup", config.warmup), ("--repeats", config.repeats),
                              ("--threads", torch.get_num_threads()), ("--smoke", args.smoke), ("--out", args.out)])
    rows = run_e2e(config, run_metadata(config.device), progress=not args.no_progress)
    return _finish(rows, Path(args.out), E2E_CSV, command, TABLE_COLUMNS, TABLE_HEADERS)


def run_spec_command(args) -> int:
    from .results import SPEC_CSV, run_metadata
    from .speculative import TABLE_COLUMNS, TABLE_HEADERS, SpecConfig, run_spec, smoke_config

    if args.threads:
        torch.set_num_threads(args.threads)
    config = smoke_config() if args.smoke else SpecConfig()
    _set(config, model=args.model if not args.smoke else None, variants=args.variants,
         per_class=None if args.smoke else args.per_class, new_tokens=None if args.smoke else args.new_tokens,
         dtype=args.dtype, device=args.device, warmup=args.warmup)
    config.pack_linears = args.pack_linears
    command = _command(args, [("--model", config.model), ("--variants", config.variants),
                              ("--pack-linears", config.pack_linears),
                              ("--per-class", config.per_class), ("--new-tokens", config.new_tokens),
                              ("--dtype", config.dtype), ("--device", args.device), ("--warmup", config.warmup),
                              ("--threads", torch.get_num_threads()), ("--smoke", args.smoke), ("--out", args.out)])
    rows = run_spec(config, run_metadata(config.device), progress=not args.no_progress)
    summary = [r for r in rows if r["prompt"] == "all"]
    code = _finish(rows, Path(args.out), SPEC_CSV, command, TABLE_COLUMNS, TABLE_HEADERS, table_rows=summary)
    different = [r for r in rows if r["prompt"] != "all" and not r["identical"]]
    if different:
        logger.error("%d (prompt, variant) outputs differ from greedy: %s", len(different),
                     sorted({(r["prompt"], r["variant"]) for r in different}))
        return 1
    return code


def run_vision_command(args) -> int:
    from .vision_prefill import run
    from .results import VISION_CSV, run_metadata

    if args.threads:
        torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    if not keeps or any(not 0 < k <= 1 for k in keeps):
        raise SystemExit(f"--keeps: ratios in (0, 1], got {args.keeps!r}")
    methods = args.methods or ["divprune", "fastv"]
    repeats = 1 if args.smoke else (args.repeats or 3)
    shape = dict(hidden=64, layers=3, heads=4, kv_heads=2, patches_side=6) if args.smoke else {}
    command = _command(args, [("--keeps", keeps), ("--methods", methods), ("--repeats", repeats),
                              ("--threads", torch.get_num_threads()), ("--smoke", args.smoke), ("--out", args.out)])
    meta = run_metadata("cpu")
    rows = [{**meta, **row} for row in run(keeps, methods, repeats, **shape)]
    columns = ["method", "keep", "image_tokens", "gflops", "flops_ratio", "prefill_s", "speedup"]
    headers = ["method", "keep", "image tokens", "GFLOPs", "FLOPs ratio", "prefill s", "speedup"]
    return _finish(rows, Path(args.out), VISION_CSV, command, columns, headers)


def run_vllm_command(args) -> int:
    import sys

    from .results import run_metadata
    from .vllm import DEFAULT_POLICY, TABLE_COLUMNS, TABLE_HEADERS, VLLM_CSV, VLLMBenchConfig, run_vllm_bench, table_rows

    config = VLLMBenchConfig(model=args.model, contexts=args.contexts, concurrency=args.concurrency,
                             policies=args.policy or [DEFAULT_POLICY], new_tokens=args.new_tokens,
                             tasks=[] if args.tasks == ["none"] else args.tasks, samples=args.samples,
                             block_size=args.block_size, dtype=args.dtype, seed=args.seed)
    command = _command(args, [("--model", config.model), ("--contexts", config.contexts),
                              ("--concurrency", config.concurrency), ("--policy", config.policies),
                              ("--new-tokens", config.new_tokens), ("--tasks", config.tasks or ["none"]),
                              ("--samples", config.samples), ("--block-size", config.block_size),
                              ("--dtype", config.dtype), ("--seed", config.seed), ("--out", args.out)])
    try:
        rows = run_vllm_bench(config, run_metadata("cpu"), progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokaccel bench vllm: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the vLLM run failed: the end of its log
        print(f"tokaccel bench vllm: {e}", file=sys.stderr)
        return 1
    return _finish(rows, Path(args.out), VLLM_CSV, command, TABLE_COLUMNS, TABLE_HEADERS, table_rows=table_rows(rows))


def main(argv: list[str] | None = None) -> int:
    """`python -m tokaccel.bench.cli bench ops ...`: the bench commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="tokaccel")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
