"""grouped_scores: the torch reference against naive definitions, and input validation."""
import importlib
import itertools

import pytest
import torch

from tokaccel.kernels.ops import grouped_scores, grouped_scores_reference
from tokaccel.kernels.testing import assert_close, make_qk


def naive_repeat_kv(q, k, scale=None):
    """The definition with HF repeat_kv (K copied per query head), in fp64."""
    G = q.shape[1] // k.shape[1]
    k_rep = k.double().repeat_interleave(G, dim=1)  # [B, H, N, D], head h <- KV head h // G
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k_rep)
    return s if scale is None else s * scale


@pytest.mark.parametrize("G,D,N,dtype", [
    (G, D, N, dt) for (G, D), N, dt in zip(
        itertools.product((1, 3, 4, 8), (64, 128, 256)),
        itertools.cycle((1, 17, 1000, 4099)),
        itertools.cycle((torch.float32, torch.float16, torch.bfloat16)))
])
def test_reference_matches_naive(G, D, N, dtype):
    q, k = make_qk(2, 2 * G, 2, N, D, dtype, seed=G * 1000 + D)
    out = grouped_scores_reference(q, k, 0.1)
    assert out.dtype == torch.float32 and out.shape == (2, 2 * G, N)
    assert_close(out, naive_repeat_kv(q, k, 0.1), dtype=torch.float32, name=f"G{G} D{D} N{N} {dtype}")


@pytest.mark.parametrize("layout", ["padded", "bnhd"])
def test_reference_strided_inputs(layout):
    q, k = make_qk(2, 8, 2, 333, 64, torch.float16, layout=layout)
    assert not k.is_contiguous()
    assert_close(grouped_scores(q, k), naive_repeat_kv(q, k), dtype=torch.float32)


def test_query_head_reads_kv_head_h_div_G():
    # KV head j holds the constant j + 1, so head h must score (h // G + 1) * D (not h % Hk).
    B, Hk, G, N, D = 1, 4, 3, 5, 8
    k = torch.arange(1, Hk + 1, dtype=torch.float32).view(1, Hk, 1, 1).expand(B, Hk, N, D).contiguous()
    q = torch.ones(B, Hk * G, D)
    expected = torch.tensor([(h // G + 1) * D for h in range(Hk * G)], dtype=torch.float32)
    assert torch.equal(grouped_scores(q, k), expected.view(1, -1, 1).expand(B, Hk * G, N))


def test_scale_and_fp32_accumulation():
    # 4096 products of 1 accumulate exactly in fp32; an fp16 accumulator would stop at 2048.
    q = torch.ones(1, 1, 4096, dtype=torch.float16)
    k = torch.ones(1, 1, 2, 4096, dtype=torch.float16)
    assert grouped_scores(q, k).tolist() == [[[4096.0, 4096.0]]]
    assert grouped_scores(q, k, scale=0.5).tolist() == [[[2048.0, 2048.0]]]


def test_empty_cache():
    q, k = make_qk(1, 4, 2, 0, 64)
    assert grouped_scores(q, k).shape == (1, 4, 0)


def _bad(q_shape=(2, 8, 64), k_shape=(2, 2, 10, 64), q_dtype=torch.float32, k_dtype=torch.float32, k_device="cpu"):
    return torch.zeros(q_shape, dtype=q_dtype), torch.zeros(k_shape, dtype=k_dtype, device=k_device)


@pytest.mark.parametrize("args,kwargs,match", [
    (_bad(q_shape=(2, 8)), {}, r"q must have rank 3 \[B, H, D\], got shape \(2, 8\)"),
    (_bad(q_shape=(2, 8, 1, 64)), {}, r"q must have rank 3"),
    (_bad(k_shape=(2, 20, 64)), {}, r"k must have rank 4 \[B, Hk, N, D\]"),
    (_bad(q_shape=(3, 8, 64)), {}, r"batch mismatch: q has B=3, k has B=2"),
    (_bad(k_shape=(2, 2, 10, 32)), {}, r"head dim mismatch: q has D=64, k has D=32"),
    (_bad(k_shape=(2, 3, 10, 64)), {}, r"H=8 must be a positive multiple of KV heads Hk=3"),
    (_bad(k_shape=(2, 0, 10, 64)), {}, r"multiple of KV heads Hk=0"),
    (_bad(k_dtype=torch.float16), {}, r"dtype mismatch: q is torch.float32, k is torch.float16"),
    (_bad(q_dtype=torch.float64, k_dtype=torch.float64), {}, r"unsupported dtype torch.float64"),
    (_bad(k_device="meta"), {}, r"device mismatch: q is on cpu, k is on meta"),
    (_bad(), {"scale": torch.tensor(1.0)}, r"scale must be None or a real number"),
])
def test_validation_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grouped_scores(*args, **kwargs)


def test_non_tensor_inputs():
    with pytest.raises(TypeError, match="must be torch.Tensors"):
        grouped_scores([[1.0]], torch.zeros(1, 1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_tiles_equal_one_matmul(monkeypatch, dtype):
    # the torch path scores half-precision keys SCORE_TILE tokens at a time: several full tiles
    # and a partial one, over a strided column slice (FASA's K[..., :d] on GPU), must give the
    # whole product
    module = importlib.import_module("tokaccel.kernels.grouped_scores")
    q, k = make_qk(2, 6, 3, 40, 64, dtype, seed=7)
    keys = k[..., :32]
    q = q[..., :32].contiguous()
    whole = grouped_scores_reference(q, keys, 0.3)
    monkeypatch.setattr(module, "SCORE_TILE", 16)
    tiled = grouped_scores_reference(q, keys, 0.3)
    assert_close(tiled, whole, dtype=torch.float32)
    assert_close(tiled, naive_repeat_kv(q, keys, 0.3), dtype=torch.float32)
