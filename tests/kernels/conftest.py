"""Fixtures for the kernel tests: running Python in a fresh process with a chosen environment."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest


def _child_env(**overrides):
    """os.environ plus this process's sys.path (so tokaccel imports the same way), plus overrides.

    An override of None removes the variable.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="session")
def run_python():
    """run_python(args, timeout=..., **env) -> CompletedProcess; raises with stdout/stderr on failure."""

    def run(args, timeout=300, **env):
        proc = subprocess.run([sys.executable, *args], env=_child_env(**env), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"subprocess {args[:2]} failed ({proc.returncode}):\n"
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    return run


def load_worker(path):
    """An interpreter worker script (tests/kernels/*_interp_worker.py) imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interp_results(worker_path, cases, tmp_path_factory, run_python):
    """Results of `worker.run_cases(cases)` under Triton's interpreter: in process when triton was
    imported in interpreter mode, else in a child process with TRITON_INTERPRET=1."""
    from tokaccel.kernels import interpret_enabled

    if interpret_enabled():
        return load_worker(worker_path).run_cases(cases)
    d = tmp_path_factory.mktemp(worker_path.stem)
    (d / "cases.json").write_text(json.dumps(cases))
    run_python([str(worker_path), str(d / "cases.json"), str(d / "results.json")], timeout=600, TRITON_INTERPRET="1")
    return json.loads((d / "results.json").read_text())


def assert_interp_case_ok(results, case):
    """One case of `interp_results`: run in interpreter mode, Triton equal to the reference."""
    assert results["interpret_enabled"] is True
    result = results["cases"][case["id"]]
    assert result["ok"], result["msg"]


AOT_CAPS = (80, 90)
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
    from tokaccel.kernels import aot, interpret_enabled

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


def assert_compiled_without_spills(report, kernel_names, caps=AOT_CAPS):
    """In the session's AOT report, every config of `kernel_names` compiled for each cap, with
    registers and no spills."""
    rows = [r for rep in report["reports"] if rep["kernel"] in kernel_names for r in rep["configs"]]
    assert {(r["kernel"], r["cap"]) for r in rows} == {(n, c) for n in kernel_names for c in caps}
    for r in rows:
        where = f"{r['kernel']}/{r['config']} sm_{r['cap']}"
        assert r["ok"], f"{where}: {r['error']}"
        assert 0 < r["n_regs"] <= 255 and r["n_spills"] == 0, (where, r["n_regs"], r["n_spills"])


def triton_kernel_tests(worker_path, cases, kernel_names):
    """The three module-level pieces every kernel test file shares, to assign by name:

        interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \\
            triton_kernel_tests(WORKER, CASES, ["x_kernel"])

    a module-scoped fixture running `cases` under the interpreter, one test per case (Triton equal
    to the reference), and the AOT compile test for sm_80 / sm_90 without spills (reading the
    session's `aot_report`)."""
    from tokaccel.kernels import HAS_TRITON

    needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

    @pytest.fixture(scope="module")
    def results(tmp_path_factory, run_python):
        return interp_results(worker_path, cases, tmp_path_factory, run_python)

    @needs_triton
    @pytest.mark.parametrize("case", cases, ids=[c["id"] for c in cases])
    def test_triton_matches_reference(interp_results, case):
        assert_interp_case_ok(interp_results, case)

    @needs_triton
    def test_kernels_compile_for_sm80_and_sm90_without_spills(aot_report):
        assert_compiled_without_spills(aot_report, kernel_names)

    return results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills
