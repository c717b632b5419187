"""Memory, measured honestly: what XLA planned for each compiled function, and what the device saw.

- compiled: `Compiled.memory_analysis()`: arguments + outputs + XLA's temporary buffer - aliased
  (donated) bytes. That is what one execution holds at once; exact per function, on every platform.
- sampled: `device.memory_stats()['bytes_in_use']` polled every 2 ms from a thread while the timed loop runs
  (GPU only: CPU reports no stats). Everything live in the process counts (params, inputs, caches).
  JAX has no way to reset the device's peak counter, so the peak per case is the sampled maximum.
"""

from __future__ import annotations

import threading
from typing import Any

GIB = 1024**3


def format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Sizes XLA assigned for one compiled function, or None where the platform does not say."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    sizes = {
        name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
    sizes["peak"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return sizes


def device_stats(device: Any) -> dict[str, int] | None:
    stats = device.memory_stats()
    return dict(stats) if stats else None


class Sampler:
    """Polls the device's bytes in use on a thread while a block runs (a no-op where there are no stats)."""

    def __init__(self, device: Any, period_s: float = 0.002):
        self.device = device
        self.period_s = period_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        if device_stats(self.device) is not None:
            self._sample()
            self._thread = threading.Thread(target=self._poll, name="flashpatch-bench-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()

    def _poll(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def _sample(self) -> None:
        stats = device_stats(self.device)
        if stats and "bytes_in_use" in stats:
            self.samples.append(int(stats["bytes_in_use"]))

    def summary(self) -> dict[str, int]:
        if not self.samples:
            return {}
        return {
            "sampled_max": max(self.samples),
            "sampled_mean": sum(self.samples) // len(self.samples),
            "samples": len(self.samples),
        }


def is_out_of_memory(error: BaseException) -> bool:
    """XLA's out-of-memory errors, at compile time or run time (XlaRuntimeError / JaxRuntimeError)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_reason(error: BaseException) -> str:
    """The line of an out-of-memory error that says what did not fit.

    XLA can run out while autotuning at compile time; its error then opens with a line about missing
    kernel configurations, and the allocation that failed comes far below it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        low = line.lower()
        if "out of memory" in low or "resource_exhausted" in low:
            marker = line.find("RESOURCE_EXHAUSTED:")
            said = line[marker + len("RESOURCE_EXHAUSTED:") :].strip() if marker >= 0 else line
            stage = " (while XLA autotuned the compile)" if any("autotun" in x.lower() for x in lines) else ""
            return f"{said[:240]}{stage}"
    return lines[0][:240] if lines else type(error).__name__
