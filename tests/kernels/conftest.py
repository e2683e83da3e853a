"""Fixtures for the kernel tests: a fresh Python process with a chosen environment, and the
session's AOT compile report. The helpers test files import live in testkit.kernel_tests."""
import json
import os
import subprocess
import sys

import pytest
from testkit.kernel_tests import AOT_CAPS, child_env


@pytest.fixture(scope="session")
def run_python():
    """run_python(args, timeout=..., **env) -> CompletedProcess; raises with stdout/stderr on failure."""

    def run(args, timeout=300, **env):
        proc = subprocess.run([sys.executable, *args], env=child_env(**env), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"subprocess {args[:2]} failed ({proc.returncode}):\n"
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    return run


_AOT_CHILD = """
import json, sys
from tokaccel.kernels import aot
json.dump(aot.compile_all(caps={caps}), open(sys.argv[1], "w"), default=str)
"""


@pytest.fixture(scope="session")
def aot_report(tmp_path_factory, run_python):
    """Every registered kernel AOT-compiled for sm_80 and sm_90, once per session (about 2.5 min on
    2 cores), in a child process when triton was imported in interpreter mode. Printed as a table,
    written as JSON to $TOKACCEL_AOT_REPORT if set, else to a pytest tmp dir."""
    from tokaccel.kernels import aot
    from tokaccel.kernels.ops import interpret_enabled

    path = os.environ.get("TOKACCEL_AOT_REPORT") or str(tmp_path_factory.mktemp("aot") / "aot_report.json")
    if interpret_enabled():
        run_python(["-c", _AOT_CHILD.format(caps=AOT_CAPS), path], timeout=900, TRITON_INTERPRET=None)
        with open(path) as f:
            report = json.load(f)
    else:
        report = aot.compile_all(caps=AOT_CAPS)
        aot.write_report(report, path)
    print(f"\nAOT report ({report['triton_version']}, ptxas {report['ptxas_version']}): {path}")
    print(f"{'kernel':16} {'config':22} {'sm':>3} {'regs':>5} {'spills':>6} {'stack':>5} {'smem':>6} {'s':>5}")
    for rep in report["reports"]:
        for r in rep["configs"]:
            print(f"{r['kernel']:16} {r['config']:22} {r['cap']:>3} {str(r['n_regs']):>5} {str(r['n_spills']):>6} "
                  f"{str(r.get('stack_frame_bytes')):>5} {str(r['shared_bytes']):>6} {r['compile_s']:>5}"
                  + (f"  ERROR {r['error']}" if r["error"] else ""))
    return report
