"""tokaccel.validation: the one family of option checks (messages, bounds), and a scan of the
library for option checks written by hand or helpers of another family."""

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest

import tokaccel
from tokaccel.validation import (
    check_bool,
    check_choice,
    check_count_or_fraction,
    check_int,
    check_number,
    check_optional_int,
    invalid,
    is_int,
    is_number,
)

PACKAGE = Path(tokaccel.__file__).resolve().parent


def test_message_names_owner_option_value_and_what_is_valid():
    err = invalid("tokenselect", "k", 0, "expected an integer >= 1")
    assert isinstance(err, ValueError)
    assert str(err) == "tokenselect: k=0 is not valid; expected an integer >= 1"
    assert str(invalid("mmr", "importance", "x", "choose one")) == "mmr: importance='x' is not valid; choose one"


def test_bool_is_neither_an_int_nor_a_number():
    assert is_int(3) and is_int(np.int64(3)) and is_int(0)
    assert not any(is_int(v) for v in (True, False, 3.0, "3", None))
    assert is_number(3) and is_number(0.5) and is_number(np.float32(0.5))
    assert not any(is_number(v) for v in (True, False, "0.5", None, 1j))


def test_check_int_bounds():
    check_int("p", "k", 1, 1)
    check_int("p", "k", np.int32(5), 1)
    check_int("p", "n", 0)  # low defaults to 0
    check_int("p", "tree", 80, 0, 80)
    for bad in (0, -1, True, 1.0, "1", None):
        with pytest.raises(ValueError, match=r"^p: k=.* is not valid; expected an integer >= 1$"):
            check_int("p", "k", bad, 1)
    with pytest.raises(ValueError, match=r"tree=81 is not valid; expected an integer in \[0, 80\]$"):
        check_int("p", "tree", 81, 0, 80)
    with pytest.raises(ValueError, match="tree=-1 is not valid"):
        check_int("p", "tree", -1, 0, 80)


def test_check_optional_int():
    check_optional_int("p", "layer", None, 1)
    check_optional_int("p", "layer", 3, 1)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"layer=.* is not valid; expected None or an integer >= 1$"):
            check_optional_int("p", "layer", bad, 1)


@pytest.mark.parametrize("low_open, high_open, interval", [(False, False, "[0, 1]"), (True, False, "(0, 1]"),
                                                           (False, True, "[0, 1)"), (True, True, "(0, 1)")])
def test_check_number_open_and_closed_ends(low_open, high_open, interval):
    check_number("p", "x", 0.5, 0, 1, low_open, high_open)
    check_number("p", "x", 1 if not high_open else 0.999, 0, 1, low_open, high_open)  # ints are numbers
    for value, ok in ((0, not low_open), (0.0, not low_open), (1.0, not high_open)):
        if ok:
            check_number("p", "x", value, 0, 1, low_open, high_open)
        else:
            with pytest.raises(ValueError, match=re.escape(f"x={value!r} is not valid; expected a number in {interval}")):
                check_number("p", "x", value, 0, 1, low_open, high_open)
    for bad in (True, False, -0.1, 1.1, math.nan, "0.5", None):
        with pytest.raises(ValueError, match=re.escape(interval)):
            check_number("p", "x", bad, 0, 1, low_open, high_open)


def test_check_count_or_fraction():
    budget = dict(count="tokens kept per layer", fraction="a fraction of the prompt", high_open=True)
    for ok in (1, 2048, np.int64(7), 0.5, 1e-3):
        check_count_or_fraction("h2o", "budget", ok, **budget)
    for bad in (0, -3, 0.0, 1.0, 1.5, True, False, "64", None, math.nan):
        with pytest.raises(ValueError, match=re.escape(
                f"h2o: budget={bad!r} is not valid; expected tokens kept per layer (an integer >= 1) or a fraction "
                "of the prompt (a float in (0, 1))")):
            check_count_or_fraction("h2o", "budget", bad, **budget)
    check_count_or_fraction("fastv", "keep", 1.0)  # default: a fraction in (0, 1], 1.0 = all
    with pytest.raises(ValueError, match=re.escape("expected a count (an integer >= 1) or a fraction (a float in (0, 1])")):
        check_count_or_fraction("fastv", "keep", 0.0)
    for ok in (0, 0.0, 1.0, 5):  # low=0 with a closed interval: none of it is allowed
        check_count_or_fraction("todre", "late_keep", ok, low=0, low_open=False)
    with pytest.raises(ValueError, match=re.escape("late_keep=-1 is not valid; expected a count (an integer >= 0) or a "
                                                   "fraction (a float in [0, 1])")):
        check_count_or_fraction("todre", "late_keep", -1, low=0, low_open=False)


def test_check_bool_and_choice():
    check_bool("p", "flag", False)
    for bad in (0, 1, "true", None):
        with pytest.raises(ValueError, match=r"flag=.* is not valid; expected a bool$"):
            check_bool("p", "flag", bad)
    check_choice("dense", "backend", "sdpa", ("auto", "sdpa", "flash"))
    with pytest.raises(ValueError, match=re.escape("dense: backend='x' is not valid; choose one of "
                                                   "('auto', 'sdpa', 'flash')")):
        check_choice("dense", "backend", "x", ("auto", "sdpa", "flash"))


def test_policy_messages_come_from_the_family():
    for policy, config, message in [
        ("h2o", dict(budget=0), "h2o: budget=0 is not valid; expected tokens kept per layer"),
        ("h2o", dict(alpha=0), "h2o: alpha=0 is not valid; expected a number in (0, 1]"),
        ("snapkv", dict(kernel=4), "snapkv: kernel=4 is not valid; expected an odd integer"),
        ("streamingllm", dict(budget=4, n_sink=4), "streamingllm: n_sink=4 is not valid; it leaves no window"),
        ("dense", dict(backend="x"), "dense: backend='x' is not valid; choose one of"),
        ("fastv", dict(layer=0), "fastv: layer=0 is not valid; expected an integer >= 1"),
        ("divprune", dict(keep=True), "divprune: keep=True is not valid; expected tokens per image"),
        ("mmr", dict(lam=2), "mmr: lam=2 is not valid; expected a number in [0, 1]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tokaccel.make_policy(policy, **config)


# ------------------------------------------------------------------------------------ source scan
# Module-level functions named like option checks that are something else: name -> why.
NOT_OPTION_CHECKS = {
    ("vision/runtime.py", "_check_bool_mask"): "checks the attention mask HF passes at run time, not a user option",
}
CHECK_NAME = re.compile(r"_?check_\w*")
HAND_WRITTEN = [  # is-an-int-but-not-a-bool tests written out instead of validation.is_int / check_*
    re.compile(r"isinstance\(\s*(?P<x>[\w.\[\]'\"]+)\s*,\s*bool\s*\)\s*or\s+not\s+isinstance\(\s*(?P=x)\s*,"),
    re.compile(r"not\s+isinstance\(\s*(?P<x>[\w.\[\]'\"]+)\s*,\s*bool\s*\)\s*and\b"),
]


def _library_files() -> list[Path]:
    """tokaccel's modules but validation.py itself and the kernels (tensor checks, not options)."""
    kernels = (PACKAGE / "kernels").resolve()
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.name != "validation.py" or p.parent != PACKAGE
            if kernels not in p.resolve().parents and "kernels" not in p.relative_to(PACKAGE).parts]


def _option_check_findings() -> list[str]:
    found = []
    for path in _library_files():
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text(encoding="utf-8")
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and CHECK_NAME.fullmatch(node.name) \
                    and (rel, node.name) not in NOT_OPTION_CHECKS:
                found.append((rel, node.lineno, f"defines {node.name}(); use tokaccel.validation"))
        for pattern in HAND_WRITTEN:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append((rel, line, f"hand-written check {match.group(0)!r}; use tokaccel.validation"))
    return [f"tokaccel/{rel}:{line}: {what}" for rel, line, what in sorted(found)]


def test_scan_finds_what_it_looks_for():
    for source in ("if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 1:",
                   "if isinstance(self.k, bool) or not isinstance(self.k, int):",
                   "ok = not isinstance(value, bool) and (\n",
                   "ok = isinstance(b, int) and not isinstance(b, bool) and b >= 1"):
        assert any(p.search(source) for p in HAND_WRITTEN), source
    assert not any(p.search("if not isinstance(mask, torch.Tensor) and mask is not None:") for p in HAND_WRITTEN)
    assert CHECK_NAME.fullmatch("_check_budget") and CHECK_NAME.fullmatch("check_keep")
    assert not CHECK_NAME.fullmatch("_check") and not CHECK_NAME.fullmatch("checkpoint")
    files = {p.relative_to(PACKAGE).as_posix() for p in _library_files()}
    assert "policies/h2o.py" in files and "vision/base.py" in files
    assert "validation.py" not in files and not any(f.startswith("kernels/") for f in files)


def test_no_option_checks_outside_tokaccel_validation():
    found = _option_check_findings()
    assert not found, "option checks outside tokaccel.validation:\n" + "\n".join(found)
