"""The policies, one module each (docs/methods.md); `tokaccel.policies()` lists every registered name.

The token-selection policies share one engine (`engine.SelectionPolicy`): each is its scorer.

The registry that maps names to classes (text policies and the visual-token pruners of
tokaccel.vision) is `tokaccel.registry`, one layer above this package and tokaccel.vision;
`make_policy`, `parse_spec`, `split_specs`, `REGISTRY` and `available` are also reachable here.
"""

from __future__ import annotations

import importlib
import sys
import types

from .base import LayerContext, LayerInfo, Policy
from .dense import Dense
from .engine import SelectionPolicy
from .fasa import FASA
from .h2o import H2O
from .hisa import HISA
from .quest import Quest
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tokenselect import TokenSelect

TEXT_POLICIES = (Dense, TokenSelect, HISA, Quest, FASA, H2O, StreamingLLM, SnapKV)
_FROM_REGISTRY = ("REGISTRY", "available", "make_policy", "parse_spec", "split_specs")


def __getattr__(name: str):
    if name in _FROM_REGISTRY:  # imported on first use: the registry sits above this package
        return getattr(importlib.import_module("tokaccel.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """Lets `tokaccel.policies()` list the policies while `tokaccel.policies` stays the package."""

    def __call__(self) -> dict[str, str]:
        return importlib.import_module("tokaccel.registry").available()


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Policy", "LayerInfo", "LayerContext", "SelectionPolicy", "Dense", "TokenSelect", "HISA", "Quest", "FASA", "H2O", "SnapKV",
           "StreamingLLM", "TEXT_POLICIES", *_FROM_REGISTRY]
