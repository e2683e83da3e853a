"""Why a selection-cache hit keeps its gathered rows on CPU (TokenSelect `reuse_rows`).

A decode step reads 2,688 of N cached K/V rows. Gathered from a cache that other layers have
evicted from the CPU caches, scattered rows of 256 bytes (SmolLM2: D=64, fp32) are bound by
memory latency, not bandwidth. This times, cold (tokaccel.bench.timing.time_interleaved writes a
64 MB buffer before each call), the K+V gather of L rows of a [1, Hk, N, D] cache: random rows,
runs of 4 and of 16 adjacent rows (new rows each call), in the cache's head-major layout and in a
token-major one, against a sequential copy of the same number of bytes (what reading kept rows
costs); the three interleaved call by call. Prints the table and appends one row per cell to
OUT/scattered_rows.csv.

Run: python benchmarks/scattered_rows.py [--n 32768 --rows 2688 --heads 3 --dim 64 --threads 2 --repeats 15 --out DIR]
"""
import argparse
from pathlib import Path

import torch

from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.bench.timing import paired_ratio, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=2688)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    N, L, Hk, D = args.n, args.rows, args.heads, args.dim
    k, v = torch.randn(1, Hk, N, D), torch.randn(1, Hk, N, D)
    k_tokens, v_tokens = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [1, N, Hk, D]

    def runs(length):
        def make():
            starts = torch.sort(torch.randperm(N // length)[:L // length]).values * length
            return (starts[:, None] + torch.arange(length)).flatten()
        return make

    def head_major(idx):
        flat = (torch.arange(Hk)[:, None] * N + idx[None]).reshape(-1)
        return k.view(-1, D).index_select(0, flat), v.view(-1, D).index_select(0, flat)

    def token_major(idx):
        return k_tokens.view(N, -1).index_select(0, idx), v_tokens.view(N, -1).index_select(0, idx)

    def sequential(idx):
        return k[:, :, :L].clone(), v[:, :, :L].clone()

    def each_call_new_rows(gather, make):  # the rows of every call drawn beforehand, outside the timing
        indices = iter([make() for _ in range(args.repeats + 1)])
        return lambda: gather(next(indices))

    print(f"K+V rows of a [1, {Hk}, {N}, {D}] fp32 cache, L={L}, {args.threads} thread(s), cold, "
          f"median ms of {args.repeats}")
    print(f"{'rows':12s} {'head-major':>11s} {'token-major':>12s} {'sequential':>11s}")
    meta, rows = run_metadata("cpu"), []
    for name, make in (("random", lambda: torch.sort(torch.randperm(N)[:L]).values),
                       ("runs of 4", runs(4)), ("runs of 16", runs(16))):
        gathers = {"head-major": head_major, "token-major": token_major, "sequential": sequential}
        t = time_interleaved({layout: each_call_new_rows(g, make) for layout, g in gathers.items()},
                             repeats=args.repeats, flush=True)
        print(f"{name:12s} " + " ".join(f"{t[layout].median_s * 1e3:11.3f}" for layout in gathers))
        rows += [{**meta, "n": N, "rows": L, "heads": Hk, "dim": D, "repeats": args.repeats, "pattern": name,
                  "layout": layout, "median_ms": t[layout].median_s * 1e3,
                  "slowdown_vs_sequential": paired_ratio(t[layout], t["sequential"])} for layout in gathers]
    print("rows ->", append_rows(Path(args.out) / "scattered_rows.csv", rows))


if __name__ == "__main__":
    main()
