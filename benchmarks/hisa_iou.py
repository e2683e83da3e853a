"""Mean IoU of HISA's candidate set with flat TokenSelect's on SmolLM2's real decode queries.

Records (tokaccel.probe) the scoring query and the cached (pre-RoPE) keys of every layer at each
decode-step miss of flat TokenSelect (k=256, 2,000-token prompt, 3 new tokens, theta=1: every step
a miss), then compares HISA's choice for the same inputs (tokaccel.policies.hisa.selection_iou).
Prints one line per HISA setting and appends the same rows to OUT/hisa_iou.csv.
Run: python benchmarks/hisa_iou.py [--out benchmarks/results/scripts]  (about 20 s on one CPU thread).
"""
import argparse
from pathlib import Path

import torch

import tokaccel
from tokaccel import models
from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.policies import HISA, TokenSelect
from tokaccel.policies.hisa import selection_iou
from tokaccel.probe import record_selections

SETTINGS = [(64, 32, "mean"), (64, 8, "mean"), (64, 8, "bound"), (64, 16, "mean"), (64, 16, "bound"), (32, 16, "mean")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = models.load("smollm2-135m-instruct")
    text = " ".join(f"Line {i}: the colour of box {i} is {['red','blue','green','amber'][i % 4]}." for i in range(150))
    ids = tok(text + " The colour of box 77 is", return_tensors="pt").input_ids[:, :2000]
    print("context", ids.shape[1])
    flat = TokenSelect(k=256, n_init=32, n_local=128, theta=1.0)
    with torch.no_grad(), tokaccel.patched(model, flat), record_selections(model, keys=True) as records:
        model.generate(ids, max_new_tokens=3, do_sample=False)
    misses = [(r.scoring_query, r.keys) for r in records if r.queries == 1 and r.cached]
    print("decode misses recorded", len(misses))
    meta, rows = run_metadata("cpu"), []
    for block, m, score in SETTINGS:
        hisa = HISA(k=256, n_init=32, n_local=128, block=block, m=m, block_score=score)
        ious = torch.stack([selection_iou(hisa, flat, q, keys)[0] for q, keys in misses])
        print(f"block={block} m={m} ({m*block} of ~{ids.shape[1]} tokens) {score}: mean IoU {ious.mean():.3f} "
              f"min {ious.min():.3f}")
        rows.append({**meta, "model": "smollm2-135m-instruct", "context": ids.shape[1], "k": 256, "n_init": 32,
                     "n_local": 128, "block": block, "m": m, "block_score": score, "misses": len(misses),
                     "mean_iou": ious.mean().item(), "min_iou": ious.min().item()})
    print("rows ->", append_rows(Path(args.out) / "hisa_iou.csv", rows))


if __name__ == "__main__":
    main()
