"""LongBench / InfiniteBench loaders on small fixture files in their public JSONL formats."""

import pytest

from tokaccel.evals import loaders
from tokaccel.evals.tasks import get_task, make_samples


def test_longbench_samples(smol_tok, fixtures):
    dirs = {"longbench": fixtures / "longbench"}
    task = get_task("longbench:hotpotqa")
    assert (task.metric, task.max_new_tokens) == ("qa_f1", 32)
    long, short = make_samples(task, smol_tok, 300, 5, data_dirs=dirs)  # the file has 2 records
    assert len(long.prompt_ids()) == 300  # truncated in the middle to exactly the target length
    assert long.info["context_tokens"] > 300 and long.info["id"] == "hp-0001"
    text = smol_tok.decode(long.prompt_ids())
    assert "Passage 1:" in text and "Passage 39:" in text and "Passage 20:" not in text  # middle dropped
    assert text.endswith("Question: In which town does the river Alder flow?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert len(short.prompt_ids()) < 300 and short.questions[0].answers == ["the river Alder", "Alder"]


def test_longbench_fewshot_datasets_stay_plain(smol_tok, fixtures):
    dirs = {"longbench": fixtures / "longbench"}
    trec = make_samples("longbench:trec", smol_tok, 400, 1, data_dirs=dirs)[0]
    text = smol_tok.decode(trec.prompt_ids())
    assert "<|im_start|>" not in text and text.endswith("Type:")
    assert trec.metric == "classification" and trec.metric_args == {"all_classes": ["City", "Individual", "Distance", "Date"], "first_line": True}
    lcc = make_samples("longbench:lcc", smol_tok, 400, 1, data_dirs=dirs)[0]
    assert lcc.metric == "code_sim" and smol_tok.decode(lcc.prompt_ids()).endswith("Next line of code:\n")


def test_infbench_samples(smol_tok, gemma_tok, fixtures):
    dirs = {"infbench": fixtures / "infbench"}
    first, second = make_samples("infbench:passkey", gemma_tok, 256, None, data_dirs=dirs)
    assert len(first.prompt_ids()) == 256 and first.questions[0].answers == ["71432"]
    assert second.questions[0].answers == ["90210"]  # a str answer becomes a list
    text = gemma_tok.decode(first.prompt_ids())
    assert text.startswith("<bos>There is an important info") and text.endswith("What is the pass key?\n\nThe pass key is")
    choice = make_samples("infbench:longbook_choice_eng", smol_tok, 500, 1, data_dirs=dirs)[0]
    assert choice.questions[0].answers == ["On the hill behind the mill", "B"]
    assert "B. On the hill behind the mill" in smol_tok.decode(choice.questions[0].ids)
    kv = make_samples("infbench:kv_retrieval", smol_tok, 500, 1, data_dirs=dirs)[0]
    assert kv.metric == "ib_kv_retrieval" and kv.max_new_tokens == 50


def test_truncate_middle():
    assert loaders.truncate_middle(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert loaders.truncate_middle([1, 2], 5) == [1, 2]


def test_malformed_files_name_file_and_line(fixtures):
    bad = fixtures / "bad"
    with pytest.raises(ValueError, match=r"bad[/\\]passkey\.jsonl:3: malformed JSON"):
        loaders.load_infbench(bad, "passkey")
    with pytest.raises(ValueError, match=r"bad[/\\]hotpotqa\.jsonl:2: missing field\(s\) \['context'\]"):
        loaders.load_longbench(bad, "hotpotqa")


def test_folder_and_name_errors(smol_tok, fixtures, monkeypatch):
    monkeypatch.delenv("TOKACCEL_LONGBENCH_DIR", raising=False)
    with pytest.raises(ValueError, match="--longbench-dir"):
        make_samples("longbench:hotpotqa", smol_tok, 300, 1)
    with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
        make_samples("longbench:qasper", smol_tok, 300, 1, data_dirs={"longbench": fixtures / "longbench"})
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        get_task("longbench:nosuchset")
    with pytest.raises(ValueError, match="jieba"):
        get_task("longbench:dureader")
    with pytest.raises(ValueError, match="math_calc is not"):
        get_task("infbench:math_calc")
    monkeypatch.setenv("TOKACCEL_INFBENCH_DIR", str(fixtures / "infbench"))
    assert len(make_samples("infbench:passkey", smol_tok, 256, 1)) == 1
    assert get_task("longbench:hotpotqa_e").metric == "qa_f1"  # LongBench-E files use the base settings
