"""Ahead-of-time compilation of every registered Triton kernel for sm_80 and sm_90, no GPU needed.

Records registers and spills per kernel config (the session fixture `aot_report` in conftest.py,
shared with each kernel file's compile test) so GPU breakage and register pressure regressions
show on a CPU-only machine. Compilation needs triton imported without TRITON_INTERPRET, so under
TRITON_INTERPRET=1 it runs in a child process.
"""
import pytest

from tokaccel.kernels.ops import HAS_TRITON, KERNELS, interpret_enabled

from testkit.kernel_tests import AOT_CAPS

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Kernels allowed to spill (name -> max n_spills); every other kernel must not spill.
ALLOWED_SPILLS = {}


def test_every_kernel_compiled_for_every_cap(aot_report):
    seen = {(rep["kernel"], rep["cap"]) for rep in aot_report["reports"]}
    assert seen == {(name, cap) for name in KERNELS for cap in AOT_CAPS}
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
