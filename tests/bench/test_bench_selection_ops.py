"""TokenSelect's op-level steps (tokaccel.bench.selection_ops): the parts compute what the policy
computes, hit steps do not score, miss steps do, and the sweep reports every phase and part."""

import pytest
import torch

from tokaccel.bench.ops import SHAPES, OpCase, OpInputs, OpsConfig, run_ops
from tokaccel.bench.selection_ops import selection_setup
from tokaccel.policies.tokenselect import TokenSelect

SPEC = "tokenselect:k=64,n_init=8,n_local=32,chunk=32"


def _case(spec, phase, shape="smollm2", n=300, batch=2, chunk=32):
    inputs = OpInputs.random(SHAPES[shape], n, batch, chunk, torch.float32, "cpu")
    return OpCase(spec, {}, SHAPES[shape], n, phase, batch, chunk, torch.float32, torch.device("cpu"), inputs)


@pytest.mark.parametrize("mode", ["compact", "original"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_parts_reproduce_the_policy_step(mode, shape):
    for phase in ("decode_hit", "decode_miss", "prefill_chunk"):
        bench = selection_setup(_case(f"{SPEC},position_mode={mode}", phase, shape))
        out = bench.parts["total"]()[0]  # attend(): [B, S, H, D]
        piece = bench.parts["attention"]()
        piece = piece[:, None] if phase != "prefill_chunk" else piece
        torch.testing.assert_close(out, piece, atol=0, rtol=0)
        # the decode step reads sinks + k + local rows; the chunk also reads its own 32 keys
        assert bench.info["keys_read"] == 8 + 64 + 32 + (32 if phase == "prefill_chunk" else 0)
        assert bench.bytes_read["total"] > bench.bytes_read["attention"] or phase == "decode_hit"
        assert set(bench.parts) == ({"attention", "total"} if phase == "decode_hit" else
                                    {"score", "topk", "attention", "total"})


def test_hit_steps_do_not_score_and_miss_steps_do(monkeypatch):
    votes = []
    original = TokenSelect.vote

    def counting_vote(self, *args, **kwargs):
        votes.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TokenSelect, "vote", counting_vote)
    hit = selection_setup(_case(SPEC, "decode_hit"))
    before = len(votes)
    for _ in range(3):
        hit.parts["total"]()
    assert len(votes) == before
    miss = selection_setup(_case(SPEC, "decode_miss"))
    before = len(votes)
    for _ in range(3):
        miss.parts["total"]()
    assert len(votes) == before + 3


def test_a_context_within_the_budget_is_refused():
    with pytest.raises(ValueError, match="fits the budget"):
        selection_setup(_case("tokenselect:k=512", "decode_hit"))
    assert selection_setup(_case(SPEC, "decode")) is None  # plain decode is for impls without a selection cache
    with pytest.raises(ValueError, match="not a selection policy"):
        selection_setup(_case("dense", "decode_hit"))


def test_sweep_rows_for_every_phase_and_part():
    rows = run_ops(OpsConfig(shapes=["gemma3-global"], ns=(300,), impls=[SPEC, "tokenselect:k=512"], chunk=32,
                             warmup=0, repeats=1, copy_bytes=8 * 2**20))
    ok = {(r["impl"], r["phase"], r["part"]) for r in rows if r["status"] == "ok"}
    assert {(SPEC, "decode_hit", p) for p in ("attention", "total")} <= ok
    assert {(SPEC, "decode_miss", p) for p in ("score", "topk", "attention", "total")} <= ok
    assert {(SPEC, "prefill_chunk", p) for p in ("score", "topk", "attention", "total")} <= ok
    for row in rows:
        if row["status"] == "ok" and row["part"] == "total":
            assert row["speedup"] > 0 and row["bytes_read"] > 0
    failed = [r for r in rows if r["impl"] == "tokenselect:k=512"]
    assert failed and all(r["status"] == "failed" and "fits the budget" in r["reason"] for r in failed)


@pytest.mark.parametrize("spec", ["hisa:k=64,n_init=8,n_local=32,block=16,m=6",
                                  "hisa:k=64,n_init=8,n_local=32,block=16,m=6,block_score=bound",
                                  "quest:k=64,n_init=8,n_local=32,page=8"])
def test_hierarchical_scorers_time_their_own_choice(spec):
    """HISA / Quest decode_miss: "score" is the policy's own choice (no separate top-k), its bytes
    are what the policy's counters record (fewer than the flat scan of the candidates), and the
    parts reproduce the step; prefill_chunk is not offered."""
    flat = selection_setup(_case(SPEC, "decode_miss"))
    bench = selection_setup(_case(spec, "decode_miss"))
    torch.testing.assert_close(bench.parts["total"]()[0], bench.parts["attention"]()[:, None], atol=0, rtol=0)
    assert set(bench.parts) == {"score", "attention", "total"}
    assert bench.info["scored_blocks"] > 0 and bench.bytes_read["score"] < flat.bytes_read["score"]
    assert bench.info["keys_read"] <= 8 + 64 + 32
    assert selection_setup(_case(spec, "prefill_chunk")) is None


def test_fasa_scores_with_a_quarter_of_the_key_bytes():
    """FASA decode_miss: "score" is its partial-dim choice over the cache's leading dominant dims (random
    chunks stand in for a calibration): a quarter of the flat scan's key bytes, same step result."""
    flat = selection_setup(_case(SPEC, "decode_miss"))
    bench = selection_setup(_case("fasa:k=64,n_init=8,n_local=32", "decode_miss"))
    torch.testing.assert_close(bench.parts["total"]()[0], bench.parts["attention"]()[:, None], atol=0, rtol=0)
    assert set(bench.parts) == {"score", "attention", "total"} and bench.info["keys_read"] <= 8 + 64 + 32
    case = _case(SPEC, "decode_miss")
    q_bytes = case.batch * case.shape.num_heads * case.shape.head_dim * case.itemsize
    assert bench.info["scored_keys"] > 0 and bench.info["scored_blocks"] == 0
    assert 4 * (bench.bytes_read["score"] - q_bytes) == flat.bytes_read["score"] - q_bytes
