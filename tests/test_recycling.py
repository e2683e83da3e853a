"""Token Recycling (tokaccel.recycling): token-identical to greedy `generate` on tiny random models
of four families (Llama, Qwen2, Mistral with an all-sliding cache, Gemma3 with hybrid
sliding/global layers) and on both real models; EOS and max_new_tokens inside an accepted path;
logits processors; the tree templates, the matrix and the errors."""
import pytest
import torch

import tokaccel.recycling as R
from testkit.models import greedy as _greedy
from testkit.models import random_prompts as _prompts
from testkit.models import recycled as _recycled
from testkit.models import tiny_model


@pytest.fixture(autouse=True)
def _calibration_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path))


# ------------------------------------------------------------------------------------ templates
def test_paper_tree_shape():
    tree = R.TreeTemplate(R.PAPER_TREE)
    assert tree.size == 80
    assert [lvl.numel() for lvl in tree.levels] == [8, 21, 25, 15, 8, 3]
    # ancestors: node i sees exactly the nodes of its path
    for i, path in enumerate(tree.paths, start=1):
        seen = torch.nonzero(tree.ancestors[i]).flatten().tolist()
        assert [tree.paths[j - 1] for j in seen[1:]] == [path[:d] for d in range(1, len(path) + 1)]
        assert seen[0] == 0 and tree.depth[i] == len(path) and tree.slot[i] == path[-1]


def test_nested_trees_are_valid_and_nested():
    trees = R.nested_trees()
    sizes = sorted(trees)
    assert sizes == [m for m in R.AUTO_SIZES if m]
    for small, big in zip(sizes, sizes[1:]):
        assert set(trees[small].paths) < set(trees[big].paths)
    assert set(trees[80].paths) == set(R.PAPER_TREE)


@pytest.mark.parametrize("paths,match", [([(0,), (0,)], "duplicate"), ([(0, 1)], "parent"), ([(8,)], "slot"),
                                         ([()], "empty")])
def test_invalid_templates_are_rejected(paths, match):
    with pytest.raises(ValueError, match=match):
        R.TreeTemplate(paths)


# ------------------------------------------------------------------------------------ lossless
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_identical_to_greedy_on_tiny_models(kind):
    """Prompts longer than the sliding window (8) of Mistral / Gemma3, every tree option."""
    model = tiny_model(kind)
    for ids in _prompts(5):
        expect = _greedy(model, ids, max_new_tokens=30, eos_token_id=None)
        for tree in ("auto", "paper", 0, 4, [[0], [1], [0, 0], [0, 0, 0]]):
            got = _recycled(model, ids, max_new_tokens=30, eos_token_id=None, tree=tree)
            assert torch.equal(got, expect), (kind, tree)
    stats = R.recycling_state(model).stats.summary()
    assert stats["accepted"] > 0 and stats["mean_accepted_per_step"] > 1.2  # drafts were really accepted


def test_stops_inside_an_accepted_path_like_greedy():
    """EOS and max_new_tokens reached in the middle of a step's accepted tokens: same output as greedy."""
    model = tiny_model("llama")
    truncated = 0
    for ids in _prompts(4, seed=1):
        free = _greedy(model, ids, max_new_tokens=40, eos_token_id=None)[0, ids.shape[1]:]
        for max_new in (1, 2, 5, 11, 17):
            expect = _greedy(model, ids, max_new_tokens=max_new, eos_token_id=None)
            before = R.recycling_state(model).stats.emitted if R.recycling_state(model) else 0
            got = _recycled(model, ids, max_new_tokens=max_new, eos_token_id=None, tree="paper")
            assert torch.equal(got, expect), max_new
            truncated += R.recycling_state(model).stats.emitted - before >= max_new  # a step emitted past the stop
        for eos in dict.fromkeys(free[3:20].tolist()):
            expect = _greedy(model, ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
            before = R.recycling_state(model).stats.emitted
            got = _recycled(model, ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=0, tree="paper")
            assert torch.equal(got, expect), eos
            truncated += R.recycling_state(model).stats.emitted - before >= got.shape[1] - ids.shape[1]
    assert truncated > 5  # the stop really fell inside multi-token steps


def test_logits_processors_keep_greedy_semantics():
    """Processors that depend on the sequence (repetition penalty, no-repeat n-grams, min length)
    see, for every tree node, the sequence that node continues."""
    model = tiny_model("llama")
    kw = dict(max_new_tokens=30, repetition_penalty=1.5, no_repeat_ngram_size=3, min_new_tokens=10, eos_token_id=5,
              pad_token_id=0)
    for ids in _prompts(4, seed=2):
        assert torch.equal(_recycled(model, ids, tree="paper", **kw), _greedy(model, ids, **kw))


def test_scores_cache_and_left_padding_match_greedy():
    model = tiny_model("gemma3")
    ids = _prompts(1, seed=3)[0]
    kw = dict(max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    expect, got = _greedy(model, ids, **kw), _recycled(model, ids, tree="paper", **kw)
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.scores, expect.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert got.cache.get_seq_length() == expect.cache.get_seq_length() == got.sequences.shape[1] - 1
    # a left-padded batch of one
    padded = torch.cat((torch.zeros(1, 4, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)), dim=1)
    kw = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert torch.equal(_recycled(model, padded, tree="paper", **kw), _greedy(model, padded, **kw))


def test_identical_to_greedy_on_smollm2(smollm2):
    """The real default model, chat prompts of each class, with its EOS (answers end mid-tree)."""
    from tokaccel.bench.spec_prompts import PROMPTS
    from tokaccel.bench.speculative import encode

    model, tokenizer = smollm2
    R.reset(model)
    prompts = [PROMPTS["chat"][0], PROMPTS["code"][6], PROMPTS["repetitive"][0], PROMPTS["repetitive"][6],
               PROMPTS["summarization"][1], "Answer with one word: what colour is the sky?"]
    for text in prompts:
        ids = encode(tokenizer, text, "cpu")
        expect = _greedy(model, ids, max_new_tokens=48)
        got = _recycled(model, ids, max_new_tokens=48, tree="paper")
        assert torch.equal(got, expect), text
    assert R.recycling_state(model).stats.summary()["mean_accepted_per_step"] > 1.5
    R.reset(model)


def test_identical_to_greedy_on_gemma3(gemma3):
    """Gemma-3-270M: hybrid sliding (512) / global layers, 262K vocabulary, prompt beyond the window."""
    model, tokenizer = gemma3
    R.reset(model)
    text = "The history of the printing press. " + "Printing spread quickly across Europe. " * 90
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 520
    for prompt in (ids, tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]):
        expect = _greedy(model, prompt, max_new_tokens=24)
        got = _recycled(model, prompt, max_new_tokens=24, tree="auto")
        assert torch.equal(got, expect)
    R.reset(model)


# ------------------------------------------------------------------------------------ with TokenSelect
@pytest.mark.parametrize("kind,mode", [("llama", "compact"), ("llama", "original"), ("gemma3", "compact")])
def test_identical_to_greedy_with_tokenselect(kind, mode):
    """A tiny budget (2 sinks + 6 selected + 8 local) so most nodes take the sparse path: each tree
    node must see the selection cache sequential decoding would have had, select on a miss, and
    leave the accepted path's state for the next step."""
    import tokaccel

    model = tiny_model(kind)
    with tokaccel.patched(model, policy="tokenselect", k=6, n_init=2, n_local=8, chunk=8, theta=0.5,
                          position_mode=mode):
        for ids in _prompts(4, seed=4):
            ids = ids.repeat(1, 3)  # 15-42 tokens: beyond the 16-token budget for most
            tokaccel.reset_stats(model)
            expect = _greedy(model, ids, max_new_tokens=30, eos_token_id=None)
            sparse = tokaccel.stats(model)["sparse_calls"]
            for tree in ("auto", "paper", 4):
                assert torch.equal(_recycled(model, ids, max_new_tokens=30, eos_token_id=None, tree=tree), expect)
        assert sparse > 0
        stats = tokaccel.stats(model)
        assert stats["selection_hits"] > 0 and stats["selection_misses"] > 0
    assert R.recycling_state(model).stats.summary()["mean_accepted_per_step"] > 1.2


def test_identical_to_greedy_with_tokenselect_on_a_long_smollm2_prompt(smollm2):
    import tokaccel

    model, tokenizer = smollm2
    R.reset(model)
    text = " ".join(["The harbour town kept its records in a stone library by the water."] * 6 +
                    [f"Entry {i}: the ship {i % 7} arrived with {i * 3} crates of grain." for i in range(120)])
    ids = tokenizer(text + " Entry 120:", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 1500
    with tokaccel.patched(model, policy="tokenselect", k=256, n_init=32, n_local=128):
        expect = _greedy(model, ids, max_new_tokens=24)
        got = _recycled(model, ids, max_new_tokens=24, tree=8)
        assert tokaccel.stats(model)["sparse_calls"] > 0
    assert torch.equal(got, expect)
    assert R.recycling_state(model).stats.summary()["mean_accepted_per_step"] > 1.2
    R.reset(model)


# ------------------------------------------------------------------------------------ the matrix
def test_hot_start_save_load_and_reset(tmp_path):
    model = tiny_model("llama")
    ids = _prompts(1)[0]
    _recycled(model, ids, max_new_tokens=20, eos_token_id=None, tree=4)
    state = R.recycling_state(model)
    assert state is not None and bool((state.adjacency.table != 0).any())
    table = state.adjacency.table.clone()
    state.adjacency.save(tmp_path / "adj.pt")
    loaded = R.Adjacency.load(tmp_path / "adj.pt")
    assert torch.equal(loaded.table, table)
    R.reset(model)
    assert R.recycling_state(model) is None
    expect = _greedy(model, ids, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(_recycled(model, ids, max_new_tokens=20, eos_token_id=None, adjacency=tmp_path / "adj.pt",
                                 tree=4), expect)
    (tmp_path / "bad.pt").write_bytes(b"not a file")
    with pytest.raises(Exception):
        R.Adjacency.load(tmp_path / "bad.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a tokaccel adjacency"):
        R.Adjacency.load(tmp_path / "other.pt")


def test_update_rule_for_duplicate_tokens():
    """A token at several nodes: its row comes from the deepest accepted-path node, else the first in BFS order."""
    tree = R.TreeTemplate([(0,), (1,), (0, 0), (1, 0)])
    tokens = torch.tensor([7, 3, 7, 3, 9])  # root 7, node 2 also 7; nodes 1 and 3 both 3
    logits = torch.randn(5, 20)
    on_path = torch.tensor([True, True, False, True, False])  # root -> node 1 -> node 3
    table = torch.zeros(20, 8, dtype=torch.int32)
    R.update_adjacency(table, tokens, logits, R.update_priority(tree, on_path))
    top = logits.topk(8, -1).indices.int()
    assert torch.equal(table[7], top[0])  # root on the path beats node 2 off it
    assert torch.equal(table[3], top[3])  # node 3 (deeper on the path) beats node 1
    assert torch.equal(table[9], top[4])


def test_seed_from_sequence_puts_the_last_follower_first():
    table = torch.zeros(10, 8, dtype=torch.int32)
    table[1] = torch.arange(8, dtype=torch.int32)
    R.seed_from_sequence(table, torch.tensor([1, 5, 2, 1, 6]))
    assert table[1].tolist() == [6, 0, 1, 2, 3, 4, 5, 6]  # 1 -> 6 seen last
    assert table[5, 0] == 2 and table[2, 0] == 1


def test_tree_chooser_prefers_what_pays():
    seconds = {0: 1.0, 4: 1.5, 16: 2.0}
    chooser = R.TreeChooser([0, 4, 16], seconds, probe_every=1000)
    for _ in range(60):  # nothing is ever accepted: plain steps win
        chooser.observe(16, {4: 0, 16: 0}, 2.0)
    assert chooser.best() == 0
    for _ in range(60):  # 3 tokens accepted with 16 nodes, 1 with 4
        chooser.observe(16, {4: 1, 16: 3}, 2.0)
    assert chooser.best() == 16
    probing = R.TreeChooser([0, 4, 16], seconds, probe_every=2)
    for _ in range(60):
        probing.observe(16, {4: 0, 16: 0}, 2.0)
    assert [probing.pick() for _ in range(16)] == [0] * 7 + [4] + [0] * 7 + [4]  # every 8th step at size 0
    probing.seconds[16] = 1.4  # the cheapest larger size is probed (it covers the smaller ones)
    assert [probing.pick() for _ in range(8)][-1] == 16
    probing.seconds[16] = 2.0
    for _ in range(60):
        probing.observe(4, {4: 2}, 1.5)  # 4 pays; 16's estimate rises to at least 4's
    assert probing.accepted[16] >= probing.accepted[4] > 1.9
    assert probing.best() == 4  # (1 + 2) / 1.5 beats (1 + 2) / 2.0


# ------------------------------------------------------------------------------------ errors
def test_bad_input_is_rejected():
    model = tiny_model("llama")
    ids = _prompts(1)[0]
    with pytest.raises(ValueError, match="greedy"):
        _recycled(model, ids, max_new_tokens=4, do_sample=True, eos_token_id=None)
    with pytest.raises(ValueError, match="beam"):
        _recycled(model, ids, max_new_tokens=4, num_beams=2, eos_token_id=None)
    with pytest.raises(NotImplementedError, match="batch size 1"):
        _recycled(model, ids.repeat(2, 1), max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    for tree in (-1, 81, "big", 2.5, True):
        with pytest.raises(ValueError, match="tree="):
            _recycled(model, ids, max_new_tokens=4, eos_token_id=None, tree=tree)
    with pytest.raises(NotImplementedError, match="static"):
        _recycled(model, ids, max_new_tokens=4, eos_token_id=None, cache_implementation="static")
    import tokaccel
    from tokaccel.policies import Dense

    class NoTrees(Dense):  # a non-dense policy that does not verify trees: refused, never silently wrong
        name = "no_trees"

    with tokaccel.patched(model, policy=NoTrees()):
        with pytest.raises(NotImplementedError, match="no_trees"):
            _recycled(model, ids, max_new_tokens=4, eos_token_id=None)
    with tokaccel.patched(model, policy="dense"):  # dense attention through tokaccel's entry: still exact
        assert torch.equal(_recycled(model, ids, max_new_tokens=12, eos_token_id=None, tree="paper"),
                           _greedy(model, ids, max_new_tokens=12, eos_token_id=None))
    with tokaccel.patched(model, policy="tokenselect", k=4, n_init=2, n_local=6):  # n_local must exceed the depth
        with pytest.raises(NotImplementedError, match="n_local"):
            _recycled(model, _prompts(1, seed=9)[0].repeat(1, 4), max_new_tokens=8, eos_token_id=None, tree="paper")
    with pytest.raises(ValueError, match="adjacency matrix has 5 rows"):
        _recycled(model, ids, max_new_tokens=4, eos_token_id=None, adjacency=R.Adjacency(5))
