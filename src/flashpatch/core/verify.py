"""Verify mode: every patched call also runs openpi's original attention and logs how far apart they are.

The comparison runs in the graph; its two numbers (relative error, largest absolute difference) reach
the host through `jax.debug.callback`, and the log says the first one per (site, backend) and then
each new largest. Cost: the original attention runs beside the fast path on every call (its time and
its T x S logits), plus one host callback per call; for a check run, not for training.

openpi's Gemma stack is a flax `nn.scan`. flax traces a scanned body once more, outside the scan, to
check that broadcast inputs stay loop-invariant, and refuses any side effect that reads the carry in
that trace. The callback is left out of that one trace (it computes nothing the scan uses), so the
report also works inside openpi's stack; `works_in_flax_scan()` checks this on the installed flax.
"""

from __future__ import annotations

import functools
import logging
import sys

import jax
import jax.numpy as jnp

from flashpatch import diagnostics

#: The relative error, by the output's dtype, within which a backend agrees with openpi's attention: what the
#: conformance kit accepts against float32 (bf16 carries the rounding of q, k, v and the probabilities). An agreement
#: is logged at INFO; a larger difference, or NaN, at WARNING.
AGREEMENT = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3}


def report(site: str, backend_name: str, out: jax.Array, ref: jax.Array) -> None:
    """Log, from the graph, how far `out` is from the original's `ref` (largest per site and backend)."""
    if in_flax_invariant_trace():
        return
    tolerance = AGREEMENT.get(jnp.dtype(out.dtype).name, AGREEMENT["bfloat16"])
    diff = (out.astype(jnp.float32) - ref.astype(jnp.float32)).ravel()
    ref32 = ref.astype(jnp.float32).ravel()
    rel = jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref32), jnp.finfo(jnp.float32).tiny)
    worst = jnp.max(jnp.abs(diff))

    def say(rel_err, max_abs) -> None:
        log.record(site, backend_name, float(rel_err), float(max_abs), tolerance)

    jax.debug.callback(say, rel, worst)


def in_flax_invariant_trace() -> bool:
    """Whether this trace is flax's loop-invariance check of a scanned body (`flax.core.axes_scan`)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "body_fn" and code.co_filename.endswith("axes_scan.py") and frame.f_locals.get("init_mode"):
            return True
        frame = frame.f_back
    return False


@functools.cache
def works_in_flax_scan() -> bool:
    """Whether `report` can run inside a flax nn.scan with the installed JAX and flax."""
    import flax.linen as nn

    class Step(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            report("probe", "probe", x, x)
            return x, None

    scanned = nn.scan(Step, variable_axes={}, in_axes=(nn.broadcast,), length=1)
    try:
        jax.eval_shape(lambda x: scanned().init_with_output(jax.random.PRNGKey(0), x, x), jnp.zeros(1))
    except ValueError:
        return False
    return True


class VerifyLog:
    """Largest difference seen per (site, backend); reported once, then whenever it grows."""

    def __init__(self) -> None:
        self.worst: dict[tuple[str, str], tuple[float, float]] = {}

    def record(self, site: str, backend_name: str, rel_err: float, max_abs: float, tolerance: float) -> None:
        if site == "probe":
            return
        key = (site, backend_name)
        previous = self.worst.get(key)
        if previous is None or rel_err > previous[0] or rel_err != rel_err:
            self.worst[key] = (rel_err, max_abs)
            agrees = rel_err <= tolerance  # False for NaN
            diagnostics.logger.log(
                logging.INFO if agrees else logging.WARNING,
                "flashpatch verify: %s via %s differs from the original by rel.err %.3g (max abs %.3g)%s; %s",
                site,
                backend_name,
                rel_err,
                max_abs,
                "" if previous is None else " (new largest)",
                f"within {tolerance:g}, the agreement expected" if agrees else f"MORE than the {tolerance:g} expected",
            )


log = VerifyLog()
