"""Triton grouped_scores kernel vs the torch reference, under Triton's interpreter.

Triton 3.9 decides interpreter mode when `triton` is imported (TRITON_INTERPRET is read by
`triton.jit` at decoration time, and triton.language's own helpers are decorated at import),
so the comparisons run in a child process started with TRITON_INTERPRET=1 — whatever the
import order in this process. If pytest itself runs with TRITON_INTERPRET=1 they run here.

Coverage (B=1 unless noted, Hk=2 so the KV-head mapping matters):
  * N in {1, 17}: the full cross-product G {1,3,4,8} x D {64,128,256} x fp32/fp16/bf16;
  * N = 1000: every (G, dtype) pair, D cycling; N = 4099: each G once, D and dtype cycling;
  * both code paths forced for every G (dot for small G, broadcast for large G);
  * strided layouts (cache slice, [B, N, Hk, D] transposed, offset q), B = 2, scale None,
    D = 80 / 96, G = 7 / 16, N = 0, and model-sized heads (Llama-3-8B, Qwen2-7B).
"""
import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from tokaccel.kernels.ops import HAS_TRITON, interpret_enabled

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

WORKER = Path(__file__).with_name("interp_worker.py")
GS, DS, DTYPES = (1, 3, 4, 8), (64, 128, 256), ("fp32", "fp16", "bf16")


def _case(G, D, N, dtype, B=1, Hk=2, scale=0.125, layout="contiguous", path=None, tag=""):
    cid = f"G{G}-D{D}-N{N}-{dtype}" + (f"-B{B}" if B != 1 else "") + (f"-Hk{Hk}" if Hk != 2 else "") \
        + (f"-{layout}" if layout != "contiguous" else "") + (f"-{path}" if path else "") \
        + ("-noscale" if scale is None else "") + (f"-{tag}" if tag else "")
    return {"id": cid, "B": B, "H": G * Hk, "Hk": Hk, "N": N, "D": D, "dtype": dtype, "scale": scale,
            "layout": layout, "path": path}


def _cases():
    cases = [_case(G, D, N, dt) for N in (1, 17) for G, D, dt in itertools.product(GS, DS, DTYPES)]
    cases += [_case(G, DS[i % 3], 1000, dt) for i, (G, dt) in enumerate(itertools.product(GS, DTYPES))]
    cases += [_case(G, DS[i % 3], 4099, DTYPES[i % 3]) for i, G in enumerate(GS)]
    # each code path for every G (the heuristic picks broadcast for G < 4, dot for G >= 4)
    cases += [_case(1, 128, 300, "bf16", path="dot"), _case(3, 256, 300, "fp16", path="dot"),
              _case(3, 64, 300, "fp32", path="dot"), _case(4, 64, 300, "bf16", path="bcast"),
              _case(8, 128, 300, "fp16", path="bcast"), _case(8, 256, 300, "fp32", path="bcast")]
    # strides, batch, scale, odd head dims and groups, empty cache, model-sized heads
    cases += [_case(4, 128, 1000, "bf16", B=2, layout="padded"), _case(3, 64, 1000, "fp16", B=2, layout="bnhd"),
              _case(1, 256, 500, "fp32", layout="padded"), _case(8, 64, 500, "fp32", layout="bnhd"),
              _case(4, 96, 200, "fp16", scale=None), _case(1, 80, 200, "bf16"), _case(3, 96, 200, "fp32"),
              _case(16, 64, 300, "bf16", Hk=2), _case(7, 128, 1000, "fp16", B=2, Hk=4, tag="qwen2-7b"),
              _case(4, 128, 1000, "bf16", Hk=8, tag="llama3-8b"), _case(4, 128, 0, "fp16")]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory, run_python):
    if interpret_enabled():  # pytest itself was started with TRITON_INTERPRET=1
        spec = importlib.util.spec_from_file_location("interp_worker", WORKER)
        worker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(worker)
        return worker.run_cases(CASES)
    d = tmp_path_factory.mktemp("interp")
    (d / "cases.json").write_text(json.dumps(CASES))
    run_python([str(WORKER), str(d / "cases.json"), str(d / "results.json")], timeout=600, TRITON_INTERPRET="1")
    return json.loads((d / "results.json").read_text())


def test_worker_ran_in_interpreter(interp_results):
    assert interp_results["interpret_enabled"] is True
    # TRITON_INTERPRET=1 makes the automatic backend pick Triton for CPU tensors
    assert interp_results["auto_backend_cpu"] == "triton"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_matches_reference(interp_results, case):
    res = interp_results["cases"][case["id"]]
    assert res["ok"], res["msg"]
