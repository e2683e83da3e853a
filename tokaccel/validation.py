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
    ok = is_number(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise invalid(owner, name, value, f"expected a number in {interval}")


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise invalid(owner, name, value, "expected a bool")


def check_choice(owner: str, name: str, value, choices: Collection) -> None:
    if value not in choices:
        raise invalid(owner, name, value, f"choose one of {tuple(choices)}")
