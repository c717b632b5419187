"""The support matrix: what `auto` runs for openpi's training calls on each GPU generation openpi's users train on,
under openpi's pins and under the current JAX, and what that rests on.

Each cell is computed, not written by hand: `auto` is asked (`selection.choose`) under `machine.simulated` for that
GPU, cuDNN and package versions, so the gates of every backend decide as they would on that machine (the compile
guard does not run for a simulated GPU: what it would catch is named in the evidence). docs/user-guide.md holds
the table this prints (`python -m flashpatch.tools.support`), and a test keeps the two equal; doctor prints the
user's own row.
"""

from __future__ import annotations

import dataclasses
import sys

from flashpatch import backends
from flashpatch.backends import machine
from flashpatch.backends.base import Problem
from flashpatch.core import selection
from flashpatch.tools import openpi_shapes


@dataclasses.dataclass(frozen=True)
class Stack:
    """A software stack a user trains on: package versions, the cuDNN JAX loads, and in words."""

    name: str
    versions: dict[str, str | None]
    cudnn: int
    label: str


_NO_EXTRAS = {"dew-flash-attn-cu12": None, "dew-flash-attn-cu13": None, "flash-attn-jax": None, "kvax": None}
STACKS = (
    Stack(
        "openpi",
        {**_NO_EXTRAS, "jax": "0.5.3", "jaxlib": "0.5.3", "jax-cuda12-plugin": "0.5.3", "flash-attn-jax": "0.6.2"},
        90501,  # openpi's lock: cuDNN 9.5.1
        "openpi's pins: jax 0.5.3, CUDA 12, cuDNN 9.5.1, `flashpatch[flash-attn-jax]`",
    ),
    Stack(
        "current",
        {
            **_NO_EXTRAS,
            "jax": "0.12.0",
            "jaxlib": "0.12.0",
            "jax-cuda12-plugin": "0.12.0",
            "dew-flash-attn-cu12": "0.3.6",
        },
        91002,  # jax-cuda12-plugin 0.12's floor: nvidia-cudnn-cu12 >= 9.10.2
        "current JAX: 0.12, CUDA 12, cuDNN 9.10 (the plugin's floor), `flashpatch[flash]`",
    ),
)
#: One GPU per row: the generations and shared-memory budgets of openpi's users (machine.KNOWN has more names).
ROWS = (
    ("sm80", ("A100",)),
    ("sm86", ("A6000", "RTX 3090")),
    ("sm89", ("RTX 4090", "L40S")),
    ("sm90", ("H100", "H200")),
    ("sm100", ("B200",)),
    ("sm120", ("RTX 5090", "RTX PRO 6000")),
)
#: Where a GPU ran flashpatch's backends in openpi's training steps (benchmarks/results/h200-*).
MEASURED_ON = {(9, 0): "measured: H200, jax 0.11.2"}
CI_COMPILED = "CI compile check"
LIBRARY_ONLY = "library's own checks"


def training_calls(platform: str = "gpu") -> dict[str, Problem]:
    """openpi's training attention calls at its default batch: pi0 (pi0.5's differ little) and pi0-FAST."""
    calls = {}
    for model in ("pi0", "pi0_fast"):
        [call] = openpi_shapes.model_calls(
            openpi_shapes.MODELS[model], openpi_shapes.OPENPI_BATCH, 1, "bfloat16", platform, kinds=("train",)
        )
        calls[model] = call.problem
    return calls


def evidence(backend: str, gpu: machine.Gpu) -> str:
    """What a cell's path rests on: a measurement on a GPU, the CI compile check, or the library's own checks."""
    if backend == backends.REFERENCE:
        return "openpi's own attention"
    found = [MEASURED_ON[gpu.capability]] if gpu.capability in MEASURED_ON else []
    if backend == "pallas":
        found.append(CI_COMPILED)
    if not found:
        found.append(LIBRARY_ONLY)
    return "; ".join(found)


def cell(gpu: machine.Gpu | str, stack: Stack, problem: Problem) -> tuple[str, str]:
    """(backend auto takes, what that rests on) for `problem` on `gpu` under `stack`."""
    with machine.simulated(gpu, cudnn=stack.cudnn, versions_=stack.versions) as found:
        choice = selection.choose("auto", problem)
    assert found is not None
    return choice.backend, evidence(choice.backend, found)


def markdown() -> str:
    """The support matrix as docs/user-guide.md shows it."""
    calls = training_calls()
    lines = [
        "| GPU | " + " | ".join(f"{stack.label}: pi0 / pi0-FAST training" for stack in STACKS) + " |",
        "|---|" + "---|" * len(STACKS),
    ]
    for sm, names in ROWS:
        gpu = machine.KNOWN[names[0]]
        cells = []
        for stack in STACKS:
            pi0, fast = (cell(gpu, stack, calls[model]) for model in ("pi0", "pi0_fast"))
            if pi0 == fast:
                cells.append(f"`{pi0[0]}` ({pi0[1]})")
            else:
                cells.append(f"`{pi0[0]}` ({pi0[1]}) / `{fast[0]}` ({fast[1]})")
        lines.append(f"| {sm} ({', '.join(names)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def own_row() -> list[str]:
    """doctor's lines: what auto takes for openpi's training calls on this machine, and what that rests on."""
    gpu = machine.gpu()
    if gpu is None:
        return ["no NVIDIA GPU here: auto takes openpi's own attention or, for long calls, xla (the CPU rules)"]
    lines = [f"{gpu.kind} ({gpu.sm}, {gpu.generation}):"]
    for model, problem in training_calls().items():
        choice = selection.choose("auto", problem)
        lines.append(
            f"  {model} training (B={problem.batch}, T={problem.q_len}): {choice.backend}; "
            f"{evidence(choice.backend, gpu)}"
        )
    if gpu.capability not in MEASURED_ON:
        lines.append(
            "  no GPU of this generation ran flashpatch: `python -m flashpatch tune pi0 --batch B` measures yours, "
            "and auto then follows your measurement"
        )
    return lines


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")
