"""Does scoring in token tiles beat one matmul over the whole cache on this CPU?

`tokaccel.kernels.grouped_scores_reference` (TokenSelect's flat scorer, and FASA's through
`fc_scores`) multiplies the [G, D] queries of each KV head by K^T; half-precision keys in tiles of
SCORE_TILE tokens, each upcast to fp32 on its own. This times one matmul against tiles,
interleaved, for the full keys in fp32 and bf16 and for FASA's d dims as a strided column slice
of the rows (its GPU layout) and contiguous (its CPU column tile), on the SmolLM2, Gemma-3 and
Llama-3-8B decode shapes. Timer: tokaccel.bench.timing.time_interleaved (every case and tiling
once per round, one warm-up round, no cache flush); speedup = median of per-round ratios.
Prints the table and appends one row per line to OUT/score_tiles.csv.

Run: python benchmarks/score_tiles.py [--n 32768,131072 --tile 4096 --repeats 15 --threads 1 --out DIR]
"""
import argparse
from pathlib import Path

import torch

from tokaccel.bench.results import append_rows, run_metadata
from tokaccel.bench.timing import paired_ratio, time_interleaved

SHAPES = {"smollm2": (3, 3, 64, 16), "gemma3-global": (1, 4, 256, 64), "llama3-8b": (8, 4, 128, 32)}  # Hk, G, D, FASA's d


def scores(q: torch.Tensor, k: torch.Tensor, tile: int | None) -> torch.Tensor:
    """[1, Hk, G, N] fp32 logits, in one matmul (tile None) or tile by tile."""
    if tile is None:
        return torch.matmul(q, k.float().transpose(-1, -2))
    out = q.new_empty(*q.shape[:3], k.shape[2])
    for a in range(0, k.shape[2], tile):
        b = min(a + tile, k.shape[2])
        torch.matmul(q, k[:, :, a:b].float().transpose(-1, -2), out=out[..., a:b])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="32768,131072")
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/scripts", help="folder of the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"median ms of {args.repeats} interleaved runs, {args.threads} thread(s), tile = {args.tile} tokens")
    print("| shape | N | keys | one matmul | tiled | speedup |\n|---|---:|---|---:|---:|---:|")
    meta, rows = run_metadata("cpu"), []
    for name, (Hk, G, D, d) in SHAPES.items():
        for n in map(int, args.n.split(",")):
            keys = torch.randn(1, Hk, n, D)
            q = torch.randn(1, Hk, G, D)
            cases = {"fp32": (q, keys), "bf16": (q, keys.bfloat16()),
                     f"fp32 [..., :{d}] (FASA rows)": (q[..., :d].contiguous(), keys[..., :d]),
                     f"fp32 {d} dims contiguous (FASA tiles)": (q[..., :d].contiguous(), keys[..., :d].contiguous())}
            t = time_interleaved({(case, tile): lambda c=cases[case], tile=tile: scores(*c, tile)
                                  for case in cases for tile in (None, args.tile)}, repeats=args.repeats, flush=False)
            for case in cases:
                whole, tiled = t[case, None], t[case, args.tile]
                speedup = paired_ratio(whole, tiled)
                print(f"| {name} | {n} | {case} | {whole.median_s * 1e3:.2f} | {tiled.median_s * 1e3:.2f} | "
                      f"{speedup:.2f}x |")
                rows.append({**meta, "shape": name, "heads_kv": Hk, "group": G, "dim": D, "fasa_dims": d, "n": n,
                             "tile": args.tile, "repeats": args.repeats, "keys": case,
                             "one_matmul_ms": whole.median_s * 1e3, "tiled_ms": tiled.median_s * 1e3,
                             "speedup": speedup})
    print("rows ->", append_rows(Path(args.out) / "score_tiles.csv", rows))


if __name__ == "__main__":
    main()
