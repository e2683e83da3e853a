"""tokaccel.kernels.testing: tolerances and the assert_close failure report."""
import pytest
import torch

from tokaccel.kernels.testing import assert_close, make_qk, randn, tolerances


def test_tolerances_by_dtype():
    assert tolerances(torch.float32) == (1e-5, 1e-5)
    assert tolerances(torch.float16) == (1e-3, 1e-2)
    assert tolerances(torch.bfloat16) == (1e-2, 5e-2)
    with pytest.raises(ValueError):
        tolerances(torch.int32)


def test_assert_close_passes_within_tolerance():
    x = torch.randn(10, 10)
    assert_close(x + 1e-6, x)
    assert_close((x + 5e-3).half(), x.half())  # fp16 tolerances from the dtype
    assert_close(torch.tensor([float("inf")]), torch.tensor([float("inf")]))


def test_assert_close_report():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2] = 0.5
    actual[2, 3] = 1e-4
    with pytest.raises(AssertionError) as err:
        assert_close(actual, expected, name="scores")
    msg = str(err.value)
    assert msg.startswith("scores: 2 / 12 elements mismatch")
    assert "max abs err 0.5 at index (1, 2): actual=0.5, expected=0" in msg


def test_assert_close_dtype_and_overrides():
    a, b = torch.tensor([1.0]), torch.tensor([1.002])
    with pytest.raises(AssertionError):
        assert_close(a, b)  # fp32 default
    assert_close(a, b, dtype=torch.bfloat16)
    assert_close(a, b, rtol=0, atol=3e-3)


def test_assert_close_nan_and_shape():
    with pytest.raises(AssertionError, match="1 / 2 elements mismatch"):
        assert_close(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert_close(torch.tensor([float("nan")]), torch.tensor([float("nan")]), equal_nan=True)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close(torch.zeros(2), torch.zeros(3))


def test_random_helpers_are_seeded():
    assert torch.equal(randn((3, 5), seed=7), randn((3, 5), seed=7))
    assert randn((2,), torch.bfloat16).dtype == torch.bfloat16
    for layout in ("contiguous", "padded", "bnhd"):
        q, k = make_qk(2, 6, 3, 11, 64, torch.float16, layout=layout)
        assert q.shape == (2, 6, 64) and k.shape == (2, 3, 11, 64)
        assert q.stride(-1) == 1 and k.stride(-1) == 1
    with pytest.raises(ValueError):
        make_qk(1, 1, 1, 1, 8, layout="weird")
