"""Helpers for the kernel test files: interpreter workers in a child process, per-case results,
the AOT no-spill check, and `triton_kernel_tests` (the module-level pieces every kernel file shares)."""
import importlib.util
import json
import os

import pytest


def child_env(**overrides):
    """os.environ plus overrides (None removes a variable). The child imports tokaccel from the
    installed package, as this process does: sys.path is not copied, so the repository root never
    leaks into it."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def load_worker(path):
    """An interpreter worker script (tests/kernels/*_interp_worker.py) imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interp_results(worker_path, cases, tmp_path_factory, run_python):
    """Results of `worker.run_cases(cases)` under Triton's interpreter: in process when triton was
    imported in interpreter mode, else in a child process with TRITON_INTERPRET=1."""
    from tokaccel.kernels.ops import interpret_enabled

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
    from tokaccel.kernels.ops import HAS_TRITON

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
