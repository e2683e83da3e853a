"""Op-level harness: bytes/flops formulas, the built-in impls' outputs, the plugin interface, the
sweep's rows. Smoke sizes only; no timed assertions."""

import pytest
import torch

from tokaccel.bench import ops
from tokaccel.bench.ops import (SHAPES, OpBench, OpCase, OpInputs, dense_bytes, dense_flops, kv_bytes,
                                register_op_bench, run_ops, smoke_config, unregister_op_bench)

ROW_COLUMNS = {"shape", "num_heads", "num_kv_heads", "head_dim", "n", "batch", "chunk", "dtype", "impl", "phase", "part",
               "median_ms", "min_ms", "max_ms", "repeats", "warmup", "timer", "threads", "bytes_read", "achieved_gbs",
               "copy_gbs", "bw_ratio", "flops", "tflops", "baseline", "speedup", "part_share"}


def test_bytes_read_on_known_shapes():
    # SmolLM2, N=4096, fp32: K+V = 2 * Hk 3 * 4096 * D 64 * 4 B; q = H 9 * 64 * 4 B
    assert dense_bytes(SHAPES["smollm2"], 4096, itemsize=4) == 2 * 3 * 4096 * 64 * 4 + 9 * 64 * 4 == 6_293_760
    # Llama-3-8B, N=128K, bf16, batch 1: 512 MiB of K+V plus an 8 KiB query
    assert dense_bytes(SHAPES["llama3-8b"], 131072, itemsize=2) == 2**29 + 32 * 128 * 2
    # Gemma-3 global layer, prefill chunk of 512 queries at N=4096, fp32, batch 2
    assert dense_bytes(SHAPES["gemma3-global"], 4096, queries=512, batch=2, itemsize=4) == 2 * (
        2 * 1 * 4096 * 256 * 4 + 4 * 512 * 256 * 4)
    assert kv_bytes(SHAPES["llama3-8b"], 1000, batch=1, itemsize=2, values=False) == 8 * 1000 * 128 * 2


def test_flops_of_a_causal_chunk():
    shape = SHAPES["smollm2"]
    assert dense_flops(shape, 100) == 4 * 9 * 64 * 100
    keys_seen = sum(100 - 16 + i + 1 for i in range(16))
    assert dense_flops(shape, 100, queries=16, batch=2) == 4 * 2 * 9 * 64 * keys_seen


def _case(impl, phase, inputs, shape="smollm2"):
    return OpCase(impl, {}, SHAPES[shape], inputs.n, phase, inputs.q.shape[0], inputs.chunk, inputs.k.dtype,
                  inputs.k.device, inputs)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_builtin_impls_compute_the_same_attention(shape):
    inputs = OpInputs.random(SHAPES[shape], 96, batch=2, chunk=16, dtype=torch.float32, device="cpu")
    G = SHAPES[shape].groups
    k, v = inputs.k.repeat_interleave(G, 1), inputs.v.repeat_interleave(G, 1)
    expected_decode = torch.softmax(inputs.q @ k.transpose(-1, -2) / inputs.q.shape[-1] ** 0.5, -1) @ v
    logits = inputs.q_chunk @ k.transpose(-1, -2) / inputs.q.shape[-1] ** 0.5
    logits = logits.masked_fill(~inputs.chunk_mask, float("-inf"))
    expected_chunk = torch.softmax(logits, -1) @ v
    for phase, expected in (("decode", expected_decode), ("prefill_chunk", expected_chunk)):
        sdpa = ops.sdpa_setup(_case("sdpa", phase, inputs, shape)).parts["total"]()  # [B, H, q, D]
        dense = ops.dense_setup(_case("dense", phase, inputs, shape)).parts["total"]()[0]  # [B, q, H, D]
        torch.testing.assert_close(sdpa, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dense.transpose(1, 2), expected, atol=1e-5, rtol=1e-4)
    bench = ops.gqa_matmul_setup(_case("gqa_matmul", "decode", inputs, shape))
    torch.testing.assert_close(bench.parts["total"]().reshape(expected_decode.shape), expected_decode, atol=1e-5,
                               rtol=1e-4)
    assert bench.bytes_read["total"] == dense_bytes(SHAPES[shape], 96, batch=2, itemsize=4)
    assert ops.gqa_matmul_setup(_case("gqa_matmul", "prefill_chunk", inputs, shape)) is None
    assert ops.sdpa_setup(_case("sdpa", "decode_hit", inputs, shape)) is None
    assert ops.flash_setup(_case("flash", "decode", inputs, shape)) is None  # CPU: not applicable


def test_smoke_sweep_rows(tmp_path):
    rows = run_ops(smoke_config(shapes=["smollm2", "gemma3-global"], impls=["sdpa", "dense"]))
    assert {(r["shape"], r["impl"], r["phase"]) for r in rows} == {
        (s, i, p) for s in ("smollm2", "gemma3-global") for i in ("sdpa", "dense") for p in ("decode", "prefill_chunk")}
    for row in rows:
        assert ROW_COLUMNS <= set(row)
        assert row["part"] == "total" and row["bytes_read"] > 0 and row["repeats"] == 1 and row["speedup"] > 0
        assert row["bw_ratio"] == pytest.approx(row["achieved_gbs"] / row["copy_gbs"])
    base = [r for r in rows if r["impl"] == "sdpa"]
    assert all(r["speedup"] == 1.0 for r in base)


def test_plugin_with_parts_and_selection_cache_phases():
    """What a policy author does: register a setup with parts and hit / miss phases."""
    seen = []

    def setup(case: OpCase):
        seen.append((case.phase, case.config))
        if case.phase not in ("decode_hit", "decode_miss"):
            return None
        x = case.inputs
        k = case.config["k"]
        scores = torch.einsum("bhd,bhnd->bhn", x.q[:, :: case.shape.groups, 0], x.k)
        idx = scores.topk(k, dim=-1).indices
        parts = {"score": lambda: torch.einsum("bhd,bhnd->bhn", x.q[:, :: case.shape.groups, 0], x.k),
                 "topk": lambda: scores.topk(k, dim=-1)}
        gathered = lambda: x.k.gather(2, idx[..., None].expand(-1, -1, -1, x.k.shape[-1]))  # noqa: E731
        parts["gather"] = gathered
        parts["total"] = (lambda: gathered()) if case.phase == "decode_hit" else (lambda: (parts["score"](), gathered()))
        read = kv_bytes(case, k, keys=True, values=False)
        return OpBench(parts=parts, bytes_read={"gather": read, "total": read + kv_bytes(case, case.n, values=False)},
                       info={"k": k})

    register_op_bench("fake_select", setup)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_op_bench("fake_select", setup)
        rows = run_ops(smoke_config(shapes=["llama3-8b"], impls=["fake_select:k=16"],
                                    phases=["decode", "decode_hit", "decode_miss"]))
    finally:
        unregister_op_bench("fake_select")
    assert ("decode_hit", {"k": 16}) in seen and ("decode_miss", {"k": 16}) in seen
    mine = [r for r in rows if r["impl"] == "fake_select:k=16"]
    assert {(r["phase"], r["part"]) for r in mine} == {
        (p, part) for p in ("decode_hit", "decode_miss") for part in ("score", "topk", "gather", "total")}
    for r in mine:
        assert r["info_k"] == 16
        assert (r["speedup"] is None) == (r["part"] != "total") and (r["part_share"] is None) == (r["part"] == "total")
    gather = next(r for r in mine if r["part"] == "gather")
    assert gather["bytes_read"] == 8 * 16 * 128 * 4 and next(r for r in mine if r["part"] == "topk")["bytes_read"] is None
    assert {r["impl"] for r in rows} == {"sdpa", "fake_select:k=16"}  # the baseline always runs


def test_unknown_impl_and_shape_raise():
    with pytest.raises(ValueError, match="no op bench registered"):
        run_ops(smoke_config(impls=["nope"]))
    with pytest.raises(ValueError, match="unknown shape"):
        run_ops(smoke_config(shapes=["nope"]))


def test_a_failing_impl_gets_a_failed_row_and_the_sweep_goes_on():
    def broken(case):
        if case.phase != "decode":
            return None

        def total():
            raise RuntimeError("CUDA out of memory (simulated)")

        return OpBench(parts={"total": total}, bytes_read={"total": 1})

    register_op_bench("broken", broken)
    try:
        rows = run_ops(smoke_config(shapes=["smollm2"], impls=["broken", "dense"], phases=["decode"]))
    finally:
        unregister_op_bench("broken")
    status = {(r["impl"], r["status"]) for r in rows}
    assert status == {("sdpa", "ok"), ("dense", "ok"), ("broken", "failed")}
    assert "out of memory" in next(r["reason"] for r in rows if r["impl"] == "broken")
