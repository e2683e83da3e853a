"""Ahead-of-time compilation of every registered Triton kernel for sm_80 and sm_90, no GPU needed.

Records registers and spills per kernel config (printed, and written as JSON to
$TOKACCEL_AOT_REPORT if set, else to a pytest tmp dir) so GPU breakage and register
pressure regressions show on a CPU-only machine. Compilation needs triton imported
without TRITON_INTERPRET, so under TRITON_INTERPRET=1 it runs in a child process.
"""
import json
import os

import pytest

from tokaccel.kernels import HAS_TRITON, KERNELS, interpret_enabled

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

CAPS = (80, 90)
# Kernels allowed to spill (name -> max n_spills); every other kernel must not spill.
ALLOWED_SPILLS = {}

_CHILD = """
import json, sys
from tokaccel.kernels import aot
json.dump(aot.compile_all(caps={caps}), open(sys.argv[1], "w"), default=str)
"""


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory, run_python):
    from tokaccel.kernels import aot

    path = os.environ.get("TOKACCEL_AOT_REPORT") or str(tmp_path_factory.mktemp("aot") / "aot_report.json")
    if interpret_enabled():
        run_python(["-c", _CHILD.format(caps=CAPS), path], timeout=600, TRITON_INTERPRET=None)
        with open(path) as f:
            report = json.load(f)
    else:
        report = aot.compile_all(caps=CAPS)
        aot.write_report(report, path)
    print(f"\nAOT report ({report['triton_version']}, ptxas {report['ptxas_version']}): {path}")
    print(f"{'kernel':16} {'config':22} {'sm':>3} {'regs':>5} {'spills':>6} {'stack':>5} {'smem':>6} {'s':>5}")
    for rep in report["reports"]:
        for r in rep["configs"]:
            print(f"{r['kernel']:16} {r['config']:22} {r['cap']:>3} {str(r['n_regs']):>5} {str(r['n_spills']):>6} "
                  f"{str(r.get('stack_frame_bytes')):>5} {str(r['shared_bytes']):>6} {r['compile_s']:>5}"
                  + (f"  ERROR {r['error']}" if r["error"] else ""))
    return report


def test_every_kernel_compiled_for_every_cap(aot_report):
    seen = {(rep["kernel"], rep["cap"]) for rep in aot_report["reports"]}
    assert seen == {(name, cap) for name in KERNELS for cap in CAPS}
    for rep in aot_report["reports"]:
        assert rep["configs"], f"{rep['kernel']} has no AOT configs"
        for r in rep["configs"]:
            assert r["ok"], f"{r['kernel']}/{r['config']} sm_{r['cap']}: {r['error']}"


def test_registers_and_spills_reported(aot_report):
    for rep in aot_report["reports"]:
        for r in rep["configs"]:
            where = f"{r['kernel']}/{r['config']} sm_{r['cap']}"
            assert isinstance(r["n_regs"], int) and 0 < r["n_regs"] <= 255, where
            assert isinstance(r["n_spills"], int), f"{where}: spills not reported"
            # the ptxas log and the cubin describe the same binary
            assert r["ptxas_regs"] == r["cubin_regs"], where
            assert r["n_spills"] <= ALLOWED_SPILLS.get(r["kernel"], 0), f"{where} spills {r['n_spills']}"


def test_spills_are_detected():
    """Capping registers (maxnreg=32) must produce spills: the spill numbers are not always 0."""
    if interpret_enabled():
        pytest.skip("needs triton imported without TRITON_INTERPRET")
    from tokaccel.kernels import aot

    entry = KERNELS["grouped_scores"]
    config = next(c for c in entry.aot_configs() if c.constexprs["USE_DOT"])
    row = aot.compile_config(entry, config, 80, options={"maxnreg": 32})
    assert row["ok"], row["error"]
    assert row["n_regs"] <= 32 and row["n_spills"] > 0 and row["spill_store_bytes"] > 0
