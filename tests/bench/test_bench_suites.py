"""The pytest-benchmark suites in benchmarks/ keep working (run once, no timing asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_suites_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "--benchmark-min-rounds=1",
         "--benchmark-max-time=0", "--benchmark-warmup=off", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'base'}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
