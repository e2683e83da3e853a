"""The policy registry: `tokaccel.policies()` lists them; `make_policy` builds one by name.

Each policy lives in its own module and is registered here by one line.
"""

from __future__ import annotations

import re
import sys
import types

from .base import LayerContext, LayerInfo, Policy
from .dense import Dense
from .fasa import FASA
from .h2o import H2O
from .hisa import HISA
from .quest import Quest
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tokenselect import TokenSelect
from ..vision import POLICIES as VISION_POLICIES

REGISTRY: dict[str, type[Policy]] = {cls.name: cls for cls in (Dense, TokenSelect, HISA, Quest, FASA, H2O, StreamingLLM, SnapKV)}
REGISTRY.update({cls.name: cls for cls in VISION_POLICIES})


def available() -> dict[str, str]:
    """Policy names -> one-line descriptions."""
    return {name: cls.description for name, cls in sorted(REGISTRY.items())}


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """Parse "name" or "name:key=value,key=value" (as used on the command line) into (name, config).

    >>> parse_spec("tokenselect:k=1024,theta=0.9")
    ('tokenselect', {'k': 1024, 'theta': 0.9})
    """
    name, _, rest = spec.strip().partition(":")
    config = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"policy spec {spec!r}: expected key=value, got {item!r}")
        config[key.strip()] = _parse_value(value.strip())
    return name.strip(), config


def split_specs(text: str) -> list[str]:
    """Split a command-line list of specs on commas and semicolons, keeping "key=value" pieces
    with the spec before them: "dense,tokenselect:k=1024,theta=0.9" -> ["dense", "tokenselect:k=1024,theta=0.9"]."""
    out: list[str] = []
    for piece in (p.strip() for p in re.split(r"[,;]", text)):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def make_policy(policy: str | Policy = "dense", **config) -> Policy:
    """A Policy from a name ("tokenselect"), a spec ("tokenselect:k=1024") or an instance.

    Raises ValueError for unknown names or config keys, listing what is valid.
    """
    if isinstance(policy, Policy):
        if config:
            raise ValueError(f"config {sorted(config)} given together with a {type(policy).__name__} instance; "
                             "set the values on the instance instead")
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a tokaccel Policy, got {type(policy).__name__}")
    name, spec_config = parse_spec(policy)
    cls = REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(REGISTRY))}")
    merged = {**spec_config, **config}
    valid = {f.name for f in cls.__dataclass_fields__.values() if f.init}
    unknown = sorted(set(merged) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(valid) or 'none'}")
    return cls(**merged)


class _CallableModule(types.ModuleType):
    """Lets `tokaccel.policies()` list the policies while `tokaccel.policies` stays the package."""

    def __call__(self) -> dict[str, str]:
        return available()


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Policy", "LayerInfo", "LayerContext", "Dense", "TokenSelect", "HISA", "Quest", "FASA", "H2O", "SnapKV", "StreamingLLM", "REGISTRY", "available", "make_policy", "parse_spec", "split_specs"]
