"""What one benchmark run measures: sizes, repeats, budget."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from flashpatch import backends

SCENARIOS = ("core", "gemma", "gemma_fast", "openpi")
#: Run when --scenarios is not given (openpi's own models only where asked: they need openpi).
DEFAULT_SCENARIOS = ("core", "gemma", "gemma_fast")
OPENPI_CASES = (
    "pi0_train",
    "pi05_train",
    "pi0_long_train",
    "pi0_fast_train",
    "pi0_fast_long_train",
    "pi0_sample",
    "pi05_sample",
    "pi0_fast_sample",
    "pi0_huge_train",  # pi0 at openpi_huge_prompt (T=16435), where the einsum runs out of memory on an H200
    "pi0_fit",  # the largest prompt that trains at openpi_long_batch, einsum vs auto (one compile per rung)
)


#: The model sizes --prefix-expert and --action-expert take: flashpatch.testing.gemma's variants (a test keeps
#: the two lists equal; named here so that checking an option imports no JAX).
EXPERTS = ("tiny", "dummy", "gemma_300m", "gemma_2b")


def variant_names() -> tuple[str, ...]:
    """What --backends takes: every registered backend but the original itself (the einsum), and 'auto'."""
    return (*(name for name in backends.names() if name != "reference"), "auto")


@dataclasses.dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    #: flashpatch backends to compare with the einsum path; empty: every registered backend.
    backends: tuple[str, ...] = ()

    # Attention core: openpi's Gemma attention shape (8 query heads, 1 kv head, head_dim 256), bf16.
    #: Run in this order, most telling first, so that a time budget that runs out still leaves the
    #: spread (kvax compiles Triton kernels for every new shape, which takes a while).
    core_sizes: tuple[int, ...] = (1024, 4096, 16384, 512, 2048, 8192)
    core_batch: int = 2
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256

    # Models: expert variants of flashpatch.testing.gemma (pi0: gemma_2b prefix + gemma_300m actions).
    prefix_expert: str = "gemma_2b"
    action_expert: str = "gemma_300m"
    depth: int = 18
    vocab_size: int = 257_152  # pi0-FAST decodes logits over PaliGemma's whole vocabulary
    action_horizon: int = 50
    train_sizes: tuple[int, ...] = (1024, 4096, 8192, 16384, 32768)  # ladder: also finds the largest T that fits
    train_batch: int = 4
    infer_sizes: tuple[int, ...] = (1024, 4096)
    infer_batch: int = 1
    denoise_steps: int = 10
    cache_sizes: tuple[int, ...] = (1024, 4096)
    decode_steps: int = 64
    decode_batch: int = 1

    # openpi's own models (scenario "openpi"): openpi from openpi_src, installed, or else the fixtures.
    openpi_src: Path | None = None
    openpi_size: str = "full"  # "full": openpi's Gemma 2B + 300M; "dummy": its dummy Gemma (SigLIP stays full)
    openpi_cases: tuple[str, ...] = OPENPI_CASES[:-2]
    openpi_batch: int = 32  # pi0 / pi0.5 training at their default prompt lengths
    openpi_long_batch: int = 4
    openpi_long_prompt: int = 3328  # pi0 with 3 cameras: T = 768 + 3328 + 51 = 4147
    openpi_huge_prompt: int = 15616  # T = 768 + 15616 + 51 = 16435
    openpi_grad_check: bool = True  # step-0 loss and gradients against the float32 model
    #: pi0_fit's rungs, T = 768 + prompt + 51: on the H200 the einsum stops between the first two, flashpatch
    #: runs all three (benchmarks/results/h200-2026-12-01-openpi-fit).
    openpi_fit_prompts: tuple[int, ...] = (7424, 15616, 31744)

    # Method.
    warmup: int = 2
    repeats: int = 20
    case_seconds: float = 3.0  # cap on the timed loop of one measurement (repeats shrink, never below 3)
    input_sets: int = 3  # fresh random inputs rotated through the repeats
    budget_s: float = 330.0  # cases that would start later are skipped (and reported as such); inf: no budget
    seed: int = 0

    out: Path | None = None
    compile_cache: Path | None = None
    quick: bool = False

    def validate(self) -> None:
        """Raise ValueError with one sentence naming the command-line option and what it takes.

        Run before anything is measured: a value that would fail (or mislead) after minutes of compiling
        is refused at once.
        """
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            raise ValueError(f"--scenarios must be among {', '.join(SCENARIOS)}; got {', '.join(sorted(unknown))}")
        for name in ("prefix_expert", "action_expert"):
            if getattr(self, name) not in EXPERTS:
                raise ValueError(f"{flag(name)} must be one of {', '.join(EXPERTS)}; got {getattr(self, name)!r}")
        names = ("core_batch", "train_batch", "infer_batch", "decode_batch", "depth", "repeats", "input_sets")
        names += ("denoise_steps", "decode_steps", "openpi_batch", "openpi_long_batch", "openpi_long_prompt")
        names += ("openpi_huge_prompt",)
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be a positive integer; got {getattr(self, name)}")
        for name in ("warmup", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be 0 or more; got {getattr(self, name)}")
        for name in ("budget_s", "case_seconds"):
            value = getattr(self, name)
            no_budget = name == "budget_s" and value == math.inf  # --quick: every case runs
            if not (no_budget or (math.isfinite(value) and value > 0)):
                raise ValueError(f"{flag(name)} must be a positive number of seconds; got {value}")
        suffix = self.action_horizon + 1
        builds = {
            "core_sizes": "the core scenario times attention on pi0's mask",
            "train_sizes": "the training scenarios run pi0's layout",
            "infer_sizes": "pi0's inference runs its layout",
        }
        for name, what in builds.items():
            small = [t for t in getattr(self, name) if t < suffix + 8]
            if small:
                raise ValueError(
                    f"{flag(name)} must each be at least {suffix + 8}: {what}, whose state and action tokens take "
                    f"{suffix} (the action horizon + 1), plus 8 for images and prompt; got {_csv(small)}"
                )
        small = [c for c in self.cache_sizes if c < self.decode_steps + 8]
        if small:
            raise ValueError(
                f"--cache-sizes must each be at least --decode-steps + 8 = {self.decode_steps + 8}; got "
                f"{_csv(small)}: give larger caches or fewer decode steps"
            )
        if self.openpi_size not in ("full", "dummy"):
            raise ValueError(f"--openpi-size must be full or dummy; got {self.openpi_size!r}")
        unknown = set(self.openpi_cases) - set(OPENPI_CASES)
        if unknown:
            raise ValueError(
                f"--openpi-cases must be among {', '.join(OPENPI_CASES)}; got {', '.join(sorted(unknown))}"
            )
        small = [p for p in self.openpi_fit_prompts if p < 1]
        if small:
            raise ValueError(f"--openpi-fit-prompts must be positive; got {_csv(small)}")


def flag(field: str) -> str:
    """The command-line option that sets Options.`field`."""
    return "--" + field.replace("_", "-")


def _csv(values: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(v) for v in values)


#: --quick: tiny sizes that run on a 2-core CPU in seconds, so that CI keeps every code path alive. No time
#: budget (unless --budget-s is given): a slow or busy machine takes longer rather than dropping a path.
QUICK = dict(
    core_sizes=(64,),
    core_batch=2,
    num_heads=4,
    head_dim=16,
    prefix_expert="tiny",
    action_expert="tiny",
    depth=2,
    vocab_size=256,
    action_horizon=8,
    train_sizes=(32,),
    train_batch=2,
    infer_sizes=(32,),
    denoise_steps=2,
    cache_sizes=(32,),
    decode_steps=4,
    warmup=1,
    repeats=3,
    case_seconds=0.2,
    input_sets=2,
    budget_s=math.inf,
    openpi_size="dummy",
    openpi_batch=2,
    openpi_long_batch=2,
    openpi_long_prompt=24,
    openpi_fit_prompts=(16, 64),
    quick=True,
)
