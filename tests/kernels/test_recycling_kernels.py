"""Token Recycling's kernels: tree_draft (level-by-level gather from the adjacency matrix) and
adjacency_update (top-8 of every node's logits scattered into its token's row, one writer per token).

* the torch references against plain Python loops;
* the Triton kernels against the references under Triton's interpreter (child process with
  TRITON_INTERPRET=1): the paper's tree and small sub-trees, several trees per call, vocabularies
  that are not a multiple of the block, duplicate tokens, ties, strided logits;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import load_worker, triton_kernel_tests
from tokaccel.kernels.recycling import adjacency_update, tree_draft, tree_draft_reference

WORKER = Path(__file__).with_name("recycling_interp_worker.py")
KERNEL_NAMES = ["tree_draft", "adjacency_update"]


def _worker():
    return load_worker(WORKER)


@pytest.mark.parametrize("tree", ["paper", 4])
def test_tree_draft_reference_matches_a_loop(tree):
    table, roots, parent, slot, depth = _worker().draft_inputs({"V": 50, "B": 3, "tree": tree})
    got = tree_draft(table, roots, parent, slot, depth)
    for b in range(3):
        expect = [int(roots[b])]
        for i in range(1, parent.numel()):
            expect.append(int(table[expect[int(parent[i])], int(slot[i])]))
        assert got[b].tolist() == expect
    assert torch.equal(tree_draft_reference(table, roots, parent, slot, depth, int(depth.max())), got)


def test_adjacency_update_reference_matches_a_loop():
    table, tokens, logits, write = _worker().update_inputs({"V": 40, "n": 12})
    expect = table.clone()
    for i in range(12):
        if write[i]:
            expect[tokens[i]] = torch.tensor(sorted(range(40), key=lambda j: -float(logits[i, j]))[:8], dtype=torch.int32)
    adjacency_update(table, tokens, logits, write)
    assert torch.equal(table, expect)


def test_bad_inputs_are_rejected():
    table = torch.zeros(10, 8, dtype=torch.int32)
    idx = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="int32"):
        tree_draft(table.long(), idx[:1], idx, idx, idx)
    with pytest.raises(ValueError, match="parent"):
        tree_draft(table, idx[:1], idx.int(), idx, idx)
    with pytest.raises(ValueError, match="write"):
        adjacency_update(table, idx, torch.zeros(3, 10), idx)
    with pytest.raises(ValueError, match="logits"):
        adjacency_update(table, idx, torch.zeros(2, 10), idx.bool())


def _cases():
    cases = [{"id": f"draft-{t}-B{B}-V{V}", "op": "draft", "tree": t, "B": B, "V": V, "seed": s}
             for s, (t, B, V) in enumerate([("paper", 1, 100), ("paper", 3, 1000), (3, 2, 17), (16, 1, 5)])]
    cases += [{"id": f"update-n{n}-V{V}{'-ties' if ties else ''}{'-strided' if st else ''}", "op": "update",
               "n": n, "V": V, "ties": ties, "strided": st, "seed": i}
              for i, (n, V, ties, st) in enumerate([(1, 9, False, False), (81, 3000, False, False),
                                                    (17, 1030, True, False), (6, 2100, False, True)])]
    return cases


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, KERNEL_NAMES)
