"""Why a selection-cache hit keeps its gathered rows on CPU (TokenSelect `reuse_rows`).

A decode step reads 2,688 of N cached K/V rows. Gathered from a cache that other layers have
evicted from the CPU caches, scattered rows of 256 bytes (SmolLM2: D=64, fp32) are bound by
memory latency, not bandwidth. This times, cold (a 64 MB buffer is written before each call),
the K+V gather of L rows of a [1, Hk, N, D] cache: random rows, runs of 4 and of 16 adjacent
rows, in the cache's head-major layout and in a token-major one, against a sequential copy of
the same number of bytes (what reading kept rows costs).

Run: python benchmarks/scattered_rows.py [--n 32768 --rows 2688 --heads 3 --dim 64 --threads 2]
"""
import argparse
import time

import torch


def cold_median_ms(fn, make_idx, flush: torch.Tensor, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats):
        idx = make_idx()
        flush.fill_(1)
        start = time.perf_counter()
        fn(idx)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=2688)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    N, L, Hk, D = args.n, args.rows, args.heads, args.dim
    k, v = torch.randn(1, Hk, N, D), torch.randn(1, Hk, N, D)
    k_tokens, v_tokens = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [1, N, Hk, D]
    flush = torch.empty(64 << 20, dtype=torch.uint8)

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

    print(f"K+V rows of a [1, {Hk}, {N}, {D}] fp32 cache, L={L}, {args.threads} thread(s), cold, median ms")
    print(f"{'rows':12s} {'head-major':>11s} {'token-major':>12s} {'sequential':>11s}")
    for name, make in (("random", lambda: torch.sort(torch.randperm(N)[:L]).values),
                       ("runs of 4", runs(4)), ("runs of 16", runs(16))):
        cells = [cold_median_ms(fn, make, flush) for fn in (head_major, token_major, sequential)]
        print(f"{name:12s} " + " ".join(f"{c:11.3f}" for c in cells))


if __name__ == "__main__":
    main()
