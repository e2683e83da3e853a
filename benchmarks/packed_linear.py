"""What does a forward of M tokens cost on this CPU, with nn.Linear as is and with packed weights?

A speculative verify forward feeds 2-80 tokens where decoding feeds one; if the M-token forward
costs about what the 1-token one costs, every accepted draft token is nearly free. This times,
interleaved, (1) each linear shape of SmolLM2-135M with `F.linear` and with the oneDNN-packed
weight of `tokaccel.cpu_linear`, and (2) the whole SmolLM2 forward of M tokens after a 200-token
cache, a plain and a packed copy of the model, all sizes interleaved round by round (the packed
model's logits are checked against the plain ones). Timer: tokaccel.bench.timing.time_interleaved
(one warm-up round, no cache flush); ratios are medians of per-round ratios (paired_ratio).
Prints both tables and appends their rows (column `table`: linear | model) to OUT/packed_linear.csv.

Run: python benchmarks/packed_linear.py [--rows 1,4,8,16,32,81 --repeats 15 --threads 2 --no-model --out DIR]
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.bench.timing import paired_ratio, time_interleaved
from tokaccel.cpu_linear import PACK_ROWS

COLUMNS = ("table", "shape", "tokens", "plain_ms", "packed_ms", "packed_speedup", "plain_vs_first_rows",
           "packed_vs_first_rows", "pack_s")  # of a row; the model table's rows fill them all
SHAPES = {"q/o proj": (576, 576), "k/v proj": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}  # SmolLM2-135M (out_features, in_features)


def linear_table(rows: list[int], repeats: int) -> list[dict]:
    print("| linear (out, in) | rows | F.linear ms | packed ms | packed speedup |\n|---|---|---|---|---|")
    out = []
    for label, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        for m in rows:
            x = torch.randn(1, m, in_f)
            t = time_interleaved({"plain": lambda: F.linear(x, weight),
                                  "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")},
                                 repeats=repeats, flush=False)
            plain_ms, packed_ms, speedup = t["plain"].median_s * 1e3, t["packed"].median_s * 1e3, \
                paired_ratio(t["plain"], t["packed"])
            print(f"| {label} {out_f}x{in_f} | {m} | {plain_ms:.3f} | {packed_ms:.3f} | {speedup:.2f} |")
            out.append({"table": "linear", "shape": f"{label} {out_f}x{in_f}", "tokens": m, "plain_ms": plain_ms,
                        "packed_ms": packed_ms, "packed_speedup": speedup})
    return out


def model_table(rows: list[int], repeats: int) -> list[dict]:
    from transformers import DynamicCache

    from tokaccel import models
    from tokaccel.cpu_linear import pack_linears

    variants = {"plain": models.load("smollm2-135m-instruct")[0], "packed": models.load("smollm2-135m-instruct")[0]}
    start = time.perf_counter()
    pack_linears(variants["packed"])
    pack_s = time.perf_counter() - start
    print(f"\npacking SmolLM2's linears took {pack_s:.2f} s")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 200), generator=gen)
    caches = {kind: DynamicCache(config=model.config) for kind, model in variants.items()}
    inputs = {m: (torch.randint(100, 20000, (1, m), generator=gen), torch.arange(200, 200 + m)[None]) for m in rows}
    logits = {}

    def forward(m: int, kind: str):  # M tokens after the 200-token cache, then the cache back to 200
        def run():
            ids, pos = inputs[m]
            logits[m, kind] = variants[kind](ids, cache=caches[kind], position_ids=pos).logits
            caches[kind].crop(-m)
        return run

    with torch.inference_mode():
        for kind, model in variants.items():
            model(prompt, cache=caches[kind])
        # every (rows, variant) interleaved round by round; one warm-up round
        t = time_interleaved({(m, kind): forward(m, kind) for m in rows for kind in variants}, repeats=repeats,
                             flush=False)
        for m in rows:
            torch.testing.assert_close(logits[m, "packed"], logits[m, "plain"], rtol=1e-4, atol=1e-4)
    print("\n| SmolLM2 forward | tokens | plain ms | packed ms | plain / 1-token plain | "
          "packed / 1-token packed | packed speedup |\n|---|---|---|---|---|---|---|")
    out = []
    for m in rows:
        plain, packed = t[m, "plain"].median_s * 1e3, t[m, "packed"].median_s * 1e3
        plain_x = paired_ratio(t[m, "plain"], t[rows[0], "plain"])
        packed_x = paired_ratio(t[m, "packed"], t[rows[0], "packed"])
        speedup = paired_ratio(t[m, "plain"], t[m, "packed"])
        print(f"| | {m} | {plain:.1f} | {packed:.1f} | {plain_x:.2f} | {packed_x:.2f} | {speedup:.2f} |")
        out.append({"table": "model", "shape": "SmolLM2-135M forward after 200 tokens", "tokens": m,
                    "plain_ms": plain, "packed_ms": packed, "packed_speedup": speedup,
                    "plain_vs_first_rows": plain_x, "packed_vs_first_rows": packed_x, "pack_s": pack_s})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,32,81")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-model", action="store_true", help="only the per-linear table")
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"median ms of {args.repeats} interleaved runs, {args.threads} thread(s), fp32, packed for "
          f"{PACK_ROWS} rows; ratios are medians of per-run ratios")
    results = linear_table(rows, args.repeats)
    if not args.no_model:
        results += model_table(rows, args.repeats)
    meta = {**run_metadata("cpu"), "repeats": args.repeats, "pack_rows": PACK_ROWS}
    print("rows ->", append_rows(Path(args.out) / "packed_linear.csv",
                                 [{**meta, **dict.fromkeys(COLUMNS), **row} for row in results]))


if __name__ == "__main__":
    main()
