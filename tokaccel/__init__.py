"""tokaccel: decide, token by token, what attention reads and what the KV cache keeps.

    import tokaccel
    model, tokenizer = tokaccel.models.load("smollm2-135m-instruct")
    tokaccel.patch_model(model, policy="dense")
    model.generate(...)
    tokaccel.unpatch_model(model)

Importing tokaccel changes nothing; only patch_model touches a model (and registers the
"tokaccel" attention entry with transformers on first use), and pack_linears (CPU: oneDNN-packed
weights for every nn.Linear, undone by unpack_linears).
"""

import importlib

from . import policies
from .cpu_linear import pack_linears, unpack_linears
from .patch import get_policy, patch_model, patch_state, patched, reset_stats, stats, unpatch_model
from .policies import Policy
from .registry import make_policy

__version__ = "0.1.0"

# Public submodules reachable as attributes after a bare `import tokaccel` (tokaccel.models.load,
# tokaccel.evals.run_eval, ...), each imported on first access only: no import-time cost.
# The kernel ops are imported from tokaccel.kernels.ops (tokaccel.kernels is a namespace package).
SUBMODULES = ("bench", "cache", "calibrate", "evals", "models", "probe", "recycling", "rope", "selection", "vision")


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))

__all__ = [
    "patch_model",
    "unpatch_model",
    "patched",
    "policies",
    "make_policy",
    "Policy",
    "stats",
    "reset_stats",
    "get_policy",
    "patch_state",
    "pack_linears",
    "unpack_linears",
]
