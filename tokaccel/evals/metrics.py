"""Scoring functions, written from the benchmarks' published definitions (no downloads).

Every scorer takes `(prediction, answers, **info)` and returns a float in [0, 1]; `score(name,
...)` looks one up in `METRICS`. Benchmarks report the mean over samples times 100.

- RULER: `string_match_all` (fraction of the answers found in the prediction, case-insensitive)
  and `string_match_part` (1 if any answer is found).
- Passkey / InfiniteBench retrieval: `first_int_match` (the first integer in the prediction
  equals the answer).
- LongBench (THUDM/LongBench metrics.py): `qa_f1`, `rouge` (the `rouge` package's ROUGE-L F, as
  LongBench calls it), `classification`, `retrieval`, `retrieval_zh`, `count`, `code_sim`
  (fuzzywuzzy's ratio, computed here as Levenshtein-indel similarity); the answer list is scored
  by its best element.
- InfiniteBench (OpenBMB/InfiniteBench compute_scores.py): `ib_kv_retrieval`, `ib_choice`,
  `ib_dialogue`, `ib_math_find`, `ib_code_run`, `ib_code_debug`, `ib_qa_f1`, `ib_qa_f1_zh`;
  `longbook_sum_eng` uses `rouge` here (InfiniteBench uses `evaluate`'s rougeLsum).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable

# ---------------------------------------------------------------- RULER / passkey


def clean_prediction(prediction: str) -> str:
    """RULER's post-processing: control characters become newlines, outer whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str], **_) -> float:
    """RULER: fraction of the reference strings contained in the prediction (case-insensitive)."""
    if not answers:
        return 0.0
    pred = clean_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str], **_) -> float:
    """RULER: 1 if any reference string is contained in the prediction (case-insensitive)."""
    pred = clean_prediction(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


def first_int(prediction: str) -> str:
    """The first run of digits in the text ("" when none), as InfiniteBench reads it."""
    for item in re.split(r"[^0-9]", prediction):
        if item:
            return item
    return ""


def first_int_match(prediction: str, answers: list[str], **_) -> float:
    """Passkey / number_string: the first integer of the prediction equals an answer."""
    return float(first_int(prediction) in [str(a) for a in answers])


# ---------------------------------------------------------------- LongBench


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_zh_answer(s: str) -> str:
    """Lower case, drop ASCII and CJK punctuation and all whitespace."""
    drop = set(string.punctuation + _ZH_PUNCT)
    return "".join(ch for ch in s.lower() if ch not in drop and not ch.isspace())


def token_f1(prediction_tokens: list[str], ground_truth_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _best(fn: Callable[[str, str], float], prediction: str, answers: list[str]) -> float:
    return max((fn(prediction, a) for a in answers), default=0.0)


def qa_f1(prediction: str, answers: list[str], **_) -> float:
    """Token F1 of the normalized prediction against the best answer."""
    return _best(lambda p, a: token_f1(normalize_answer(p).split(), normalize_answer(a).split()), prediction, answers)


def _lcs_table(x: list, y: list) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, len(y) + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    return table


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of x and y, reconstructed with the `rouge` package's tie rule."""
    table = _lcs_table(x, y)
    i, j, out = len(x), len(y), []
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as computed by the `rouge` package (1.0.1) that LongBench calls: sentences split at
    ".", summary-level union LCS, word sets (its default `exclusive=True`). 0 for empty input."""
    hyp = [" ".join(s.split()) for s in prediction.split(".") if len(s) > 0]
    ref = [" ".join(s.split()) for s in reference.split(".") if len(s) > 0]
    if not hyp or not ref:
        return 0.0
    hyp_words = [w for s in hyp for w in s.split(" ")]
    ref_words = [w for s in ref for w in s.split(" ")]
    m, n = len(set(ref_words)), len(set(hyp_words))
    union: set[str] = set()
    hits = 0
    for ref_sentence in ref:
        before = len(union)
        for hyp_sentence in hyp:
            union |= set(_lcs_words(ref_sentence.split(" "), hyp_sentence.split(" ")))
        hits += len(union) - before
    recall, precision = hits / m, hits / n
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge(prediction: str, answers: list[str], **_) -> float:
    return _best(rouge_l, prediction, answers)


def classification(prediction: str, answers: list[str], all_classes: list[str] | None = None, **_) -> float:
    """LongBench classification (trec, lsht): the classes named in the prediction, where a class
    that is a substring of the answer (but not the answer) is discarded; 1/len if the answer is
    among them. Mirrors the reference loop, including its in-place removal while iterating."""
    classes = all_classes or []

    def one(pred: str, truth: str) -> float:
        matches = [c for c in classes if c in pred]
        for term in matches:  # noqa: B020 - reproduces the reference implementation's behaviour
            if term in truth and term != truth:
                matches.remove(term)
        return 1.0 / len(matches) if truth in matches else 0.0

    return _best(one, prediction, answers)


def _id_share(prediction: str, truth_id: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == truth_id for n in numbers) / len(numbers)


def retrieval(prediction: str, answers: list[str], **_) -> float:
    """LongBench passage_retrieval_en: share of the numbers in the prediction that equal the
    answer's "Paragraph N" id."""

    def one(pred: str, truth: str) -> float:
        found = re.findall(r"Paragraph (\d+)", truth)
        return _id_share(pred, found[0]) if found else 0.0

    return _best(one, prediction, answers)


def retrieval_zh(prediction: str, answers: list[str], **_) -> float:
    def one(pred: str, truth: str) -> float:
        found = re.findall(r"段落(\d+)", truth)
        return _id_share(pred, found[0]) if found else 0.0

    return _best(one, prediction, answers)


def count(prediction: str, answers: list[str], **_) -> float:
    """LongBench passage_count: share of the numbers in the prediction equal to the answer."""
    return _best(lambda p, a: _id_share(p, str(a)), prediction, answers)


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy/rapidfuzz `fuzz.ratio`: round(100 * 2*LCS(chars) / (len(a)+len(b)))."""
    if not a and not b:
        return 100
    lcs = _lcs_table(list(a), list(b))[-1][-1]
    return int(round(100 * 2 * lcs / (len(a) + len(b))))


def code_sim(prediction: str, answers: list[str], **_) -> float:
    """LongBench lcc / repobench-p: edit similarity of the first prediction line that is not a
    comment or code fence."""

    def one(pred: str, truth: str) -> float:
        line = next((ln for ln in pred.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln), "")
        return fuzz_ratio(line, truth) / 100

    return _best(one, prediction, answers)


# ---------------------------------------------------------------- InfiniteBench


def _words(prediction: str, chars: str = "\n:\"'.,?!{}") -> list[str]:
    for c in chars:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def ib_kv_retrieval(prediction: str, answers: list[str], **_) -> float:
    words = _words(prediction)
    return float(any(a in words for a in answers))


def ib_dialogue(prediction: str, answers: list[str], **_) -> float:
    """longdialogue_qa_eng: the (upper-case) name is one of the prediction's words."""
    words = [w.upper() for w in _words(prediction)]
    return float(bool(answers) and answers[0].upper() in words)


def ib_choice(prediction: str, answers: list[str], **_) -> float:
    """longbook_choice_eng: answers = [option text, letter]."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in answers)
    for c in "\n\"'.,?!{}":
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1 :]
        return float(any(after.startswith(s) for s in answers))
    for word in pred.split():
        if word in "ABCD":  # a substring test in the reference implementation
            return float(word in answers)
    return 0.0


def ib_code_debug(prediction: str, answers: list[str], **_) -> float:
    """code_debug: answers = [function name, letter]."""
    if len(answers) < 2:
        return 0.0
    fn_name, letter = answers[0], answers[1]
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = prediction.strip()
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "is:", "answer:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1 :]
        return float(after.startswith(letter) or after.startswith(fn_name))
    return 0.0


def ib_math_find(prediction: str, answers: list, **_) -> float:
    """math_find: the first number of the prediction equals the (int or float) answer."""
    if not answers:
        return 0.0
    label = answers[0]
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    text = found.group(0)
    try:
        if isinstance(label, int) or (isinstance(label, str) and re.fullmatch(r"-?\d+", label.strip())):
            return float(int(float(text)) == int(label))
        return float(float(text) == float(label))
    except ValueError:
        return 0.0


def ib_code_run(prediction: str, answers: list, **_) -> float:
    """code_run: the last word of the prediction is the integer answer."""
    words = _words(prediction.strip(), "\n.`'\":")
    if not words or not answers:
        return 0.0
    try:
        return float(int(words[-1]) == int(answers[0]))
    except ValueError:
        return 0.0


def ib_qa_f1_zh(prediction: str, answers: list[str], **_) -> float:
    """longbook_qa_chn: character-level F1 after Chinese normalization (InfiniteBench)."""
    return _best(lambda p, a: token_f1(list(normalize_zh_answer(p)), list(normalize_zh_answer(a))), prediction, answers)


METRICS: dict[str, Callable[..., float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "first_int_match": first_int_match,
    "qa_f1": qa_f1,
    "rouge": rouge,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
    "ib_kv_retrieval": ib_kv_retrieval,
    "ib_choice": ib_choice,
    "ib_dialogue": ib_dialogue,
    "ib_math_find": ib_math_find,
    "ib_code_run": ib_code_run,
    "ib_code_debug": ib_code_debug,
    "ib_qa_f1": qa_f1,
    "ib_qa_f1_zh": ib_qa_f1_zh,
}


def score(metric: str, prediction: str, answers: list, first_line: bool = False, **info) -> float:
    """Score one prediction with the named metric. `first_line`: keep only the first line of the
    prediction (LongBench does so for trec, triviaqa, samsum and lsht)."""
    fn = METRICS.get(metric)
    if fn is None:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(sorted(METRICS))}")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return float(fn(prediction, list(answers), **info))
