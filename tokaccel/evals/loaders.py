"""Loaders for local copies of LongBench and InfiniteBench (their public JSONL formats).

Nothing is downloaded: the user points to a folder, and task `longbench:<dataset>` reads
`<folder>/<dataset>.jsonl`, `infbench:<task>` reads `<folder>/<task>.jsonl`.

- LongBench (THUDM/LongBench, data/*.jsonl): fields `input`, `context`, `answers`, `length`,
  `dataset`, `language`, `all_classes`, `_id`. Prompts, generation lengths and metrics are the
  official ones (config/dataset2prompt.json, dataset2maxlen.json, metrics.py); the few-shot
  datasets (trec, triviaqa, samsum, lsht, lcc, repobench-p) stay plain text on chat models, as
  in LongBench's pred.py. `<name>_e` files (LongBench-E) use the base dataset's settings.
- InfiniteBench (xinrongzhang2022/InfiniteBench, *.jsonl): fields `id`, `context`, `input`,
  `answer` (list or str), `options`. Prompts are the repo's completion-style (yarn-mistral)
  templates, whose answer prefix starts the assistant turn on chat models.

Contexts longer than the target length are truncated in the middle at token level, as both
benchmarks do, so the prompt is exactly the target length; shorter ones are kept whole.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .samples import PromptFormat, Question, Sample, Task

# ---------------------------------------------------------------- LongBench

LONGBENCH_PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
LONGBENCH_MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
LONGBENCH_METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1",
    "musique": "qa_f1", "triviaqa": "qa_f1", "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge",
    "samsum": "rouge", "trec": "classification", "lsht": "classification", "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh", "passage_count": "count", "lcc": "code_sim", "repobench-p": "code_sim",
}
LONGBENCH_PLAIN = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}  # no chat template (pred.py)
LONGBENCH_FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}  # scored on the first line (eval.py)
LONGBENCH_NEEDS_JIEBA = {"multifieldqa_zh", "dureader", "vcsum"}
LONGBENCH_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")

# ---------------------------------------------------------------- InfiniteBench

# name -> (before context, after context, answer prefix, separator before it, metric, max new tokens)
INFBENCH = {
    "passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n\n",
                "\n\n{input}", "The pass key is", "\n\n", "first_int_match", 6),
    "number_string": ("There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n",
                      "\n\n{input}", "The sequence of digits is", "\n\n", "first_int_match", 12),
    "kv_retrieval": ("Extract the value corresponding to the specified key in the JSON object below.\n\n", "\n\n{input}", "", "", "ib_kv_retrieval", 50),
    "longbook_sum_eng": ("Summarize the book below.\n\n", "", "Summary:", "\n\n", "rouge", 1200),
    "longbook_choice_eng": ("Read the book and answer the question.\n\n",
                            "\n\nQuestion: {input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}", "The letter of the correct answer is", "\n\n", "ib_choice", 40),
    "longbook_qa_eng": ("Read the book and answer the question. Be very concise in your answer.\n\n", "\n\nQuestion: {input}", "Answer:", "\n", "ib_qa_f1", 40),
    "longbook_qa_chn": ("阅读以下书籍然后回答问题。\n\n", "\n\n问题：{input}", "答案：", "\n", "ib_qa_f1_zh", 40),
    "longdialogue_qa_eng": ("Below is a dialogue script where one random occurrence of a character name is replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n",
                            "", "The name that has been replaced with $$MASK$$ is likely", "\n\n", "ib_dialogue", 40),
    "math_find": ("{prompt}\n\n", "\n\n{input}", "", "", "ib_math_find", 3),
    "code_run": ("There is a function called {func} in the following Python code.\n\n", "\n\nPlease compute the exact value of {input}.",
                 "The value of {input} is", " ", "ib_code_run", 5),
    "code_debug": ("Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n\n",
                   "\n\nOptions:\nA. {A}\nB. {B}\nC. {C}\nD. {D}", "The correct option is:", "\n\n", "ib_code_debug", 5),
}
INFBENCH_FIELDS = ("id", "context", "input", "answer")
DATA_DIR_ENV = {"longbench": "TOKACCEL_LONGBENCH_DIR", "infbench": "TOKACCEL_INFBENCH_DIR"}


def _base(dataset: str) -> str:
    return dataset[:-2] if dataset.endswith("_e") else dataset


def dataset_task(benchmark: str, dataset: str) -> Task:
    """The Task for `longbench:<dataset>` or `infbench:<task>` (ValueError for unsupported ones)."""
    if benchmark == "longbench":
        base = _base(dataset)
        if base in LONGBENCH_NEEDS_JIEBA:
            raise ValueError(f"longbench:{dataset} is scored with jieba word segmentation, which tokaccel does not ship")
        if base not in LONGBENCH_PROMPTS:
            raise ValueError(f"unknown LongBench dataset {dataset!r}; supported: {', '.join(sorted(LONGBENCH_PROMPTS))} (and their _e variants)")
        return Task(f"longbench:{dataset}", "longbench", LONGBENCH_METRICS[base], LONGBENCH_MAX_NEW_TOKENS[base],
                    f"LongBench {dataset}", {"dataset": dataset})
    if benchmark == "infbench":
        if dataset not in INFBENCH:
            raise ValueError(f"unknown InfiniteBench task {dataset!r}; supported: {', '.join(sorted(INFBENCH))} (math_calc is not)")
        entry = INFBENCH[dataset]
        return Task(f"infbench:{dataset}", "infbench", entry[4], entry[5], f"InfiniteBench {dataset}", {"dataset": dataset})
    raise ValueError(f"unknown benchmark {benchmark!r}; valid: longbench, infbench")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file; a malformed line raises ValueError naming the file and line."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {missing}")
            if "context" in record and not isinstance(record["context"], str):
                raise ValueError(f"{path}:{number}: field 'context' must be a string")
            records.append(record)
    return records


def data_file(benchmark: str, dataset: str, data_dirs: dict | None) -> Path:
    folder = (data_dirs or {}).get(benchmark) or os.environ.get(DATA_DIR_ENV[benchmark])
    if not folder:
        raise ValueError(f"task {benchmark}:{dataset} needs the folder holding its JSONL files: pass "
                         f"--{benchmark}-dir DIR (Python: data_dirs={{'{benchmark}': DIR}}) or set {DATA_DIR_ENV[benchmark]}")
    path = Path(folder) / f"{dataset}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (task {benchmark}:{dataset})")
    return path


def load_longbench(folder: str | Path, dataset: str) -> list[dict]:
    """LongBench records of `<folder>/<dataset>.jsonl`, validated."""
    path = Path(folder) / f"{dataset}.jsonl"
    records = read_jsonl(path, ("input", "context", "answers"))
    for number, r in enumerate(records, 1):
        if not isinstance(r["answers"], list):
            raise ValueError(f"{path}: record {number}: field 'answers' must be a list")
    return records


def load_infbench(folder: str | Path, task: str) -> list[dict]:
    """InfiniteBench records of `<folder>/<task>.jsonl`, validated; `answer` becomes a list."""
    path = Path(folder) / f"{task}.jsonl"
    records = read_jsonl(path, ("context", "input", "answer"))
    for number, r in enumerate(records, 1):
        if isinstance(r["answer"], (str, int, float)):
            r["answer"] = [r["answer"]]
        if not isinstance(r["answer"], list):
            raise ValueError(f"{path}: record {number}: field 'answer' must be a list or a string")
        if task in ("longbook_choice_eng", "code_debug") and len(r.get("options") or []) != 4:
            raise ValueError(f"{path}: record {number}: {task} needs 4 'options'")
    return records


def _choice_labels(answer: list, options: list[str]) -> list[str]:
    """[option text, letter] from an answer given as the option text or as the letter."""
    first = str(answer[0])
    if first in options:
        return [first, "ABCD"[options.index(first)]]
    if first in ("A", "B", "C", "D"):
        return [options["ABCD".index(first)], first]
    return [first]


def _fill(template: str, values: dict) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def longbench_prompt(record: dict, dataset: str) -> tuple[str, str, dict]:
    """(text before the context, text after it, scorer arguments) of one LongBench record."""
    base = _base(dataset)
    pre, post = LONGBENCH_PROMPTS[base].split("{context}")
    args = {"all_classes": record.get("all_classes") or []}
    if base in LONGBENCH_FIRST_LINE:
        args["first_line"] = True
    return _fill(pre, {"input": record["input"]}), _fill(post, {"input": record["input"]}), args


def infbench_prompt(record: dict, task: str) -> tuple[str, str, str, str, list]:
    """(before context, after context, answer prefix, separator, answers) of one InfiniteBench record."""
    pre, post, answer_prefix, sep, _, _ = INFBENCH[task]
    values = {"input": record["input"]}
    options = record.get("options") or []
    values.update(zip("ABCD", options))
    answers = record["answer"]
    if task == "math_find":
        found = re.findall(r"The \w+ number", record["input"])
        values["prompt"] = f"What is {found[0].lower()} in the following list?" if found else "Find the number in the following list."
    if task == "code_run":
        values["func"] = record["input"].split("(")[0].strip()
    if task in ("longbook_choice_eng", "code_debug"):
        answers = _choice_labels(answers, options)
    return _fill(pre, values), _fill(post, values), _fill(answer_prefix, values), sep, answers


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the first budget//2 and the last budget - budget//2 tokens (LongBench / InfiniteBench)."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def dataset_samples(task: Task, tokenizer, length: int, n: int | None, chat: bool | None = None,
                    data_dirs: dict | None = None) -> list[Sample]:
    """The first `n` records of a dataset task as Samples of at most `length` tokens."""
    benchmark, dataset = task.kind, task.params["dataset"]
    path = data_file(benchmark, dataset, data_dirs)
    records = (load_longbench if benchmark == "longbench" else load_infbench)(path.parent, dataset)
    if n is not None:
        records = records[:n]
    fmt = PromptFormat(tokenizer, chat)
    samples = []
    for index, record in enumerate(records):
        if benchmark == "longbench":
            pre, post, args = longbench_prompt(record, dataset)
            head, tail = fmt.head_tail(pre, post, chat=False if _base(dataset) in LONGBENCH_PLAIN else None)
            answers = record["answers"]
        else:
            pre, post, answer_prefix, sep, answers = infbench_prompt(record, dataset)
            head, tail = fmt.head_tail(pre, post, answer_prefix, sep=sep)
            args = {}
        budget = length - len(head) - len(tail)
        if budget <= 0:
            raise ValueError(f"{path}: record {index + 1}: length {length} leaves no room for the context "
                             f"({len(head) + len(tail)} prompt tokens without it)")
        context = fmt.encode(record["context"])
        info = {"id": record.get("_id", record.get("id", index)), "context_tokens": len(context)}
        ids = truncate_middle(context, budget)
        samples.append(Sample(task.name, index, head + ids, [Question(tail, answers)], task.metric, task.max_new_tokens,
                              info=info, metric_args=args))
    return samples
