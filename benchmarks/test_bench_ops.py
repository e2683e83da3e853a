"""Op-level suite: one attention step per registered impl, at small sizes (see tokaccel.bench.ops)."""

import pytest
import torch

from tokaccel.bench.ops import SHAPES, OpCase, OpInputs, op_benches

N = 4096
CHUNK = 128
_inputs: dict = {}


def _case(impl: str, shape: str, phase: str) -> OpCase:
    key = shape
    if key not in _inputs:
        _inputs[key] = OpInputs.random(SHAPES[shape], N, 1, CHUNK, torch.float32, "cpu")
    x = _inputs[key]
    return OpCase(impl, {}, SHAPES[shape], N, phase, 1, CHUNK, torch.float32, torch.device("cpu"), x)


@pytest.mark.parametrize("phase", ["decode", "decode_hit", "decode_miss", "prefill_chunk"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", sorted(op_benches()))
def test_attention_step(benchmark, impl, shape, phase):
    bench = op_benches()[impl].setup(_case(impl, shape, phase))
    if bench is None:
        pytest.skip(f"{impl} has no {phase} step on CPU")
    benchmark.group = f"{shape}-{phase}-N{N}"
    benchmark.extra_info.update(bytes_read=bench.bytes_read["total"], flops=bench.flops.get("total"))
    benchmark.pedantic(bench.parts["total"], rounds=10, warmup_rounds=2)
