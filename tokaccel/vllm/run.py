"""Greedy generation through a vLLM engine, with or without a tokaccel policy, as a command that
writes JSON (vLLM starts worker processes, so callers run it as its own process):

    python -m tokaccel.vllm.run --model DIR --prompts prompts.json --max-tokens 16 \\
        --out result.json [--policy "tokenselect:k=1024"] [--repeat-with-max-tokens 1]

prompts.json: a list of strings or of token-id lists. Output: {"outputs": [[token ids]...],
"seconds": generate() wall time, "seconds_short": the same prompts with --repeat-with-max-tokens
(decode time = seconds - seconds_short), "stats": tokaccel counters}. Without --policy the engine
runs vLLM's own attention (the plugin is switched off with VLLM_PLUGINS="").
"""

from __future__ import annotations

import argparse
import json
import os
import time


def engine(model: str, policy: str | None, max_model_len: int, max_num_seqs: int, block_size: int | None = None,
           prefix_caching: bool = False):
    """A vLLM `LLM` on CPU in float32, eager; tokaccel's policy through additional_config."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if policy is None:
        os.environ["VLLM_PLUGINS"] = ""  # vLLM's own backend, not tokaccel's subclass
    from vllm import LLM

    extra = {"tokaccel_policy": policy} if policy else {}
    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
               max_num_seqs=max_num_seqs, seed=0, block_size=block_size, additional_config=extra,
               enable_prefix_caching=prefix_caching)


def generate(llm, prompts: list, max_tokens: int) -> tuple[list[list[int]], float]:
    """(greedy token ids per prompt, wall seconds)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    start = time.perf_counter()
    results = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [list(r.outputs[0].token_ids) for r in results], seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON file: list of strings or token-id lists")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policy", default=None)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=None, help="KV cache block size (vLLM's CPU default: 128)")
    parser.add_argument("--repeat-with-max-tokens", type=int, default=None,
                        help="run the prompts again with this many new tokens, to subtract prefill time")
    parser.add_argument("--out", required=True, help="JSON file to write (vLLM logs to stdout)")
    parser.add_argument("--warmup", action="store_true", help="one short generate() first (not timed)")
    args = parser.parse_args(argv)
    with open(args.prompts) as f:
        prompts = json.load(f)
    llm = engine(args.model, args.policy, args.max_model_len, args.max_num_seqs, args.block_size)
    if args.warmup:
        generate(llm, prompts[:1], 2)
    outputs, seconds = generate(llm, prompts, args.max_tokens)
    result = {"outputs": outputs, "seconds": seconds}
    if args.repeat_with_max_tokens is not None:
        result["seconds_short"] = generate(llm, prompts, args.repeat_with_max_tokens)[1]
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
