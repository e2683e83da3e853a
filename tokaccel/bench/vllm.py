"""`tokaccel bench vllm`: decode throughput and accuracy through a real vLLM engine (CPU): vLLM's own
attention backend ("vllm") against tokaccel's backend with a policy, on the same prompts, at
several context lengths and concurrencies (issue 28).

    tokaccel bench vllm --contexts 2048,8000 --concurrency 1,4 \\
        --policy quest:k=768,page=32,n_init=64,n_local=192 --new-tokens 32 --tasks niah_single_2 --samples 3

This process (the main environment) builds every prompt as token ids: per context, `concurrency`
distinct random-word prompts of exactly `context` tokens (decode timing) and `--samples` samples
of each task as `tokaccel eval` builds them (same tokenizer, chat template and seed). Each backend
gets one engine, in its own process of the vLLM environment (`python -m tokaccel.bench.vllm JOB
OUT`, ./run.sh vllm-setup makes it): per (context, concurrency) the prompts are prefilled once
with prefix caching on, then generate() with 1 new token (t_1, prefill served by the cache) and
with 1 + new_tokens (t_n) are timed: decode tokens/s = concurrency * new_tokens / (t_n - t_1),
ms per token = (t_n - t_1) / new_tokens. Then the task samples are answered greedily (EOS stops)
in one batch, decoded and scored here with the task's metric: a score per (backend, task,
context). Rows, each with `run_metadata`, the vLLM version and the backend, go to
<out>/bench_vllm.csv.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VLLM_CSV = "bench_vllm.csv"
DEFAULT_POLICY = "quest:k=768,page=32,n_init=64,n_local=192"
BASELINE = "vllm"  # vLLM's own CPU attention backend (CPU_ATTN)
TABLE_COLUMNS = ["backend", "case", "task", "context", "concurrency", "decode_tok_per_s", "ms_per_token",
                 "speedup_vs_vllm", "score", "samples"]
TABLE_HEADERS = ["backend", "case", "task", "context", "concurrency", "decode tok/s", "ms/token", "speed-up vs vLLM",
                 "score", "samples"]
WORDS = ("the of and to in is was for on that with as by at from his her they this which river city music "
         "history school garden market winter summer letter window morning evening story number").split()


@dataclass
class VLLMBenchConfig:
    model: str = "smollm2-135m-instruct"
    contexts: list[int] = field(default_factory=lambda: [2048, 8000])
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    policies: list[str] = field(default_factory=lambda: [DEFAULT_POLICY])
    new_tokens: int = 32
    tasks: list[str] = field(default_factory=lambda: ["niah_single_2"])
    samples: int = 3
    block_size: int = 32
    dtype: str = "float32"
    seed: int = 0
    chat: bool | None = None


def random_prompts(tokenizer, length: int, count: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens of random English words (distinct per prompt; the
    first c of `count` are those of c)."""
    out = []
    for i in range(count):
        rng = random.Random(f"{seed}/{length}/{i}")
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer(" ".join(rng.choice(WORDS) for _ in range(512)), add_special_tokens=False)["input_ids"]
        out.append(ids[:length])
    return out


# ---------------------------------------------------------------- the vLLM side (one backend)


def worker(job: dict) -> dict:
    """Runs in the vLLM environment: every decode case and every request of one backend."""
    from ..vllm.run import engine, engine_versions, generate, generate_requests

    started = time.perf_counter()
    llm = engine(job["model"], job["policy"], job["max_model_len"], job["max_num_seqs"], job["block_size"],
                 prefix_caching=True, dtype=job["dtype"])
    engine_s = time.perf_counter() - started
    decode = []
    new = job["new_tokens"]
    for case in job["decode"]:
        for concurrency in job["concurrency"]:
            prompts = case["prompts"][:concurrency]
            _, prefill_s = generate(llm, prompts, 1)  # prefill, kept by prefix caching
            _, short = generate(llm, prompts, 1)
            _, full = generate(llm, prompts, 1 + new)
            seconds = full - short
            decode.append({"context": case["context"], "concurrency": concurrency, "new_tokens": new,
                           "decode_s": seconds, "decode_tok_per_s": concurrency * new / seconds,
                           "ms_per_token": 1000 * seconds / new, "prefill_s": prefill_s})
    outputs, accuracy_s = generate_requests(llm, job["requests"])
    return {"decode": decode, "outputs": outputs, "versions": engine_versions(), "engine_start_s": engine_s,
            "accuracy_s": accuracy_s}


def main(argv=None) -> int:
    """`python -m tokaccel.bench.vllm JOB.json OUT.json` (what `tokaccel bench vllm` starts)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tokaccel.bench.vllm JOB.json OUT.json (started by `tokaccel bench vllm`)",
              file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(worker(job)))
    return 0


# ---------------------------------------------------------------- the main environment's side


def check(config: VLLMBenchConfig):
    """(model folder, backends [(name, spec or None)], tasks), checked before any engine starts."""
    from ..evals.tasks import get_task
    from ..vllm.run import vllm_model_dir, vllm_policy, vllm_python

    for name, values, low in (("--contexts", config.contexts, 1), ("--concurrency", config.concurrency, 1)):
        if not values or any(int(v) < low for v in values):
            raise ValueError(f"{name}: positive integers, got {values}")
    if config.new_tokens < 1 or config.samples < 0 or config.block_size < 1:
        raise ValueError(f"--new-tokens and --block-size must be >= 1, --samples >= 0 (got {config.new_tokens}, "
                         f"{config.block_size}, {config.samples})")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: float32, bfloat16 or float16, got {config.dtype!r}")
    backends = [(BASELINE, None)]
    for spec in config.policies:
        checked = vllm_policy(spec)
        if checked is None:
            continue  # "dense" is vLLM's own backend, the baseline
        if checked in (b for _, b in backends):
            raise ValueError(f"--policy repeats {checked!r}")
        backends.append((checked, checked))
    tasks = [get_task(t) for t in config.tasks] if config.samples else []
    for task in tasks:
        if task.kind == "ppl":
            raise ValueError(f"task {task.name}: perplexity is not a generation task; use passkey, niah_*, vt, ...")
    folder = vllm_model_dir(config.model)
    vllm_python()
    return folder, backends, tasks


def build_prompts(config: VLLMBenchConfig, tasks, tokenizer, stop: list[int]) -> tuple[list[dict], list[dict], dict]:
    """(decode cases [{context, prompts}], requests for vLLM, {request id: (task, context, sample, question)})."""
    from ..evals.tasks import make_samples

    decode = [{"context": n, "prompts": random_prompts(tokenizer, n, max(config.concurrency), seed=1)}
              for n in config.contexts]
    requests, index = [], {}
    for task in tasks:
        for n in config.contexts:
            for sample in make_samples(task, tokenizer, n, config.samples, config.seed, config.chat):
                for q in range(len(sample.questions)):
                    rid = f"{task.spec or task.name}|{n}|{sample.index}|{q}"
                    requests.append({"id": rid, "prompt_token_ids": sample.prompt_ids(q),
                                     "max_tokens": sample.max_new_tokens, "stop_token_ids": stop})
                    index[rid] = (task.spec or task.name, n, sample, q)
    return decode, requests, index


def score_outputs(outputs: list[dict], index: dict, tokenizer) -> list[dict]:
    """One accuracy row per (task, context): score 0-100 (mean of the samples' mean question scores)."""
    from ..evals.metrics import score

    per_sample: dict[tuple, list[float]] = {}
    for out in outputs:
        task, n, sample, q = index[out["id"]]
        text = tokenizer.decode(out["token_ids"], skip_special_tokens=True)
        value = score(sample.metric, text, sample.questions[q].answers, **sample.metric_args)
        per_sample.setdefault((task, n, sample.index), []).append(value)
    cells: dict[tuple, list[float]] = {}
    for (task, n, _), values in per_sample.items():
        cells.setdefault((task, n), []).append(sum(values) / len(values))
    return [{"case": "accuracy", "task": task, "context": n, "samples": len(values),
             "correct": sum(values), "score": 100.0 * sum(values) / len(values)}
            for (task, n), values in cells.items()]


def run_vllm_bench(config: VLLMBenchConfig, meta: dict, progress: bool = True, tokenizer=None,
                   log_dir: str | Path | None = None) -> list[dict]:
    """Every backend on the same prompts (see the module docstring); the CSV rows, each with `meta`."""
    import tempfile

    from ..evals.vllm_engine import load_tokenizer, stop_ids
    from ..validation import check_int
    from ..vllm.run import model_max_len, run_in_vllm

    folder, backends, tasks = check(config)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    decode, requests, index = build_prompts(config, tasks, tokenizer, stop_ids(tokenizer, folder))
    longest = max([n + 1 + config.new_tokens for n in config.contexts] +
                  [len(r["prompt_token_ids"]) + r["max_tokens"] for r in requests])
    max_model_len = -(-longest // config.block_size) * config.block_size
    check_int("tokaccel bench vllm", "positions (longest prompt + new tokens)", max_model_len, 1,
              model_max_len(folder))
    rows: list[dict] = []
    for backend, policy in backends:
        job = {"model": str(folder), "policy": policy, "dtype": config.dtype, "block_size": config.block_size,
               "max_model_len": max_model_len, "max_num_seqs": max(max(config.concurrency), 16),
               "new_tokens": config.new_tokens, "concurrency": list(config.concurrency), "decode": decode,
               "requests": requests}
        if progress:
            print(f"vllm bench: {backend}: {len(config.contexts)} contexts x concurrency {config.concurrency}, "
                  f"{len(requests)} task prompts", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tokaccel-bench-vllm-") as tmp:
            tmp = Path(tmp)
            (tmp / "job.json").write_text(json.dumps(job))
            log = Path(log_dir) / f"vllm-{len(rows)}.log" if log_dir else tmp / "vllm.log"
            run_in_vllm(["-m", "tokaccel.bench.vllm", str(tmp / "job.json"), str(tmp / "out.json")], log)
            result = json.loads((tmp / "out.json").read_text())
        engine_s = round(time.perf_counter() - started, 1)
        versions = result.get("versions") or {}
        common = {**meta, "vllm": versions.get("vllm", ""), "vllm_torch": versions.get("torch", ""),
                  "vllm_transformers": versions.get("transformers", ""), "backend": backend,
                  "policy": policy or BASELINE, "block_size": config.block_size, "dtype": config.dtype,
                  "model": config.model, "engine_s": engine_s}
        for row in result["decode"]:
            rows.append({**common, "case": "decode", **row})
        for row in score_outputs(result["outputs"], index, tokenizer):
            rows.append({**common, **row})
    base = {(r["context"], r["concurrency"]): r["decode_tok_per_s"] for r in rows
            if r["case"] == "decode" and r["backend"] == BASELINE}
    for r in rows:
        if r["case"] == "decode" and (r["context"], r["concurrency"]) in base:
            r["speedup_vs_vllm"] = r["decode_tok_per_s"] / base[(r["context"], r["concurrency"])]
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """Decode rows by (context, concurrency, backend), then accuracy rows by (task, context, backend)."""
    order = {b: i for i, b in enumerate(dict.fromkeys(r["backend"] for r in rows))}
    decode = sorted((r for r in rows if r["case"] == "decode"),
                    key=lambda r: (r["context"], r["concurrency"], order[r["backend"]]))
    accuracy = sorted((r for r in rows if r["case"] == "accuracy"),
                      key=lambda r: (r["task"], r["context"], order[r["backend"]]))
    return decode + accuracy


if __name__ == "__main__":
    raise SystemExit(main())
