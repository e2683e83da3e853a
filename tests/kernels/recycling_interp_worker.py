"""Runs tree_draft / adjacency_update Triton-vs-reference cases; meant for a process with
TRITON_INTERPRET=1 (see interp_worker.py for why).

Usage: python recycling_interp_worker.py CASES.json RESULTS.json (test_recycling_kernels.py drives it).
"""


def draft_inputs(c):
    """table [V, 8] int32 random, roots [B], and a template's parent / slot / depth."""
    import torch

    from tokaccel.recycling import PAPER_TREE, TreeTemplate, nested_trees

    g = torch.Generator().manual_seed(c.get("seed", 0))
    V, B = c["V"], c["B"]
    table = torch.randint(0, V, (V, 8), generator=g, dtype=torch.int32)
    roots = torch.randint(0, V, (B,), generator=g)
    tree = TreeTemplate(PAPER_TREE) if c["tree"] == "paper" else nested_trees(sizes=(c["tree"],))[c["tree"]]
    return table, roots, tree.parent, tree.slot, tree.depth


def update_inputs(c):
    """table, tokens [n] with duplicates, logits [n, V] (ties when "ties"), write [n] (one writer per token)."""
    import torch

    g = torch.Generator().manual_seed(c.get("seed", 0))
    V, n = c["V"], c["n"]
    table = torch.randint(0, V, (V, 8), generator=g, dtype=torch.int32)
    tokens = torch.randint(0, max(2, n // 2), (n,), generator=g)
    logits = torch.randn(n, V, generator=g)
    if c.get("ties"):
        logits = logits.round()  # many equal values: the order must still be (value desc, id asc)
    if c.get("strided"):
        logits = torch.randn(n, V + 7, generator=g)[:, :V]
    first = torch.zeros(n, dtype=torch.bool)
    seen = set()
    for i, t in enumerate(tokens.tolist()):
        first[i] = t not in seen
        seen.add(t)
    return table, tokens, logits, first


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels.recycling import (adjacency_update, adjacency_update_reference, tree_draft,
                                            tree_draft_reference)
    from tokaccel.kernels.testing import run_each

    def check(c):
        if c["op"] == "draft":
            args = draft_inputs(c)
            ref = tree_draft_reference(*args)
            res = tree_draft(*args, backend="triton")
            if not torch.equal(ref, res):
                raise AssertionError(f"draft differs at {torch.nonzero(ref != res)[:5].tolist()}")
        else:
            table, tokens, logits, write = update_inputs(c)
            expect = table.clone()
            if c.get("ties"):  # topk's order among equal values is unspecified: build (value desc, id asc)
                for i in torch.nonzero(write).flatten().tolist():
                    order = sorted(range(logits.shape[1]), key=lambda j: (-float(logits[i, j]), j))[:8]
                    expect[tokens[i]] = torch.tensor(order, dtype=torch.int32)
            else:
                adjacency_update_reference(expect, tokens, logits, write)
            got = table.clone()
            adjacency_update(got, tokens, logits, write, backend="triton")
            if not torch.equal(expect, got):
                raise AssertionError(f"rows differ: {torch.nonzero((expect != got).any(1)).flatten().tolist()}")

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
