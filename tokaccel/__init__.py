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

from . import policies
from .cpu_linear import pack_linears, unpack_linears
from .patch import get_policy, patch_model, patched, reset_stats, stats, unpatch_model
from .policies import Policy, make_policy

__version__ = "0.1.0"

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
    "pack_linears",
    "unpack_linears",
]
