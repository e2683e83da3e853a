"""Backend selection: CPU tensors -> torch, CUDA -> Triton, forced backends, no-triton import."""
import logging
from types import SimpleNamespace

import pytest
import torch

import tokaccel.kernels.ops as K
from tokaccel.kernels import dispatch
from tokaccel.kernels.testing import make_qk

CPU = [torch.zeros(1)]
CUDA = [SimpleNamespace(device=torch.device("cuda", 0))]  # only .device is looked at
compiled_mode = pytest.mark.skipif(K.interpret_enabled(), reason="pytest runs with TRITON_INTERPRET=1")


@pytest.fixture
def spy_op(monkeypatch):
    """The grouped_scores op with both implementations replaced by recorders."""
    op = K.get_op("grouped_scores")
    calls = []
    monkeypatch.setattr(op, "reference", lambda *a, **kw: calls.append("torch") or "torch")
    monkeypatch.setattr(op, "triton", lambda *a, **kw: calls.append("triton") or "triton")
    return calls


@compiled_mode
def test_cpu_tensors_use_torch(spy_op):
    q, k = make_qk(1, 4, 2, 10, 64)
    assert K.grouped_scores(q, k) == "torch"
    assert spy_op == ["torch"]


def test_forced_torch(spy_op):
    q, k = make_qk(1, 4, 2, 10, 64)
    assert K.grouped_scores(q, k, backend="torch") == "torch"
    assert spy_op == ["torch"]


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
def test_forced_triton_calls_the_launcher(spy_op, monkeypatch):
    monkeypatch.setattr(dispatch, "interpret_enabled", lambda: True)  # pretend interpreter mode
    q, k = make_qk(1, 4, 2, 10, 64)
    assert K.grouped_scores(q, k, backend="triton") == "triton"
    assert spy_op == ["triton"]


def test_unknown_backend():
    q, k = make_qk(1, 4, 2, 10, 64)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; valid: \('torch', 'triton'\)"):
        K.grouped_scores(q, k, backend="cuda")


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
@compiled_mode
def test_resolve_backend_rules():
    assert K.resolve_backend(None, CPU) == "torch"
    assert K.resolve_backend(None, CUDA) == "triton"
    assert K.resolve_backend(None, CUDA + CPU) == "torch"  # mixed devices: the reference decides
    assert K.resolve_backend(None, CUDA, has_triton_impl=False) == "torch"
    assert K.resolve_backend("torch", CUDA) == "torch"
    assert K.resolve_backend("triton", CUDA) == "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before triton is first imported"):
        K.resolve_backend("triton", CPU)
    with pytest.raises(RuntimeError, match="no Triton implementation"):
        K.resolve_backend("triton", CUDA, has_triton_impl=False)


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
@compiled_mode
def test_interpret_env_set_after_triton_import(monkeypatch, caplog):
    # Too late for triton (interpreter mode is fixed at import): stay on torch and say why.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_warned_env_mismatch", False)
    with caplog.at_level(logging.WARNING, logger="tokaccel.kernels.dispatch"):
        assert K.resolve_backend(None, CPU) == "torch"
    assert "imported before" in caplog.text
    assert not K.interpret_enabled()


def test_interpreter_mode_picks_triton_for_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "interpret_enabled", lambda: True)
    assert K.resolve_backend(None, CPU) == "triton"
    assert K.resolve_backend("triton", CPU) == "triton"


def test_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    assert K.resolve_backend(None, CUDA) == "torch"
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.resolve_backend("triton", CUDA)


def test_registries():
    assert "grouped_scores" in K.list_ops()
    op = K.get_op("grouped_scores")
    assert op.reference is K.grouped_scores_reference
    with pytest.raises(ValueError, match="unknown op"):
        K.get_op("nope")
    if K.HAS_TRITON:
        assert K.list_kernels() == sorted(K.KERNELS) and "grouped_scores" in K.KERNELS
        entry = K.KERNELS["grouped_scores"]
        assert entry.aot_configs() and all(c.signature and c.constexprs for c in entry.aot_configs())


IMPORT_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
import tokaccel.kernels.ops as K
assert not K.HAS_TRITON and not K.KERNELS, (K.HAS_TRITON, K.KERNELS)
assert K.get_op("grouped_scores").triton is None
q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 5, 16)
ref = K.grouped_scores_reference(q, k)
assert torch.equal(K.grouped_scores(q, k), ref)
try:
    K.grouped_scores(q, k, backend="triton")
except RuntimeError as e:
    assert "triton is not importable" in str(e)
else:
    raise AssertionError("backend='triton' without triton must raise")
print("ok")
"""


def test_import_without_triton(run_python):
    assert run_python(["-c", IMPORT_WITHOUT_TRITON], timeout=120).stdout.strip() == "ok"
