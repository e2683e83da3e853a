"""paged_indexed_attention and paged_key_scores: attention / raw logits read through vLLM's block
tables from its CUDA cache layout ([num_blocks, block_size, Hk, D] strided split views).

* the torch references against a dense per-sequence computation (each sequence's blocks laid end
  to end, rows gathered, plain softmax): shuffled block tables with stale columns, strided views,
  GQA, invalid entries (junk positions), lengths not a multiple of the block size, empty rows;
* the Triton kernels against the references under Triton's interpreter (child process with
  TRITON_INTERPRET=1): GQA groups 1/3/4/8, D 64/80/128/256, block sizes 16/32, fp32/fp16/bf16;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import load_worker, triton_kernel_tests
from tokaccel.kernels.ops import paged_indexed_attention, paged_key_scores, resolve_backend
from tokaccel.kernels.paged_attention import paged_rows

WORKER = Path(__file__).with_name("paged_interp_worker.py")
KERNEL_NAMES = ["paged_indexed_attention", "paged_key_scores"]


def _inputs(**case):
    case = {"dtype": "fp32", "bs": 16, **case}
    return load_worker(WORKER).paged_inputs(case)


def _dense(cache, table, n):
    """Sequence with n tokens as contiguous rows [n, Hk, D]: its blocks laid end to end."""
    bs = cache.shape[1]
    nb = -(-n // bs)
    return torch.cat([cache[int(table[i])] for i in range(nb)])[:n] if nb else cache[:0, 0]


def _dense_attention(q, key_cache, value_cache, table, lengths, idx, valid, scale):
    B, H, D = q.shape
    G = H // key_cache.shape[2]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        keys, values = _dense(key_cache, table[b], n), _dense(value_cache, table[b], n)
        rows = idx[b][valid[b]]
        if rows.numel() == 0:
            continue
        for h in range(H):
            k, v = keys[rows, h // G].double(), values[rows, h // G].double()
            p = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out


def _dense_scores(q, key_cache, table, lengths):
    B, H, _ = q.shape
    G = H // key_cache.shape[2]
    N = int(lengths.max())
    out = torch.full((B, H, N), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        keys = _dense(key_cache, table[b], n)
        for h in range(H):
            out[b, h, :n] = keys[:, h // G].double() @ q[b, h].double()
    return out


@pytest.mark.parametrize("G,Hk,holes", [(1, 2, 0), (3, 2, 3), (4, 1, 4), (8, 2, 2)])
def test_paged_attention_reference_matches_dense(G, Hk, holes):
    q, kc, vc, table, lengths, idx, valid = _inputs(B=3, G=G, Hk=Hk, D=32, lengths=[37, 16, 70], L=20, holes=holes)
    assert not kc.is_contiguous() and kc.stride()[1:] == (64, 16 * 64, 1)  # vLLM's split view
    got = paged_indexed_attention(q, kc, vc, table, idx, valid, 0.3)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), _dense_attention(q, kc, vc, table, lengths, idx, valid, 0.3),
                               rtol=1e-5, atol=1e-6)
    # the order of the index set does not matter
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(paged_indexed_attention(q, kc, vc, table, idx[:, perm], valid[:, perm], 0.3), got)
    # an int64 block table reads the same rows
    torch.testing.assert_close(paged_indexed_attention(q, kc, vc, table.long(), idx, valid, 0.3), got,
                               rtol=0, atol=0)


def test_paged_attention_empty_rows_and_half_precision():
    q, kc, vc, table, lengths, idx, valid = _inputs(B=3, G=3, Hk=2, D=32, lengths=[0, 9, 33], L=12,
                                                    dead_row=True, dtype="bf16")
    got = paged_indexed_attention(q, kc, vc, table, idx, valid, 0.2)
    assert got.dtype == torch.bfloat16 and torch.equal(got[0], torch.zeros_like(got[0]))
    want = _dense_attention(q, kc, vc, table, lengths, idx, valid, 0.2)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-2)
    assert resolve_backend(None, [q, kc]) in ("torch", "triton")


@pytest.mark.parametrize("G,Hk,bs,lengths", [(1, 2, 16, [37, 16, 70]), (4, 2, 32, [5, 64, 1]),
                                             (3, 1, 16, [0, 17, 48])])
def test_paged_key_scores_reference_matches_dense(G, Hk, bs, lengths):
    q, kc, _, table, lens, _, _ = _inputs(B=3, G=G, Hk=Hk, D=32, bs=bs, lengths=lengths)
    got = paged_key_scores(q, kc, table, lens)
    assert got.dtype == torch.float32 and got.shape == (3, G * Hk, max(lengths))
    torch.testing.assert_close(got.double(), _dense_scores(q, kc, table, lens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_key_scores(q, kc, table, lens.int()), got, rtol=0, atol=0)
    wider = paged_key_scores(q, kc, table, lens, max_len=max(lengths) + 5)  # max_len: no host sync
    torch.testing.assert_close(wider[..., :max(lengths)], got)
    assert bool(torch.isneginf(wider[..., max(lengths):]).all())


def test_paged_rows_reads_through_the_table():
    q, kc, _, table, lengths, idx, valid = _inputs(B=2, G=1, Hk=2, D=8, lengths=[40, 21], L=6)
    rows = paged_rows(kc, table, idx)
    for b in range(2):
        dense = _dense(kc, table[b], int(lengths[b]))
        assert torch.equal(rows[b], dense[idx[b]])


def test_bad_inputs_are_refused():
    q, kc, vc, table, lengths, idx, valid = _inputs(B=2, G=2, Hk=2, D=8, lengths=[20, 9], L=4)
    with pytest.raises(ValueError, match="idx must be int64"):
        paged_indexed_attention(q, kc, vc, table, idx.int(), valid, 1.0)
    with pytest.raises(ValueError, match="valid must be bool"):
        paged_indexed_attention(q, kc, vc, table, idx, valid.long(), 1.0)
    with pytest.raises(ValueError, match="multiple of Hk"):
        paged_indexed_attention(q[:, :3], kc, vc, table, idx, valid, 1.0)
    with pytest.raises(ValueError, match="block_table must be int32"):
        paged_indexed_attention(q, kc, vc, table.float(), idx, valid, 1.0)
    with pytest.raises(ValueError, match="share one of fp16/bf16/fp32"):
        paged_indexed_attention(q.half(), kc, vc, table, idx, valid, 1.0)
    with pytest.raises(ValueError, match="last dim must have stride 1"):
        paged_indexed_attention(q, kc, vc.transpose(2, 3).contiguous().transpose(2, 3), table, idx, valid, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        paged_indexed_attention(q, kc, vc[:1], table, idx, valid, 1.0)
    with pytest.raises(ValueError, match="scale must be a number"):
        paged_indexed_attention(q, kc, vc, table, idx, valid, None)
    with pytest.raises(TypeError, match="valid must be a torch.Tensor"):
        paged_indexed_attention(q, kc, vc, table, idx, None, 1.0)
    with pytest.raises(ValueError, match="lengths must be an integer"):
        paged_key_scores(q, kc, table, lengths.float())
    with pytest.raises(ValueError, match="do not fit the block table"):
        paged_key_scores(q, kc, table[:, :1], lengths)
    with pytest.raises(ValueError, match="max_len must be"):
        paged_key_scores(q, kc, table, lengths, max_len=-1)


# ----------------------------------------------------------------------------- Triton (interpreter)


def _cases():
    cases = []
    specs = [  # G, Hk, D, bs, dtype, lengths, L, holes
        (1, 2, 64, 16, "fp32", [37, 70], 29, 0),
        (3, 2, 64, 16, "fp16", [100, 16, 51], 40, 3),
        (4, 2, 128, 32, "bf16", [130, 7], 70, 5),
        (8, 1, 128, 16, "fp16", [90, 91], 64, 0),
        (3, 1, 80, 16, "bf16", [45, 33], 20, 4),
        (2, 2, 256, 16, "fp32", [40, 19], 35, 2),
    ]
    for i, (G, Hk, D, bs, dtype, lengths, L, holes) in enumerate(specs):
        base = {"B": len(lengths), "G": G, "Hk": Hk, "D": D, "bs": bs, "dtype": dtype, "lengths": lengths,
                "seed": i}
        cases.append({"op": "attn", "id": f"attn-G{G}-Hk{Hk}-D{D}-bs{bs}-{dtype}-L{L}" + (f"-holes{holes}" if holes
                                                                                        else ""),
                      "L": L, "holes": holes, **base})
        cases.append({"op": "scores", "id": f"scores-G{G}-Hk{Hk}-D{D}-bs{bs}-{dtype}-N{max(lengths)}",
                      "int32_lengths": i % 2 == 1, **base})
    cases += [
        {"op": "attn", "id": "attn-dead-row", "B": 2, "G": 4, "Hk": 2, "D": 64, "bs": 16, "dtype": "fp16",
         "lengths": [30, 50], "L": 10, "dead_row": True},
        {"op": "attn", "id": "attn-empty-seq", "B": 2, "G": 2, "Hk": 2, "D": 64, "bs": 16, "dtype": "fp32",
         "lengths": [0, 20], "L": 8},
        {"op": "scores", "id": "scores-empty-seq", "B": 3, "G": 3, "Hk": 2, "D": 64, "bs": 16, "dtype": "bf16",
         "lengths": [0, 1, 66]},
    ]
    assert len({c["id"] for c in cases}) == len(cases)
    return cases


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, KERNEL_NAMES)
