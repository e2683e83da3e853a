"""Checks of user-given options: each raises ValueError naming the owner, the option, its value
and what is valid ("tokenselect: k=0 is not valid; expected an integer >= 1").

One family for the whole library (policies, pruners, evals, benches, recycling), so messages read
the same everywhere. `owner` is what the user configured: a policy name, a command, a function.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection


def invalid(owner: str, name: str, value, expected: str) -> ValueError:
    """The ValueError for option `name` of `owner` set to `value`, `expected` saying what is valid."""
    return ValueError(f"{owner}: {name}={value!r} is not valid; {expected}")


def is_int(value) -> bool:
    """An integer that is not a bool (numpy and torch integer scalars count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(owner: str, name: str, value, low: int = 0, high: int | None = None) -> None:
    """An integer in [low, high] (high None: unbounded)."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise invalid(owner, name, value, f"expected an integer {bound}")


def check_optional_int(owner: str, name: str, value, low: int = 0) -> None:
    """None or an integer >= low."""
    if value is not None and (not is_int(value) or value < low):
        raise invalid(owner, name, value, f"expected None or an integer >= {low}")


def check_number(owner: str, name: str, value, low: float, high: float, low_open: bool = False,
                 high_open: bool = False) -> None:
    """A real number in the interval from low to high, each end closed unless `*_open`."""
    if not (is_number(value) and _within(value, low, high, low_open, high_open)):
        raise invalid(owner, name, value, f"expected a number in {_interval(low, high, low_open, high_open)}")


def check_count_or_fraction(owner: str, name: str, value, count: str = "a count", fraction: str = "a fraction",
                            low: int = 1, low_open: bool = True, high_open: bool = False) -> None:
    """A count (an integer >= low) or a fraction (a float in the interval from 0 to 1, each end
    closed unless `*_open`); the type says which, so 1 is one token and 1.0 all of them.
    `count` and `fraction` name them in the message: a budget is "tokens kept per layer" or
    "a fraction of the prompt"."""
    if is_int(value):
        ok = value >= low
    else:
        ok = isinstance(value, float) and _within(value, 0, 1, low_open, high_open)
    if not ok:
        raise invalid(owner, name, value, f"expected {count} (an integer >= {low}) or {fraction} "
                                          f"(a float in {_interval(0, 1, low_open, high_open)})")


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise invalid(owner, name, value, "expected a bool")


def check_choice(owner: str, name: str, value, choices: Collection) -> None:
    if value not in choices:
        raise invalid(owner, name, value, f"choose one of {tuple(choices)}")


def _within(value, low, high, low_open: bool, high_open: bool) -> bool:
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
