"""Decode throughput and task accuracy through a real vLLM engine: now `tokaccel bench vllm`
(tokaccel/bench/vllm.py). This wrapper runs it with the main environment's python and writes to
benchmarks/results/vllm/ unless --out is given:

    .venv/bin/python benchmarks/vllm_decode.py --contexts 2048,8000 --concurrency 1,4 --tasks niah_single_2 --samples 3

(The rows of benchmarks/results/vllm/decode.csv came from this script's earlier form, which ran in
the vLLM environment itself; new rows go to bench_vllm.csv.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokaccel.bench.cli import main as bench_main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(Path(__file__).parent / "results" / "vllm")]
    return bench_main(["bench", "vllm", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
