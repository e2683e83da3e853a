"""Token Recycling (arXiv 2408.08696): train-free speculative decoding, token-identical to greedy.

    import tokaccel.recycling
    out = model.generate(**inputs, max_new_tokens=128, custom_generate=tokaccel.recycling.generate)

Each step drafts a static tree of tokens from an adjacency matrix `A [V, 8]` (the top-8 next
tokens last seen after each token), verifies the whole tree in one forward (a 4-D mask lets each
node see the cache and its own ancestors; position = cache length + depth), accepts the longest
path the model's own argmax agrees with, plus one bonus token, and moves the accepted path's KV
into place. Every node's logits then refresh `A` ("recycling" the candidates greedy decoding
throws away). The matrix lives on the model between calls (hot start); see `recycling_state`.

How many drafted tokens pay off depends on the device: a verify forward of n tokens must cost less
than the tokens it accepts. `tree="auto"` (default) picks, step by step, the size among nested
sub-trees of the paper's 80-node tree that maximises measured (accepted + 1) / step time, with
plain one-token steps as a candidate, so it never settles on something slower than greedy.

On CPU, pack the model's linears first (`tokaccel.pack_linears(model)`, see `tokaccel.cpu_linear`):
unpacked, a verify forward of 8 tokens costs 1.5-1.8x a one-token step (each small-M matmul repacks
its weight), so trees rarely pay; packed, it costs ~1.0x. `generate` warns once when a large CPU
model is not packed.

Lossless up to floating point: a tree forward computes the same logits as one-token steps only to
rounding (fp32: ~1e-5), so an exact argmax tie can in principle break differently.

Modules: trees (templates), adjacency (the matrix: draft, refresh), masks (tree verification
masks and attention), state (hot start, tree chooser, counters), calibration (which tree sizes pay
on this device), generate (the decoding loop).
"""

from .adjacency import Adjacency, draft_tree, seed_from_sequence, update_adjacency, update_priority
from .calibration import calibrate, calibration_key
from .generate import generate
from .state import RecyclingState, RecyclingStats, TreeChooser, recycling_state, reset, set_recycling_state
from .trees import AUTO_SIZES, PAPER_TREE, SLOTS, TreeTemplate, nested_trees

__all__ = ["generate", "Adjacency", "TreeTemplate", "TreeChooser", "RecyclingState", "RecyclingStats", "PAPER_TREE",
           "AUTO_SIZES", "SLOTS", "nested_trees", "draft_tree", "seed_from_sequence", "update_adjacency",
           "update_priority", "calibrate", "calibration_key", "recycling_state", "set_recycling_state", "reset"]
