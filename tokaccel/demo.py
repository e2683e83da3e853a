"""`tokaccel demo`: load the embedded default model, generate with each policy, print a table."""

from __future__ import annotations

import argparse
import time

import torch

from . import models
from .patch import patched, stats

DEMO_QUESTION = "In two sentences, what does the text above say about the `with` statement?"


def _context_text(tokenizer, tokens: int) -> str:
    """Natural English from the Python docs (stdlib, offline), cut to about `tokens` tokens."""
    from pydoc_data.topics import topics

    text = topics["with"] + "\n" + topics["context-managers"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def _prompt_ids(tokenizer, context_tokens: int) -> dict:
    content = _context_text(tokenizer, context_tokens) + "\n\n" + DEMO_QUESTION
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return tokenizer(content + "\nAnswer:", return_tensors="pt")


@torch.no_grad()
def _timed_generate(model, batch, new_tokens: int):
    """(generated ids [T], prefill seconds, seconds per decoded token), after one warm-up call."""
    model.generate(**batch, max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    model.generate(**batch, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    total = time.perf_counter() - start
    generated = out[0, batch["input_ids"].shape[1]:]
    per_token = max(total - prefill, 0.0) / max(len(generated) - 1, 1)
    return generated, prefill, per_token


def run_demo(model, tokenizer, model_name: str, policies: list[str], context_tokens: int, new_tokens: int) -> str:
    """Generate with the unpatched model and each policy; return a markdown table."""
    batch = _prompt_ids(tokenizer, context_tokens)
    reference, first, per_token = _timed_generate(model, batch, new_tokens)
    rows = [("unpatched (HF sdpa)", first, per_token, "-", "-", tokenizer.decode(reference, skip_special_tokens=True))]
    for spec in policies:
        with patched(model, spec):
            generated, first, per_token = _timed_generate(model, batch, new_tokens)
            counters = stats(model)
        same = "yes" if torch.equal(generated, reference) else "no"
        rows.append((spec, first, per_token, same, f"{counters.get('keys_read_per_call', 0):.0f}",
                     tokenizer.decode(generated, skip_special_tokens=True)))
    prompt_len = batch["input_ids"].shape[1]
    lines = [
        f"model: {model_name}  prompt: {prompt_len} tokens  new tokens: {new_tokens}  "
        f"threads: {torch.get_num_threads()}",
        "",
        "| policy | prefill (s) | per token (ms) | same tokens as unpatched | keys read / call | output |",
        "|---|---|---|---|---|---|",
    ]
    for name, first, per_token, same, keys, text in rows:
        text = " ".join(text.split())[:80].replace("|", "\\|")
        lines.append(f"| {name} | {first:.2f} | {per_token * 1e3:.1f} | {same} | {keys} | {text} |")
    return "\n".join(lines)


def _demo_command(args) -> int:
    policies = [p for p in args.policies.split(";") if p.strip()]
    model, tokenizer = models.load(args.model)
    print(run_demo(model, tokenizer, args.model, policies, args.context, args.new_tokens))
    if args.no_eval:
        return 0
    from .evals import QUICK, TINY, run_eval, summary_table
    from .models import cache_dir

    suite = {**(TINY if args.tiny else QUICK), "model": (model, tokenizer)}
    print(f"\nquick accuracy suite ({', '.join(suite['tasks'])} at {suite['lengths']} tokens, "
          f"{suite['samples']} samples; cached under {cache_dir() / 'demo-results'}):\n")
    results = run_eval(**suite, model_name=args.model, policies=policies,
                       out=cache_dir() / "demo-results", write_summary=False)
    print(summary_table(results))
    return 0


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="generate with each policy on the default model and print a table",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--model", default=models.DEFAULT_MODEL, help="embedded name, HF id or path")
    demo.add_argument("--policies", default="dense;tokenselect:k=256,n_init=64,n_local=128",
                      help="policy specs separated by ';'")
    demo.add_argument("--context", type=int, default=1024, help="prompt context length in tokens")
    demo.add_argument("--new-tokens", type=int, default=32)
    demo.add_argument("--no-eval", action="store_true", help="skip the quick accuracy suite")
    demo.add_argument("--tiny", action="store_true", help="run the tiny accuracy suite (CI smoke) instead of the quick one")
    demo.set_defaults(func=_demo_command)
