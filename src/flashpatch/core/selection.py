"""Which backend computes a given problem: the user's choice, or `auto`'s, with the reason why.

`auto` walks one table of rules. A rule applies to a class of problems and names candidate
backends, fastest first, each measured faster than openpi's own attention (`reference`) on that
class; the first candidate that can run the problem here wins. Where none of a rule's candidates
can run, the next rule that applies is asked, and at the end `reference` runs. So a GPU, a cuDNN or
a kernel library that is missing only ever moves `auto` to the next path measured faster, or to
openpi's own attention: never to a path measured slower. Each rule's reason names the section of
docs/benchmarks.md with its measurements.

Before the rules, `auto` reads the user's own measurement of the call where `python -m flashpatch tune` made
one on this device under these versions (flashpatch/core/tuning.py): its backends measured faster than the
einsum, fastest first, are asked the same way, and at the end `reference` runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator

from flashpatch import backends
from flashpatch.backends.base import ChainBackend, DenseBackend, Problem
from flashpatch.core import tuning

#: On CPU the einsum beats the blockwise path while the logits are small; past this many (query,
#: key) pairs per head the blockwise path is chosen for its O(T) memory.
CPU_MIN_PAIRS_FOR_XLA = 1536 * 1536
#: On the GPU, (query, key) pairs over batch and heads (B * N * T * S) below which the einsum is as fast
#: as any flash path measured (their fixed costs dominate), and from which cudnn_split is the fastest
#: cuDNN path in training. Measured with openpi's heads (8 query heads, 1 key head, head_dim 256).
GPU_MIN_PAIRS_FOR_FLASH = 2**25
GPU_MIN_PAIRS_FOR_SPLIT = 3 * 2**25
#: pi0-FAST's causal suffix: cuDNN's dense path beat the einsum at T=1018 and lost at T=2048.
GPU_MAX_CAUSAL_LEN_FOR_CUDNN = 1024
#: The GPU generations auto's GPU rules were measured on (doctor says so).
MEASURED_GPUS = ("NVIDIA H200 (Hopper, compute capability 9.0)",)
#: openpi's einsum keeps about this many float32 logits-sized buffers alive per layer in training; where
#: they would take more than `EINSUM_MEMORY_SHARE` of the GPU, only an O(T)-memory path trains.
EINSUM_LOGIT_BUFFERS = 3
EINSUM_MEMORY_SHARE = 0.5

_BENCH = "docs/benchmarks.md"


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    fallback: bool = False  # the asked-for backend could not run this problem
    #: Backends passed over because they failed to lower or compile here (the compile guard), with the error.
    failed: tuple[tuple[str, str], ...] = ()


#: `compiles(name, problem)`: why backend `name` fails to lower or compile `problem` on this machine, or None.
#: The core passes the compile guard's (`flashpatch.core.guard.failure`); None: nothing is compiled to decide.
CompileCheck = Callable[[str, Problem], "str | None"]


@dataclasses.dataclass(frozen=True)
class Rule:
    platform: str
    applies: Callable[[Problem], bool]
    backends: tuple[str, ...]
    why: str


def device_memory() -> int | None:
    """Bytes JAX may allocate on the default device, where the device says (GPUs do); else None."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some platforms have no memory stats
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def einsum_would_not_fit(p: Problem) -> bool:
    """Whether openpi's einsum's logits would crowd out a training step on this device."""
    limit = device_memory()
    return limit is not None and p.pairs * 4 * EINSUM_LOGIT_BUFFERS > EINSUM_MEMORY_SHARE * limit


RULES: tuple[Rule, ...] = (
    Rule(
        "gpu",
        lambda p: p.q_len == 1,
        (backends.REFERENCE,),
        "one-token decode: openpi's own attention; every flash path measured was slower per decoded token "
        f"({_BENCH}, 'How auto chooses')",
    ),
    Rule(
        "gpu",
        lambda p: p.pairs < GPU_MIN_PAIRS_FOR_FLASH and not einsum_would_not_fit(p),
        (backends.REFERENCE,),
        "fewer than 2**25 (query, key) pairs over batch and heads, where fixed costs dominate and openpi's own "
        f"attention was the fastest measured, pi0's and pi0.5's sample_actions at batch 1 included ({_BENCH}, "
        "'How auto chooses')",
    ),
    Rule(
        "gpu",
        lambda p: p.pairs >= GPU_MIN_PAIRS_FOR_SPLIT,
        ("flash",),
        "FlashAttention's kernels on openpi's masks, without a dense mask or sorted queries: the fastest path "
        "measured from 3 * 2**25 (query, key) pairs, pi0's, pi0.5's and pi0-FAST's training included; below that "
        f"it lost to the einsum ({_BENCH}, 'FlashAttention')",
    ),
    Rule(
        "gpu",
        lambda p: p.causal_runs and p.q_len <= GPU_MAX_CAUSAL_LEN_FOR_CUDNN,
        ("cudnn",),
        "a causal suffix (pi0-FAST) up to T=1024: cuDNN with the dense mask beat the einsum on pi0-FAST's attention "
        "at its training shape, forward and backward; cudnn_split, whose tail such a suffix overflows, lost to it "
        f"({_BENCH}, 'FlashAttention')",
    ),
    Rule(
        "gpu",
        lambda p: not p.causal_runs and p.pairs >= GPU_MIN_PAIRS_FOR_SPLIT,
        ("cudnn_split", "cudnn"),
        "at least 3 * 2**25 (query, key) pairs over batch and heads: cudnn_split, then cudnn, were the fastest "
        f"cuDNN paths in training (pi0 at B=32 and at T=4147 included; {_BENCH}, 'How auto chooses')",
    ),
    Rule(
        "gpu",
        lambda p: not p.causal_runs and p.pairs < GPU_MIN_PAIRS_FOR_SPLIT,
        ("cudnn", "cudnn_split"),
        "2**25 to 3 * 2**25 (query, key) pairs over batch and heads: cudnn, then cudnn_split, beat the einsum "
        f"(pi0's training step at B=8 included; {_BENCH}, 'How auto chooses')",
    ),
    Rule(
        "gpu",
        lambda p: p.pairs >= GPU_MIN_PAIRS_FOR_SPLIT,
        ("pallas",),
        "at least 3 * 2**25 (query, key) pairs over batch and heads where neither FlashAttention nor cuDNN runs "
        "(GPUs before Hopper, cuDNN before 9.5): flashpatch's own Pallas kernel, faster than the einsum in openpi's "
        "pi0 and pi0-FAST training steps and at long prompts; measured on the H200 only, no Ampere or Ada GPU "
        f"({_BENCH}, 'The Pallas kernel')",
    ),
    Rule(
        "gpu",
        einsum_would_not_fit,
        ("xla",),
        "openpi's einsum would need more than half of this GPU's memory for its logits, and no faster path runs "
        "here: the blockwise path, whose memory grows with T, not T * S (slower than the einsum where both fit; "
        f"{_BENCH}, 'The longest prompt that trains')",
    ),
    Rule(
        "cpu",
        lambda p: p.q_len * p.kv_len < CPU_MIN_PAIRS_FOR_XLA,
        (backends.REFERENCE,),
        f"CPU: openpi's own attention is faster while T*S < {CPU_MIN_PAIRS_FOR_XLA} ({_BENCH}, 'How auto chooses')",
    ),
    Rule("cpu", lambda p: True, ("xla",), "CPU: blockwise attention keeps memory O(T) at large T*S"),
)


def exact_fallback(problem: Problem) -> DenseBackend:
    """The exact dense backend a chain backend hands the masks it refuses: never slower than openpi's own.

    cuDNN's dense-mask path where it runs the problem (Hopper with cuDNN 9.5+ at head_dim 256); else openpi's
    own attention, unless its logits would not fit the GPU, where only the blockwise `xla` path (memory O(T))
    trains at all.
    """
    from flashpatch.backends import cudnn, reference, xla

    dense = cudnn.CudnnBackend(use_seq_lengths=False)
    if dense.unsupported(problem) is None:
        return dense
    if einsum_would_not_fit(problem):
        return xla.XlaBackend()
    return reference.ReferenceBackend()


def fallback_for(backend: ChainBackend, problem: Problem) -> DenseBackend:
    """What runs, in the graph, where `backend` refuses a mask: its own `fallback`, else `exact_fallback`."""
    return backend.fallback if backend.fallback is not None else exact_fallback(problem)


def _cannot(name: str, problem: Problem, compiles: CompileCheck | None, failed: list) -> str | None:
    """Why `name` cannot run `problem` here: what it declares (`unsupported`), then what compiling it says."""
    if name == backends.REFERENCE:
        return None
    reason = backends.get(name).unsupported(problem)
    if reason is None and compiles is not None:
        reason = compiles(name, problem)
        if reason is not None:
            failed.append((name, reason))
            reason = f"it failed to compile here: {reason}"
    return reason


def _auto(problem: Problem, compiles: CompileCheck | None) -> Choice:
    skipped: list[str] = []
    failed: list[tuple[str, str]] = []
    tuned = tuning.lookup(problem)  # the user's own measurement of this call, where `tune` made one (core/tuning.py)
    for name in tuned.ranking if tuned is not None else ():  # faster than the einsum, fastest first; then reference
        reason = _cannot(name, problem, compiles, failed)
        if reason is None:
            note = f"; passed over: {'; '.join(skipped)}" if skipped else ""
            return Choice(name, f"auto: {tuned.reason(name)}{note}", failed=tuple(failed))
        skipped.append(f"{name} ({reason})")
    for rule in RULES:
        if rule.platform != problem.platform or not rule.applies(problem):
            continue
        for name in rule.backends:
            reason = _cannot(name, problem, compiles, failed)
            if reason is None:
                note = f"; passed over: {'; '.join(skipped)}" if skipped else ""
                return Choice(name, f"auto: {rule.why}{note}", failed=tuple(failed))
            skipped.append(f"{name} ({reason})")
    tail = f" (passed over: {'; '.join(skipped)})" if skipped else ""
    return Choice(
        backends.REFERENCE,
        f"auto: no path measured faster than openpi's own attention runs here on {problem.platform}{tail}",
        failed=tuple(failed),
    )


def choose(asked: str, problem: Problem, compiles: CompileCheck | None = None) -> Choice:
    """Resolve `asked` ('auto' or a backend name) for `problem`, falling back where it cannot run.

    `compiles` (the compile guard) is asked about each candidate that declares it can run the problem.
    """
    if problem.kv_len == 0:
        choice = Choice(backends.REFERENCE, "no keys at all (S = 0): openpi's own attention, which gives zeros")
    elif 0 in (problem.batch, problem.q_len, problem.num_heads, problem.head_dim):
        choice = Choice(backends.REFERENCE, "an empty batch, query, head or head-dim axis: nothing to compute")
    elif asked == "auto":
        choice = _auto(problem, compiles)
    elif asked == backends.REFERENCE:
        choice = Choice(asked, "asked for")
    else:
        failed: list[tuple[str, str]] = []
        reason = _cannot(asked, problem, compiles, failed)
        if reason is None:
            choice = Choice(asked, "asked for")
        else:
            choice = Choice(
                backends.REFERENCE,
                f"{asked} cannot run this call ({reason}); openpi's own attention runs",
                True,
                tuple(failed),
            )
    for seen in _recorders.get():
        seen.append(choice)
    return choice


_recorders: contextvars.ContextVar[tuple[list[Choice], ...]] = contextvars.ContextVar(
    "flashpatch_recorders", default=()
)


@contextlib.contextmanager
def recording() -> Iterator[list[Choice]]:
    """Collect the choices made in this thread or task inside the block (at trace time: a cached jit makes none).

    The benchmark reports with it which backend really ran a case, and why; the conformance kit checks with it
    that the backend under test ran, not openpi's own attention in its place.
    """
    seen: list[Choice] = []
    token = _recorders.set((*_recorders.get(), seen))
    try:
        yield seen
    finally:
        _recorders.reset(token)
