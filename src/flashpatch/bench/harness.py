"""What every case shares: variants, budget, compile under a variant, timing, memory, failures, progress."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Generic, TextIO, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

import flashpatch
from flashpatch import backends, diagnostics
from flashpatch.bench import memory, spread, timing
from flashpatch.bench.options import Options, variant_names
from flashpatch.bench.records import Record
from flashpatch.core import selection
from flashpatch.testing.conformance import rel_err  # the conformance suite's measure, NaN stays NaN

EINSUM = "einsum"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A path to compare: 'einsum' is openpi's original code; any other name is a flashpatch backend."""

    name: str

    @property
    def backend(self) -> str:
        """The flashpatch backend for `flashpatch.attention` (the einsum path is the 'reference' backend)."""
        return "reference" if self.name == EINSUM else self.name

    def model_context(self) -> contextlib.AbstractContextManager[Any]:
        """Patched models run under enable(name); the einsum path explicitly under disable()."""
        return flashpatch.disable() if self.name == EINSUM else flashpatch.enable(self.name)


def variants(asked: Sequence[str]) -> list[Variant]:
    """einsum first (speedups need it at each size), then the asked backends, or every registered one."""
    known = variant_names()
    names = list(asked) or [name for name in known if name != "auto"]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"backends must be among {', '.join(known)}; got {', '.join(unknown)}")
    return [Variant(EINSUM), *(Variant(name) for name in names)]


class Unsupported(Exception):
    """The variant's backend declines this problem; flashpatch would run the einsum path instead."""


class Lazy(Generic[T]):
    """Build a value on first use and keep it, or keep the error and raise it again on every use."""

    def __init__(self, build: Callable[[], T]):
        self._build = build
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def get(self) -> T:
        if not self._done:
            self._done = True
            try:
                self._value = self._build()
            except Exception as err:
                self._error = err
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def drop(self) -> None:
        self._done, self._value, self._error = False, None, None


def _short(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text}"[:300]


class Harness:
    """Runs cases: budget, failure handling, compile + time + memory, speedups, one progress line each."""

    def __init__(self, options: Options, budget: timing.Budget, stream: TextIO = sys.stdout):
        self.options = options
        self.budget = budget
        self.stream = stream
        self.variants = variants(options.backends)
        self.device = jax.devices()[0]
        self.records: list[Record] = []
        self.notes: list[str] = []  # about the whole run (where the models came from, say)
        self.models: dict[str, str] = {}  # per model scenario, which models ran ("openpi" or "fixtures")
        self.on_record: Callable[[], None] | None = None  # called after each case (the CLI saves partial JSON)
        self._einsum: dict[tuple[str, str, int], Record] = {}
        self._einsum_outputs: dict[tuple[str, str, int], np.ndarray] = {}
        self._out_of_memory_at: dict[tuple[str, str, str], int] = {}

    # -- running cases -------------------------------------------------------------------------

    def run_case(
        self, scenario: str, case: str, variant: Variant, size: int, batch: int, body: Callable[[Record], None]
    ) -> Record:
        """Run `body(record)` unless the variant cannot run on this platform, the budget has run out or an
        earlier out-of-memory rules it out; never raise."""
        rec = Record(scenario=scenario, case=case, variant=variant.name, size=size, batch=batch)
        line = (scenario, case, variant.name)
        reason = self.budget.exceeded()
        elsewhere = self.runs_elsewhere(variant)
        if elsewhere is not None:  # before the budget: a case that could never run here is not merely late
            rec.status, rec.reason = "unsupported", elsewhere
        elif line in self._out_of_memory_at and size > self._out_of_memory_at[line]:
            rec.status, rec.reason = "skipped", f"out of memory at {self._out_of_memory_at[line]} already"
        elif reason is not None:
            rec.status, rec.reason = "skipped", reason
        else:
            self._run(rec, body)
        self._finish(rec)
        return rec

    def runs_elsewhere(self, variant: Variant) -> str | None:
        """Why `variant`'s backend can run no call on this platform (a GPU-only backend on a CPU), or None."""
        if variant.name in (EINSUM, "auto"):
            return None
        try:
            platforms = backends.get(variant.backend).platforms
        except Exception:  # a backend that cannot even be built says why when its case runs
            return None
        platform = jax.default_backend()
        if platform in platforms:
            return None
        return f"{variant.name} cannot run here ({variant.name} runs on {', '.join(platforms)}, not {platform})"

    def _run(self, rec: Record, body: Callable[[Record], None]) -> None:
        diagnostics.forget()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", flashpatch.FlashpatchWarning)
                body(rec)
            ours = [w for w in caught if issubclass(w.category, flashpatch.FlashpatchWarning)]
            rec.notes.extend(sorted({str(w.message) for w in ours}))
            for w in caught:
                if w not in ours:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except Unsupported as err:
            rec.status, rec.reason = "unsupported", str(err)
        except Exception as err:
            if memory.is_out_of_memory(err):
                rec.status, rec.reason = "oom", memory.out_of_memory_reason(err)
                self._out_of_memory_at[(rec.scenario, rec.case, rec.variant)] = rec.size
            else:
                rec.status, rec.reason = "error", _short(err)
        finally:
            gc.collect()

    def skip(self, rec: Record, reason: str) -> None:
        """Mark a case not run for a reason of the scenario's own (e.g. its prefill failed)."""
        rec.status, rec.reason = "skipped", reason

    def _finish(self, rec: Record) -> None:
        key = (rec.scenario, rec.case, rec.size)
        if rec.variant == EINSUM:
            self._einsum[key] = rec
        else:
            base = self._einsum.get(key)
            if rec.status == "ok" and base is not None and base.status == "ok" and base.ms and rec.ms:
                rec.speedup = base.ms / rec.ms
                bounds = spread.ratio_range(base, rec)
                rec.speedup_range = list(bounds) if bounds is not None else None
        self.records.append(rec)
        print(self.progress_line(rec), file=self.stream, flush=True)
        if self.on_record is not None:
            self.on_record()

    # -- pieces of a case ----------------------------------------------------------------------

    def compile(
        self,
        rec: Record,
        variant: Variant,
        fn: Callable[..., Any],
        *args: Any,
        context: contextlib.AbstractContextManager[Any] | None = None,
        donate: tuple[int, ...] = (),
    ) -> Any:
        """Trace `fn` for `variant`, check which backend flashpatch chose, compile; note memory and time.

        Raises Unsupported when the variant's backend ran nowhere (flashpatch fell back to einsum).
        """
        start = time.perf_counter()
        with context or contextlib.nullcontext(), selection.recording() as choices:
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
        ran = sorted({choice.backend for choice in choices})
        fallbacks = sorted({choice.reason for choice in choices if choice.fallback})
        if variant.name != EINSUM:
            if not choices:
                raise RuntimeError(f"flashpatch intercepted no attention call for {variant.name}")
            if variant.name != "auto" and variant.backend not in ran:
                raise Unsupported("; ".join(fallbacks) or f"{variant.backend} was never chosen")
        rec.backends_ran = sorted({*rec.backends_ran, *(ran or ["original einsum"])})
        rec.notes.extend(reason for reason in fallbacks if reason not in rec.notes)
        compiled = lowered.compile()
        rec.metrics["compile_s"] = rec.metrics.get("compile_s", 0.0) + time.perf_counter() - start
        sizes = memory.compiled_memory(compiled)
        if sizes is not None and sizes["peak"] >= rec.memory.get("peak", -1):
            rec.memory.update(sizes)
        return compiled

    def time(
        self,
        rec: Record,
        name: str,
        call: Callable[[int], Any],
        *,
        group_small_calls: bool = True,
        primary: bool = True,
    ) -> timing.Timing:
        """Time `call` (see timing.measure), stored under `name`; the primary one's memory samples are kept and its
        p10-p90 is the record's spread (the caller sets `rec.ms` from it)."""
        o = self.options
        with memory.Sampler(self.device) as sampler:
            result = timing.measure(
                call,
                warmup=o.warmup,
                repeats=o.repeats,
                max_seconds=o.case_seconds,
                group_small_calls=group_small_calls,
            )
        rec.timings[name] = result.as_dict()
        if primary:
            rec.primary = name
            rec.memory.update(sampler.summary())
        return result

    def compare_to_einsum(self, rec: Record, name: str, output: Any) -> None:
        """Store einsum's output for this size, or the difference to it as metric `name`."""
        key = (rec.scenario, rec.case, rec.size)
        value = np.asarray(jnp.asarray(output, jnp.float32))
        if not np.all(np.isfinite(value)):
            raise FloatingPointError(f"{rec.scenario}/{rec.case} {rec.variant}: output has NaN or inf")
        if rec.variant == EINSUM:
            self._einsum_outputs[key] = value
        elif key in self._einsum_outputs:
            rec.metrics[name] = rel_err(value, self._einsum_outputs[key])

    def compare_tokens_to_einsum(self, rec: Record, tokens: Any) -> None:
        """Store einsum's decoded tokens, or the share of tokens equal to them as `tokens_same_as_einsum`."""
        key = (rec.scenario, rec.case, rec.size)
        value = np.asarray(tokens)
        if rec.variant == EINSUM:
            self._einsum_outputs[key] = value
        elif key in self._einsum_outputs:
            rec.metrics["tokens_same_as_einsum"] = float(np.mean(value == self._einsum_outputs[key]))

    # -- output --------------------------------------------------------------------------------

    def progress_line(self, rec: Record) -> str:
        head = f"[{self.budget.elapsed():6.1f}s] {rec.scenario}/{rec.case} {size_label(rec.scenario)}={rec.size} "
        head += f"{rec.variant:<8}"
        if rec.status != "ok":
            return f"{head} {rec.status.upper()}: {rec.reason}"
        parts = [f"{rec.ms:.3f} ms" if rec.ms is not None else "-"]
        bounds = spread.ms_range(rec)
        if bounds is not None:
            parts[0] += f" (p10-p90 {bounds[0]:.3f}-{bounds[1]:.3f}, {spread.repeats(rec)} repeats)"
        if rec.speedup is not None:
            parts.append(f"{spread.ratio_text(rec.speedup, rec.speedup_range)} einsum")
        parts += [f"{name} {format_metric(name, value)}" for name, value in rec.metrics.items() if name != "compile_s"]
        if "peak" in rec.memory:
            parts.append(f"peak {memory.format_bytes(rec.memory['peak'])}")
        if "sampled_mean" in rec.memory:
            parts.append(f"mean {memory.format_bytes(rec.memory['sampled_mean'])}")
        if rec.notes:
            parts.append(f"notes: {'; '.join(rec.notes)}")
        return f"{head} " + "  ".join(parts)


def size_label(scenario: str) -> str:
    return {"gemma_fast": "cache", "openpi": "prompt"}.get(scenario, "T")


def format_metric(name: str, value: float) -> str:
    if name in ("seq_len",):
        return f"{value:.0f}"
    if name in ("ceiling_share", "tokens_same_as_einsum", "gflop_vs_leanest"):
        return f"{value:.0%}"
    if name.startswith(("rel_", "loss", "grad_")):
        return f"{value:.2e}"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
