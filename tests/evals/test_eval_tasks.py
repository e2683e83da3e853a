"""Task generators: exact token lengths, determinism, needle placement, recoverable answers."""

import re
from collections import Counter

import pytest

from tokaccel.evals import haystack, tasks
from tokaccel.evals.tasks import PromptFormat, get_task, make_samples

ALL = sorted(tasks.SYNTHETIC)


@pytest.mark.parametrize("length", [301, 1024, 2049])
def test_every_task_has_the_exact_length(any_tok, length):
    for name in ALL:
        for sample in make_samples(name, any_tok, length, 2, seed=3):
            if sample.questions:
                assert [len(sample.prompt_ids(q)) for q in range(len(sample.questions))] == [length] * len(sample.questions), name
            else:
                assert len(sample.context_ids) == length, name


def test_prompt_ids_are_the_canonical_tokenization(any_tok):
    for name in ("passkey", "niah_single", "niah_multikey_3", "vt", "cwe"):
        for sample in make_samples(name, any_tok, 777, 2, seed=6):
            ids = sample.prompt_ids()
            assert any_tok(any_tok.decode(ids), add_special_tokens=False)["input_ids"] == ids, name


def test_same_seed_same_prompt_other_seed_other_prompt(smol_tok):
    for name in ("passkey", "niah_multikey_2", "vt", "cwe", "fwe", "niah_multiquery_sep"):
        a = make_samples(name, smol_tok, 700, 2, seed=11)
        b = make_samples(name, smol_tok, 700, 2, seed=11)
        c = make_samples(name, smol_tok, 700, 2, seed=12)
        assert [s.prompt_ids() for s in a] == [s.prompt_ids() for s in b], name
        assert [q.answers for s in a for q in s.questions] == [q.answers for s in b for q in s.questions]
        assert [s.prompt_ids() for s in a] != [s.prompt_ids() for s in c], name


@pytest.mark.parametrize("name", ["passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_single_word"])
def test_needle_present_once_near_the_asked_depth(any_tok, name):
    depths = [0.0, 0.25, 0.5, 0.8, 1.0]
    for depth, sample in zip(depths, make_samples(name, any_tok, 2048, 5, seed=5, depths=depths)):
        text = any_tok.decode(sample.prompt_ids())
        needle = sample.info["needle"] if name == "passkey" else sample.info["needles"][0]
        assert text.count(needle) == 1
        answer = sample.questions[0].answers[0]
        assert answer in needle and text.count(answer) == (2 if name == "passkey" else 1)
        # sentence granularity: the needle sits at a unit boundary within a short sentence of the target
        assert abs(sample.depth - depth) <= 0.03, (depth, sample.depth)
        # and the depth is where the needle really is in the haystack part of the prompt
        head, _ = text.split(needle)
        assert (sample.depth == 0.0) == head.rstrip().endswith(("afterwards.", "there."))


def test_niah_answers_recoverable_from_the_prompt(smol_tok):
    pattern = re.compile(r"One of the special magic (?:numbers|words|uuids) for (\S+) is: (\S+)\.(?=\s|$)")
    for name in ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "niah_multiquery_sep"):
        for sample in make_samples(name, smol_tok, 1500, 3, seed=2):
            found = {}
            for key, value in pattern.findall(smol_tok.decode(sample.context_ids)):
                found.setdefault(key, []).append(value)
            keys = sample.info["keys"]
            assert len(found) >= (4 if name != "niah_multivalue" else 1), name  # distractors are there too
            if name == "niah_multiquery_sep":
                for key, question in zip(keys, sample.questions, strict=True):
                    assert found[key] == question.answers and key in smol_tok.decode(question.ids)
            else:
                assert sorted(sample.questions[0].answers) == sorted(v for k in keys for v in found[k]), name
                assert all(k in smol_tok.decode(sample.questions[0].ids) for k in keys)


def test_multiquery_sep_shares_one_context(smol_tok):
    sample = make_samples("niah_multiquery_sep", smol_tok, 1000, 1, seed=4)[0]
    assert len(sample.questions) == 4
    assert len({len(q.ids) for q in sample.questions}) == 1  # equal tails: every prompt is exactly 1000
    assert len({tuple(q.answers) for q in sample.questions}) == 4


def test_variable_tracking_chain_is_recoverable(any_tok):
    for sample in make_samples("vt", any_tok, 1200, 3, seed=9):
        text = any_tok.decode(sample.context_ids)
        value = sample.info["value"]
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text))
        resolved = set()
        for var in assigned:
            target = assigned[var]
            while target.startswith("VAR "):
                target = assigned[target[4:]]
            if target == value:
                resolved.add(var)
        assert resolved == set(sample.questions[0].answers)
        # the chain appears in order
        positions = [text.index(statement) for statement in sample.info["chain"]]
        assert positions == sorted(positions)


def test_common_and_frequent_words_are_the_answers(smol_tok):
    for sample in make_samples("cwe", smol_tok, 3000, 2, seed=1):
        text = smol_tok.decode(sample.context_ids)
        words = re.findall(r"\d+\. ([a-z]+)", text.split("most often.\n", 1)[1])
        counts = Counter(words)
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(sample.questions[0].answers)
        assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)
    for sample in make_samples("fwe", smol_tok, 3000, 2, seed=1):
        body = smol_tok.decode(sample.context_ids).split("coded words. ", 1)[1]
        counts = Counter(w for w in body.split() if w != "....")
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[:3] == sample.questions[0].answers
        assert counts[ranked[2]] > counts[ranked[3]]


def test_chat_and_plain_formats(smol_tok, gemma_tok):
    chat = make_samples("passkey", smol_tok, 512, 1)[0]
    text = smol_tok.decode(chat.prompt_ids())
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\nThe pass key is")
    assert "What is the pass key?<|im_end|>" in text
    plain = make_samples("passkey", smol_tok, 512, 1, chat=False)[0]
    assert smol_tok.decode(plain.prompt_ids()).endswith("What is the pass key? The pass key is")
    assert "<|im_start|>" not in smol_tok.decode(plain.prompt_ids())
    base = make_samples("passkey", gemma_tok, 512, 1)[0]  # Gemma-3-270M base: no chat template, BOS first
    assert base.prompt_ids()[0] == gemma_tok.bos_token_id and base.prompt_ids().count(gemma_tok.bos_token_id) == 1
    assert gemma_tok.decode(base.prompt_ids()).endswith("What is the pass key? The pass key is")
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat(gemma_tok, chat=True)


def test_task_options_aliases_and_errors(smol_tok):
    task = get_task("niah_single:haystack=noise,value=uuids,max_new_tokens=40")
    assert task.params["haystack"] == "noise" and task.params["value"] == "uuids" and task.max_new_tokens == 40
    assert task.label.startswith("niah_single_2-") and task.label != get_task("niah_single").label
    sample = make_samples(task, smol_tok, 600, 1)[0]
    assert re.fullmatch(r"[0-9a-f-]{36}", sample.questions[0].answers[0])
    assert "The grass is green." in smol_tok.decode(sample.context_ids)
    assert get_task("niah_multikey").name == "niah_multikey_1"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("niah_triple")
    with pytest.raises(ValueError, match="unknown option"):
        get_task("passkey:colour=red")
    with pytest.raises(ValueError, match="too short"):
        make_samples("niah_multiquery", smol_tok, 60, 1)


def test_ppl_document_and_haystacks(smol_tok):
    sample = make_samples("ppl:eval_len=64", smol_tok, 500, 1)[0]
    assert len(sample.context_ids) == 500 and sample.info["eval_len"] == 64
    assert len(haystack.essay_sentences()) > 1000 and len(haystack.word_pool()) > 1000
    assert haystack.noise_sentences()[0] == "The grass is green."
    ids, offsets, filler = haystack.assemble([[1, 2], [3, 4], [5, 6]], 5, [(0.5, [9]), (0.0, [8])])
    assert ids == [8, 1, 2, 9, 3, 4, 5] and offsets == [3, 0] and filler == [2, 0]
