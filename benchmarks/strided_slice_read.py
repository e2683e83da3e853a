"""Is a column slice of a row-major key cache cheaper to read than the whole cache on this CPU?

FASA scores with d of each row's D dims. Stored first in each row (tokaccel's in-place layout),
they are a strided slice K[..., :d]; stored on their own they would be contiguous. This times one
pass over each, SmolLM2's decode shape at 128K tokens, fp32: a sum (torch's reduction over a
strided view is itself slow, so this overstates the strided read) and a copy into a fresh buffer.
Timer: tokaccel.bench.timing.time_interleaved (the six calls interleaved, one warm-up round, no
cache flush). Prints the table and appends one row per cell to OUT/strided_slice_read.csv.

Run: python benchmarks/strided_slice_read.py [--n 131072 --heads 3 --dim 64 --slice 16 --threads 1 --repeats 7 --out DIR]
"""
import argparse
from pathlib import Path

import torch

from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.bench.timing import paired_ratio, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slice", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = torch.randn(1, args.heads, args.n, args.dim)
    strided = keys[..., :args.slice]
    layouts = {"whole K": keys, "K[..., :d] (strided)": strided, "the d dims contiguous": strided.contiguous()}
    outs = {name: torch.empty(t.shape) for name, t in layouts.items()}
    fns = {}
    for name, t in layouts.items():
        fns[name, "sum"] = lambda t=t: t.sum()
        fns[name, "copy"] = lambda t=t, out=outs[name]: out.copy_(t)
    timings = time_interleaved(fns, repeats=args.repeats, flush=False)
    print(f"N={args.n} heads={args.heads} D={args.dim} d={args.slice} fp32, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"{'':24s} {'sum':>10s} {'copy':>10s}")
    meta, rows = run_metadata("cpu"), []
    for name in layouts:
        ms = {op: timings[name, op].median_s * 1e3 for op in ("sum", "copy")}
        print(f"{name:24s} {ms['sum']:7.2f} ms {ms['copy']:7.2f} ms")
        rows += [{**meta, "n": args.n, "heads": args.heads, "dim": args.dim, "slice": args.slice,
                  "repeats": args.repeats, "layout": name, "op": op, "median_ms": ms[op],
                  "speedup_vs_whole": paired_ratio(timings["whole K", op], timings[name, op])} for op in ms]
    print("rows ->", append_rows(Path(args.out) / "strided_slice_read.csv", rows))


if __name__ == "__main__":
    main()
