"""Which backend computes a given problem: the user's choice, or `auto`'s, with the reason why."""

from __future__ import annotations

import dataclasses

from flashpatch import backends
from flashpatch.backends.base import Problem

#: On CPU the einsum is faster than the blockwise path while the logits are small; the blockwise
#: path wins on memory (and, past this size, on time too). Measured on this project's CI machine
#: (2 cores): see docs/cpu-selection.md.
CPU_MIN_PAIRS_FOR_XLA = 512 * 512


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    fallback: bool = False  # the asked-for backend could not run this problem


def _auto(problem: Problem) -> Choice:
    pairs = problem.q_len * problem.kv_len
    if problem.platform == "cpu" and pairs < CPU_MIN_PAIRS_FOR_XLA:
        return Choice("reference", f"auto: on CPU the einsum is faster below {CPU_MIN_PAIRS_FOR_XLA} T*S pairs")
    return Choice("xla", "auto: blockwise flash attention in JAX")


def choose(asked: str, problem: Problem) -> Choice:
    """Resolve `asked` ('auto' or a backend name) for `problem`, falling back where it cannot run."""
    choice = _auto(problem) if asked == "auto" else Choice(asked, "asked for")
    reason = backends.get(choice.backend).unsupported(problem)
    if reason is None:
        return choice
    return Choice("reference", f"{choice.backend} cannot run this call ({reason}); the original einsum runs", True)
