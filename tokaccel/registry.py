"""The policy registry: names -> Policy classes, and `make_policy` / spec parsing.

It sits above tokaccel.policies and tokaccel.vision (both register here by one line), so neither
package imports the other. Adding a selection policy = its module in tokaccel/policies/, its class
in `policies.TEXT_POLICIES`, and tests.
"""

from __future__ import annotations

import re

from .policies import TEXT_POLICIES
from .policies.base import Policy
from .vision import POLICIES as VISION_POLICIES

# one line per policy family: the text policies (tokaccel.policies) and the visual-token pruners
REGISTRY: dict[str, type[Policy]] = {cls.name: cls for cls in TEXT_POLICIES}
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
