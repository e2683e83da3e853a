"""Share of TokenSelect's selection that FASA's scorer recovers, on SmolLM2's real niah prompts.

Records every scoring call (query, candidate keys) of flat TokenSelect (theta=1: a new selection
each step) on 4 niah_single_2 prompts of the eval harness (prefill and 4 decode steps), then, for
each call past layer 0, |FASA's top-k ∩ TokenSelect's top-k| / |TokenSelect's top-k|, both from
the soft vote, FASA's with each head's calibrated dims only. Budget as the equal-budget evals:
B = fraction * length, n_init = B/16, n_local = B/8, k = the rest.
Prints one line per calibration and appends the same rows to OUT/fasa_recall.csv.
Run: python benchmarks/fasa_recall.py [--length 1024] [--fraction 0.125] [--out DIR] CAL.json[:n_fc] ...
(about 1 min per calibration on one CPU thread).
"""
import argparse
from pathlib import Path

import torch

import tokaccel
from tokaccel import models
from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.calibrate import fc_dims, load_calibration
from tokaccel.evals.tasks import make_samples
from tokaccel.policies import TokenSelect
from tokaccel.policies.fasa import resized
from tokaccel.probe import record_selections
from tokaccel.selection import soft_vote, top_k


def record_choices(model, tok, length: int, policy: TokenSelect) -> list[tuple]:
    """(layer, q, candidate keys, scale, valid, query_valid) of every TokenSelect scoring call."""
    records = []
    with torch.no_grad(), tokaccel.patched(model, policy):
        for sample in make_samples("niah_single_2", tok, length, 4, seed=0):
            with record_selections(model, keys=True) as calls:
                model.generate(torch.tensor([sample.prompt_ids()]), max_new_tokens=4, do_sample=False)
            records += [(r.layer_idx, r.scoring_query.float(), r.keys[:, :, r.start:r.end].float(), r.scale, r.valid,
                         r.query_valid) for r in calls]
    return records


def partial(q: torch.Tensor, keys: torch.Tensor, dims: torch.Tensor):
    """q [B, H, (w,) D] and keys [B, Hk, N, D] restricted to each KV head's dims [Hk, d]."""
    per_query_head = dims.repeat_interleave(q.shape[1] // keys.shape[1], 0)  # [H, d]
    index = per_query_head[None] if q.dim() == 3 else per_query_head[None, :, None]
    qp = q.gather(-1, index.expand(*q.shape[:-1], -1))
    kp = keys.gather(3, dims[None, :, None].expand(keys.shape[0], -1, keys.shape[2], -1))
    return qp, kp


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calibrations", nargs="+", help="calibration JSON files, each optionally :n_fc")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--fraction", type=float, default=0.125)
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = models.load("smollm2-135m-instruct")
    budget = int(args.length * args.fraction)
    n_init, n_local = budget // 16, budget // 8
    k = budget - n_init - n_local
    meta, rows = run_metadata("cpu"), []
    records = record_choices(model, tok, args.length, TokenSelect(k=k, n_init=n_init, n_local=n_local, theta=1.0))
    for spec in args.calibrations:
        path, _, n_fc = spec.partition(":")
        cal = load_calibration(path, "", "hf")
        n_fc = int(n_fc) if n_fc else cal["n_fc"]
        recall = []
        for layer, q, keys, scale, valid, query_valid in records:
            if layer == 0:
                continue
            fcs = [resized(c, row, n_fc, cal.get("selection", "single"))
                   for c, row in zip(cal["dominant_fcs"][layer], cal["overlap"][layer])]
            dims = torch.tensor([fc_dims(f, q.shape[-1], "hf") for f in fcs])
            want, want_valid = top_k(soft_vote(q, keys, scale, valid, "group", query_valid), k, None)
            got, got_valid = top_k(soft_vote(*partial(q, keys, dims), scale, valid, "group", query_valid), k, None)
            want_set = set(want[0][want_valid[0]].tolist())
            recall.append(len(want_set & set(got[0][got_valid[0]].tolist())) / max(len(want_set), 1))
        r = torch.tensor(recall)
        print(f"{path} n_fc={n_fc} ({cal.get('selection', 'single')}): k={k} at {args.length} tokens, recall of "
              f"TokenSelect's selection {r.mean():.3f} (min {r.min():.3f}, {len(recall)} layer-steps)")
        rows.append({**meta, "model": "smollm2-135m-instruct", "task": "niah_single_2", "samples": 4,
                     "length": args.length, "fraction": args.fraction, "k": k, "n_init": n_init, "n_local": n_local,
                     "calibration": Path(path).name, "n_fc": n_fc, "selection": cal.get("selection", "single"),
                     "layer_steps": len(recall), "mean_recall": r.mean().item(), "min_recall": r.min().item()})
    print("rows ->", append_rows(Path(args.out) / "fasa_recall.csv", rows))


if __name__ == "__main__":
    main()
