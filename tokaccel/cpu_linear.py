"""Packed CPU linears: each `nn.Linear` weight reordered once into oneDNN's blocked layout.

Why: on CPU, `F.linear` on a few rows (the 2-80 tokens of a speculative verify forward) repacks
the whole weight on every call, so SmolLM2's 8-token forward costs 1.5-1.8x a 1-token one and its
49152 x 576 output head alone ~2x. With the weight packed once, 8 tokens cost ~1.0x one token
and the single-token step itself gets ~1.3x faster (`python benchmarks/packed_linear.py`).

    tokaccel.cpu_linear.pack_linears(model)     # every CPU fp32 / bf16 nn.Linear
    model.generate(...)                         # any decoding: greedy, Token Recycling, prompt lookup
    tokaccel.cpu_linear.unpack_linears(model)   # back to plain nn.Linear

Cost: a second copy of every packed weight (the original stays: tied embeddings, state_dict,
autograd and unpacking use it). A packed module computes with `F.linear` instead whenever the
packed copy could be stale or unusable: its weight changed since packing (in-place update, new
storage), the input is not on CPU or has another dtype, or autograd needs the graph.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 8  # the row count oneDNN tunes the packed layout for; 1-80 rows all run well with it
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """True when this torch build has oneDNN's packed linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward reads a oneDNN-packed copy of its weight (see module doc).
    Made by `pack_linears` by switching the class of an existing module; never constructed."""

    def _pack(self) -> None:
        weight = self.weight.detach()
        self._tokaccel_packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        self._tokaccel_stamp = (weight.data_ptr(), weight._version, weight.dtype)

    def _packed_usable(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (x.device.type == "cpu" and x.dtype == weight.dtype
                and self._tokaccel_stamp == (weight.data_ptr(), weight._version, weight.dtype)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                      or (self.bias is not None and self.bias.requires_grad))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if not self._packed_usable(x):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._tokaccel_packed, bias, "none", [], "")


def _unpackable_reason(module: nn.Module) -> str | None:
    if type(module) is not nn.Linear:
        return "not a plain nn.Linear"
    weight = module.weight
    if weight.device.type != "cpu":
        return f"on {weight.device}"
    if weight.dtype not in PACKED_DTYPES:
        return f"dtype {weight.dtype} (packed: float32, bfloat16)"
    if module.bias is not None and module.bias.dtype != weight.dtype:
        return "bias dtype differs from the weight's"
    return None


def pack_linears(model: nn.Module) -> int:
    """Pack every plain CPU fp32 / bf16 nn.Linear of `model` in place; returns how many were
    packed (already packed ones count too). Raises RuntimeError without oneDNN, ValueError when
    no linear qualifies (the reasons are listed)."""
    if not available():
        raise RuntimeError("pack_linears needs torch built with oneDNN (torch.backends.mkldnn) and its "
                           "mkldnn::_linear_pointwise op; this build lacks them")
    count, reasons = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            count += 1
            continue
        reason = _unpackable_reason(module)
        if reason is None:
            try:
                module.__class__ = PackedLinear
                module._pack()
            except RuntimeError as err:  # e.g. a CPU without the ISA oneDNN needs for this dtype
                module.__class__ = nn.Linear
                reasons[name] = str(err).splitlines()[0]
                continue
            count += 1
        elif isinstance(module, nn.Linear):
            reasons[name] = reason
    if count == 0:
        listed = "; ".join(f"{n}: {r}" for n, r in list(reasons.items())[:4]) or "the model has no nn.Linear"
        raise ValueError(f"pack_linears: no linear layer can be packed ({listed})")
    return count


def _unpack(module: PackedLinear) -> None:
    module.__class__ = nn.Linear
    del module._tokaccel_packed, module._tokaccel_stamp


def unpack_linears(model: nn.Module) -> int:
    """Turn every PackedLinear of `model` back into a plain nn.Linear (its weight was never
    touched) and free the packed copies; returns how many were unpacked."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for module in packed:
        _unpack(module)
    return len(packed)


def packed_count(model: nn.Module) -> int:
    """How many linears of `model` are packed now."""
    return sum(isinstance(m, PackedLinear) for m in model.modules())


@contextmanager
def packed_linears(model: nn.Module):
    """Pack for the duration of a `with` block; linears packed before it stay packed after."""
    before = {id(m) for m in model.modules() if isinstance(m, PackedLinear)}
    pack_linears(model)
    try:
        yield model
    finally:
        for module in model.modules():
            if isinstance(module, PackedLinear) and id(module) not in before:
                _unpack(module)
