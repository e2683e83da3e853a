"""Top-K overlap of FASA's combined partial score (all dominant dims of a head together) with the
full q.k score, on SmolLM2's real queries and keys of an essay-haystack sample that the default
calibration did not see.

Per layer: 32 query positions over the second half of a 2,048-token sample; for each query head,
|topK(q[dims] . K[dims]) ∩ topK(q . K)| / K with K = 128 (causal), averaged over heads and positions.
This is the raw per-head ranking, not the policy's soft-vote selection.
Needs the calibration: tokaccel calibrate --model smollm2 --policy fasa --samples 2 --length 2048
Prints the figures and appends them as one row (per-layer values space-separated) to
OUT/fasa_overlap.csv.
Run: python benchmarks/fasa_overlap.py [CALIBRATION.json] [--out DIR]  (default: the model's
calibration file; about 20 s on one CPU thread).
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from tokaccel import models
from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.calibrate import calibration_path, fc_dims, haystack_samples, load_calibration, query_positions
from tokaccel.patch import patched
from tokaccel.policies.dense import Dense, dense_with_stats

TOP_K = 128
POSITIONS = 32  # query positions per layer
LENGTH = 2048


@dataclass
class _CombinedOverlap(Dense):
    name: ClassVar[str] = "fasa-overlap"
    backend: str = "sdpa"
    calibration: dict = None
    overlap: dict = None  # layer -> mean overlap

    def attend(self, ctx, module, query, key, value, attention_mask, **kwargs):
        q, k = query[0].float(), key[0].float()  # [H, N, D], [Hk, N, D]
        H, N, D = q.shape
        Hk = k.shape[0]
        pos = query_positions(N, TOP_K, POSITIONS)
        qg = q[:, pos].reshape(Hk, H // Hk, -1, D)
        dims = torch.tensor([fc_dims(f, D, "hf") for f in self.calibration["dominant_fcs"][ctx.info.layer_idx]])
        full = torch.einsum("hgqd,hnd->hgqn", qg, k)
        part = torch.einsum("hgqd,hnd->hgqn", qg.gather(3, dims[:, None, None].expand(*qg.shape[:3], -1)),
                            k.gather(2, dims[:, None].expand(Hk, N, -1)))
        future = torch.arange(N)[None] > pos[:, None]
        full.masked_fill_(future, float("-inf"))
        part.masked_fill_(future, float("-inf"))
        in_full = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, full.topk(TOP_K).indices, True)
        self.overlap[ctx.info.layer_idx] = in_full.gather(-1, part.topk(TOP_K).indices).float().mean().item()
        return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calibration", nargs="?", help="calibration JSON (default: the model's calibration file)")
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = args.calibration
    calibration = load_calibration(source, "smollm2-135m-instruct", "hf")
    model, tokenizer = models.load("smollm2")
    ids = haystack_samples(tokenizer, 3, LENGTH)[2]  # starts 2/3 into the essay; calibration's 2 samples at 0 and 1/2
    probe = _CombinedOverlap(calibration=calibration, overlap={})
    with patched(model, probe):
        model(input_ids=ids, use_cache=False)
    values = [probe.overlap[layer] for layer in sorted(probe.overlap)]
    path = Path(source or calibration_path("smollm2-135m-instruct")).name
    print(f"{path}: {calibration['n_fc']} FCs per head, selection {calibration.get('selection', 'single')}")
    print(f"combined top-{TOP_K} overlap: mean {sum(values) / len(values):.3f}, "
          f"layers {min(values):.3f}-{max(values):.3f}")
    print("per layer:", [round(v, 2) for v in values])
    row = {**run_metadata("cpu"), "model": "smollm2-135m-instruct", "calibration": path,
           "n_fc": calibration["n_fc"], "selection": calibration.get("selection", "single"), "length": LENGTH,
           "positions": POSITIONS, "top_k": TOP_K, "mean_overlap": sum(values) / len(values),
           "min_layer_overlap": min(values), "max_layer_overlap": max(values),
           "per_layer_overlap": " ".join(f"{v:.4f}" for v in values)}
    print("rows ->", append_rows(Path(args.out) / "fasa_overlap.csv", [row]))


if __name__ == "__main__":
    main()
