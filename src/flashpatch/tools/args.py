"""argparse helpers flashpatch's command lines share: a parser whose usage errors are one line and exit 2,
and argument types that say what they expect."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error prints one line (what was wrong, what is allowed) and exits 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def fail(prog: str, message: str) -> NoReturn:
    """A usage error found after parsing: one line, exit 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _int_at_least(text: str, least: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or a positive integer")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, e.g. 30 or 0.5; got {text!r}")
    return value


def one_of(allowed: Sequence[str] | Callable[[], Sequence[str]], what: str) -> Callable[[str], str]:
    """An argparse type accepting one of `allowed` (or of what the callable returns at parse time)."""

    def check(text: str) -> str:
        choices = allowed() if callable(allowed) else allowed
        value = text.strip().lower()
        for choice in choices:  # any case, surrounding spaces ignored, as everywhere flashpatch takes a name
            if choice.lower() == value:
                return choice
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}; got {text!r}")

    check.__name__ = what
    return check


def names_from(allowed: Callable[[], Sequence[str]], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma list, each item one of `allowed()`."""

    def check(text: str) -> tuple[str, ...]:
        choices = allowed()
        by_lower = {choice.lower(): choice for choice in choices}
        given = [part.strip() for part in text.split(",") if part.strip()]
        names = tuple(by_lower.get(part.lower(), part) for part in given)
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            got = ", ".join(unknown) if unknown else repr(text)
            raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(choices)}; got {got}")
        return names

    check.__name__ = what
    return check
