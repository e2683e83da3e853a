"""Is a column slice of a row-major key cache cheaper to read than the whole cache on this CPU?

FASA scores with d of each row's D dims. Stored first in each row (tokaccel's in-place layout),
they are a strided slice K[..., :d]; stored on their own they would be contiguous. This times one
pass over each, SmolLM2's decode shape at 128K tokens, fp32: a sum (torch's reduction over a
strided view is itself slow, so this overstates the strided read) and a copy into a fresh buffer.

Run: python benchmarks/strided_slice_read.py [--n 131072 --heads 3 --dim 64 --slice 16 --threads 1]
"""
import argparse
import time

import torch


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slice", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = torch.randn(1, args.heads, args.n, args.dim)
    strided = keys[..., :args.slice]
    contiguous = strided.contiguous()
    print(f"N={args.n} heads={args.heads} D={args.dim} d={args.slice} fp32, {args.threads} thread(s), median of 7")
    print(f"{'':24s} {'sum':>10s} {'copy':>10s}")
    for name, t in (("whole K", keys), ("K[..., :d] (strided)", strided), ("the d dims contiguous", contiguous)):
        out = torch.empty(t.shape)
        print(f"{name:24s} {median_ms(lambda: t.sum()):7.2f} ms {median_ms(lambda: out.copy_(t)):7.2f} ms")


if __name__ == "__main__":
    main()
