"""Every scorer on hand-computed cases."""

import pytest

from tokaccel.evals import metrics as m


def test_ruler_string_match():
    assert m.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert m.string_match_all("  ABC\x00def ", ["abc", "DEF"]) == 1.0  # case-insensitive, control chars cleaned
    assert m.string_match_part("The numbers are 123 and 456.", ["999", "456"]) == 1.0
    assert m.string_match_part("nothing here", ["999", "456"]) == 0.0
    assert m.string_match_all("", []) == 0.0


def test_passkey_first_integer():
    assert m.first_int_match(" 71432. Remember it.", ["71432"]) == 1.0
    assert m.first_int_match("The key is 7143 2", ["71432"]) == 0.0
    assert m.first_int_match("no digits", ["71432"]) == 0.0
    assert m.first_int("abc 12x34") == "12"


def test_qa_f1_and_normalization():
    assert m.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    # pred tokens cat sat on mat, truth cat sat: P = 2/4, R = 1 -> F1 = 2/3; "mat" alone gives 0.4
    assert m.qa_f1("the cat sat on the mat", ["a cat sat", "mat"]) == pytest.approx(2 / 3)
    assert m.qa_f1("dog", ["cat"]) == 0.0
    assert m.token_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)


def test_rouge_l_as_longbench_computes_it():
    # one sentence each: word sets of 5 and 5, LCS {the, cat, on, mat} -> P = R = 4/5
    assert m.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary level: the union of per-sentence LCSs covers all 4 words (a flat LCS would give 0.75)
    assert m.rouge_l("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-6)
    assert m.rouge_l("", "a reference") == 0.0
    assert m.rouge("x y z", ["a b", "x y"]) == pytest.approx(m.rouge_l("x y z", "x y"))


def test_longbench_classification_retrieval_count():
    classes = ["City", "Individual", "Distance", "Date"]
    assert m.classification("City", ["City"], all_classes=classes) == 1.0
    assert m.classification("City or Date", ["City"], all_classes=classes) == 0.5
    assert m.classification("Individual", ["City"], all_classes=classes) == 0.0
    # a class that is a substring of the answer is dropped
    assert m.classification("Other Location", ["Other Location"], all_classes=["Location", "Other Location"]) == 1.0
    assert m.retrieval("Paragraph 3", ["Paragraph 3"]) == 1.0
    assert m.retrieval("Paragraph 3 or Paragraph 12", ["Paragraph 3"]) == 0.5
    assert m.retrieval_zh("段落5", ["段落5"]) == 1.0
    assert m.count("There are 7 unique paragraphs, not 8", [7]) == 0.5
    assert m.count("seven", ["7"]) == 0.0


def test_code_sim_edit_similarity():
    assert m.fuzz_ratio("kitten", "sitting") == 62  # 2*LCS(4)/13, as fuzz.ratio
    assert m.fuzz_ratio("", "") == 100
    assert m.code_sim("```python\n    return a * b\n", ["    return a * b"]) == 1.0  # fence line skipped
    assert m.code_sim("return a*b", ["    return a * b"]) == 0.77  # LCS 10 of 10+16 chars
    assert m.code_sim("# comment\nx = 1", ["x = 1"]) == 1.0


def test_infinitebench_scorers():
    assert m.ib_kv_retrieval('"e5f6-a7b8".', ["e5f6-a7b8"]) == 1.0
    assert m.ib_kv_retrieval("e5f6", ["e5f6-a7b8"]) == 0.0
    labels = ["On the hill behind the mill", "B"]
    assert m.ib_choice("B", labels) == 1.0
    assert m.ib_choice(" The answer is: B.", labels) == 1.0
    assert m.ib_choice("I think C", labels) == 0.0
    assert m.ib_choice("", labels) == 0.0
    assert m.ib_dialogue("JOHN: hello", ["John"]) == 1.0
    assert m.ib_dialogue("Mary", ["JOHN"]) == 0.0
    assert m.ib_math_find("The answer is 42.", [42]) == 1.0
    assert m.ib_math_find("3.5 is it", ["3.5"]) == 1.0
    assert m.ib_math_find("none", [1]) == 0.0
    assert m.ib_code_run("The value is 17.", [17]) == 1.0
    assert m.ib_code_run("17 or 18", [17]) == 0.0
    assert m.ib_code_debug("B. func_b", ["func_b", "B"]) == 1.0
    assert m.ib_code_debug("The correct option is: func_b", ["func_b", "B"]) == 1.0
    assert m.ib_code_debug("func_c", ["func_b", "B"]) == 0.0
    assert m.ib_qa_f1_zh("北京", ["北京市"]) == pytest.approx(0.8)


def test_score_dispatch():
    assert m.score("classification", "City\nIndividual", ["City"], first_line=True, all_classes=["City", "Individual"]) == 1.0
    assert m.score("classification", "City\nIndividual", ["City"], all_classes=["City", "Individual"]) == 0.5
    assert set(m.METRICS) >= {"string_match_all", "string_match_part", "first_int_match", "qa_f1", "rouge", "code_sim"}
    with pytest.raises(ValueError, match="unknown metric"):
        m.score("bleu", "a", ["a"])
