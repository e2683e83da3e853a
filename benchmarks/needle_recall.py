"""How much of the needle does TokenSelect's selection hold? (SmolLM2 beyond its 8K window)

Runs an eval-harness needle task under TokenSelect and, per sample, reports the share of the
needle sentence's tokens in each layer's selection made by the question's prefill chunk, the
share of the answer value's tokens in each decode-step selection (misses only; tokens in the sinks or the local
window count as read), whether the answer was right, and the share of the candidates a selection
holds (k / candidates: what a random selection would give).

Prints one line per sample and appends the same rows to OUT/needle_recall.csv (tokaccel.probe
records the selections). Any selection policy's spec works (tokenselect, hisa, quest, fasa).

Run: python benchmarks/needle_recall.py [--length 16384 --samples 1,2,4,8 --task niah_single_2
     --spec tokenselect:k=2048 --out benchmarks/results/scripts]
"""
import argparse
from pathlib import Path

import torch

import tokaccel
from tokaccel import models
from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.evals.decoding import eos_ids, greedy, prefill
from tokaccel.evals.tasks import make_samples
from tokaccel.probe import record_selections


def value_span(tokenizer, ids: list[int], value: str) -> range:
    """Token positions of the first occurrence of `value` in the decoded `ids`."""
    lo, hi = 0, len(ids)
    while lo < hi:  # shortest prefix whose text holds the value
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if value in tokenizer.decode(ids[:mid]) else (mid + 1, hi)
    start = lo - 1
    while value not in tokenizer.decode(ids[start:lo]):
        start -= 1
    return range(start, lo)


def read_share(record, needle: set[int]) -> float:
    """Share of the `needle` positions a selection read: chosen, or outside its candidates
    [start, end) (the sinks and the local window are read too)."""
    chosen = record.chosen()
    return sum(1 for t in needle if t in chosen or not record.start <= t < record.end) / len(needle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", default="1,2,4,8", help="indices among 10 samples (depths 0, 1/9, ..., 1)")
    parser.add_argument("--spec", default="tokenselect:k=2048")
    parser.add_argument("--sentence", type=int, default=20, help="needle tokens counted before the value's end")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load(args.model, dtype=torch.bfloat16)
    samples = make_samples(args.task, tokenizer, args.length, 10)
    print(f"{args.model} {args.task} {args.length} {args.spec}: share of needle tokens selected, mean over layers")
    print(f"{'sample':>6s} {'depth':>5s} {'right':>5s} {'random':>6s} {'question chunk':>14s} {'decode misses (value)':>22s}")
    meta, path = run_metadata("cpu"), Path(args.out) / "needle_recall.csv"
    for i in (int(x) for x in args.samples.split(",")):
        sample = samples[i]
        question = sample.questions[0]
        value = value_span(tokenizer, sample.context_ids, question.answers[0])
        sentence = set(range(value.stop - args.sentence, value.stop))
        with tokaccel.patched(model, args.spec):
            cache, logits = prefill(model, sample.context_ids, chunk=2048)
            with record_selections(model) as selections:  # the question's chunk and the decode steps
                out = greedy(model, cache, question.ids, len(sample.context_ids), sample.max_new_tokens,
                             eos_ids(model, tokenizer), 2048, first_logits=logits)
        asked = [r for r in selections if r.queries > 1]
        decoded = [r for r in selections if r.queries == 1]
        q_share = sum(read_share(r, sentence) for r in asked) / max(len(asked), 1)
        d_share = sum(read_share(r, set(value)) for r in decoded) / max(len(decoded), 1)
        random_share = sum(len(r.chosen()) / (r.end - r.start) for r in asked) / max(len(asked), 1)
        right = question.answers[0] in tokenizer.decode(out)
        print(f"{i:6d} {sample.depth:5.2f} {str(right):>5s} {random_share:6.2f} {q_share:14.2f} {d_share:22.2f}")
        append_rows(path, [{  # row by row: a long run keeps what it measured
            **meta, "model": args.model, "task": args.task, "length": args.length, "spec": args.spec,
            "sentence_tokens": args.sentence, "sample": i, "depth": sample.depth, "right": right,
            "random_share": random_share, "question_chunk_share": q_share, "decode_value_share": d_share,
            "question_selections": len(asked), "decode_selections": len(decoded)}])
    print("rows ->", path)


if __name__ == "__main__":
    main()
