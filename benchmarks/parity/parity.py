"""Train the same pi0-style model with and without flashpatch, and compare the loss curves.

Every run starts from the same parameters and sees the same batches and flow-matching noise in the
same order (all drawn inside the jitted step from keys folded with the step number), so the only
difference between runs is the attention implementation. Runs share one process; `None` as the
backend means flashpatch off (the original einsum attention), `FLOAT32` openpi's einsum computed in float32,
anything else is `flashpatch.enable(name)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pi0_task as pi0

import flashpatch
from flashpatch import backends, diagnostics
from flashpatch.backends.base import DenseBackend
from flashpatch.backends.reference import reference_attention

UNPATCHED = "unpatched"
#: A run, not a backend: openpi's einsum on float32 copies of q, k, v with float32 probabilities, cast back to
#: the activation dtype. It tells how far bfloat16 rounding inside attention moves training.
FLOAT32 = "einsum_float32"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run's schedule; every run of a comparison uses the same one."""

    steps: int
    batch: int
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    eval_every: int = 0  # 0: no held-out evaluation during training
    eval_batches: int = 4
    warmup_timing_steps: int = 5  # left out of the median step time
    #: Passed to XLA's compile, e.g. {"xla_backend_optimization_level": 0} to cut CPU compile time in CI.
    compiler_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 turns evaluation off); got {self.eval_every}")


@dataclasses.dataclass
class RunResult:
    """What one training run produced. Losses are float32 per step; times in seconds; memory in bytes."""

    name: str
    losses: np.ndarray
    eval_steps: list[int]
    eval_losses: list[float]
    compile_s: float  # tracing + compiling the train step
    step_times: np.ndarray  # per step after the timing warm-up, each synchronised
    memory: dict[str, int]
    notes: list[str]

    @property
    def warned(self) -> bool:
        """flashpatch warned during the run (a fallback: the asked-for backend did not run everywhere)."""
        return any(note.startswith("warning:") for note in self.notes)

    @property
    def median_step_s(self) -> float:
        return float(np.median(self.step_times)) if len(self.step_times) else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "losses": [float(x) for x in self.losses],
            "eval_steps": self.eval_steps,
            "eval_losses": self.eval_losses,
            "compile_s": self.compile_s,
            "median_step_s": self.median_step_s,
            "memory": self.memory,
            "notes": self.notes,
        }


def runnable_backends(platform: str | None = None) -> list[str]:
    """Every registered backend that declares it runs on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    # pallas runs on a CPU only in Pallas' interpreter, for tests: far too slow to train with.
    return [
        name
        for name in backends.names()
        if platform in backends.get(name).platforms and not (name == "pallas" and platform != "gpu")
    ]


def activation(backend: str | None) -> contextlib.AbstractContextManager:
    """flashpatch off (None) or on with `backend`, for this thread; `FLOAT32`: the float32 einsum, process-wide."""
    if backend is None:
        return flashpatch.disable()
    if backend == FLOAT32:
        return _float32_attention()
    return flashpatch.enable(backend)


class _Float32Reference(DenseBackend):
    """openpi's einsum on float32 copies of q, k, v with float32 probabilities, cast back to the activation dtype.

    Rows with no key get the core's fill (openpi's mean of V), as every backend's do."""

    name = "float32_reference"
    dtypes = ("float32", "bfloat16", "float16")

    def attend(self, q, k, v, mask, problem):
        out = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, jnp.float32)
        return out.astype(problem.out_dtype)


@contextlib.contextmanager
def _float32_attention() -> Iterator[None]:
    """The einsum in float32 as a backend of its own, while the block lasts (registered process-wide: a
    training harness's switch, traced and compiled inside the block)."""
    backends.register(_Float32Reference.name, _Float32Reference)
    try:
        with flashpatch.enable(_Float32Reference.name):
            yield
    finally:
        backends.unregister(_Float32Reference.name)


def train(
    model: pi0.Pi0Like,
    task: pi0.Task,
    params: Any,
    config: TrainConfig,
    backend: str | None,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train from a copy of `params` with flashpatch off (backend None) or on with `backend`."""
    optimizer = _optimizer(config)
    keys = _Keys.of(config.seed)

    def train_step(state, step, task):
        def loss_fn(p):
            obs = task.sample(jax.random.fold_in(keys.data, step), config.batch)
            return pi0.flow_matching_loss(model, p, obs, jax.random.fold_in(keys.noise, step))

        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    def eval_loss(p, task):
        def one(i):
            key = jax.random.fold_in(keys.eval, i)
            obs = task.sample(jax.random.fold_in(key, 0), config.batch)
            return pi0.flow_matching_loss(model, p, obs, jax.random.fold_in(key, 1))

        return jnp.mean(jax.lax.map(one, jnp.arange(config.eval_batches)))  # one forward in the program

    # A fresh copy (the step donates its state; `params` serves every run), in one compiled call.
    state = jax.jit(lambda p: (jax.tree.map(jnp.copy, p), optimizer.init(p)))(params)
    step0 = np.int32(0)
    notes: list[str] = []
    with _recording(notes), activation(backend):
        started = time.perf_counter()
        compiled = jax.jit(train_step, donate_argnums=0).lower(state, step0, task).compile(config.compiler_options)
        compile_s = time.perf_counter() - started
        evaluate = None
        if config.eval_every:
            evaluate = jax.jit(eval_loss).lower(state[0], task).compile(config.compiler_options)

    memory = _compiled_memory(compiled)
    losses = np.zeros(config.steps, np.float32)
    times = np.zeros(config.steps)
    eval_steps: list[int] = []
    eval_losses: list[float] = []
    for step in range(config.steps):
        if evaluate is not None and step % config.eval_every == 0:
            eval_steps.append(step)
            eval_losses.append(float(evaluate(state[0], task)))
        started = time.perf_counter()
        state, loss = compiled(state, np.int32(step), task)
        losses[step] = float(loss)  # waits for the step: times are synchronised
        times[step] = time.perf_counter() - started
        if on_step is not None:
            on_step(step, float(losses[step]))
    if evaluate is not None:
        eval_steps.append(config.steps)
        eval_losses.append(float(evaluate(state[0], task)))
    memory.update(_device_memory())
    return RunResult(
        name=backend or UNPATCHED,
        losses=losses,
        eval_steps=eval_steps,
        eval_losses=eval_losses,
        compile_s=compile_s,
        step_times=times[config.warmup_timing_steps :],
        memory=memory,
        notes=notes,
    )


@dataclasses.dataclass(frozen=True)
class _Keys:
    """Independent streams from the run seed: initial parameters, batches, flow noise, held-out batches."""

    init: jax.Array
    data: jax.Array
    noise: jax.Array
    eval: jax.Array

    @classmethod
    def of(cls, seed: int) -> _Keys:
        return cls(*jax.random.split(jax.random.PRNGKey(seed), 4))


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """openpi's recipe in small: global-norm clipping, AdamW, linear warm-up then cosine decay."""
    warmup = max(1, min(config.warmup_steps, config.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(config.steps, warmup + 1), config.learning_rate * 0.1
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay))


def _compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's memory plan for the train step (per run, unlike the device's running peak)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    found = {f: int(getattr(stats, f)) for f in fields if hasattr(stats, f)}
    if len(found) == len(fields):
        found["step_total_bytes"] = (
            found["temp_size_in_bytes"]
            + found["argument_size_in_bytes"]
            + found["output_size_in_bytes"]
            - found["alias_size_in_bytes"]
        )
    return found


def _device_memory() -> dict[str, int]:
    """The device's allocator statistics where the platform reports them (GPU: yes, CPU: no)."""
    stats = jax.devices()[0].memory_stats() or {}
    return {f"device_{k}": int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use") if k in stats}


@contextlib.contextmanager
def _recording(notes: list[str]) -> Iterator[None]:
    """Collect flashpatch's one-time messages (backend chosen per site, fallbacks) for this run.

    Clears the process's record of messages already said, so that each run says them again.
    """
    diagnostics.forget()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("flashpatch")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", flashpatch.FlashpatchWarning)
            yield
        notes.extend(f"warning: {w.message}" for w in caught if issubclass(w.category, flashpatch.FlashpatchWarning))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@dataclasses.dataclass(frozen=True)
class Gap:
    """How far a run's loss curve is from the baseline's."""

    max_rel_gap: float  # largest |a - b| / |b| over the per-step losses
    max_rel_gap_smoothed: float  # the same over moving averages of `window` steps
    window: int
    final_rel_diff: float  # |mean(a[-k:]) - mean(b[-k:])| / mean(b[-k:])
    final_steps: int
    identical: bool


def compare(losses: np.ndarray, baseline: np.ndarray, *, window: int = 50, final_steps: int = 100) -> Gap:
    """Gap between two loss sequences of equal length; NaN anywhere gives an infinite gap."""
    a, b = np.asarray(losses, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"losses and baseline must be non-empty 1-D of equal length; got {a.shape} and {b.shape}")
    window = max(1, min(window, len(a)))
    k = max(1, min(final_steps, len(a)))
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Gap(np.inf, np.inf, window, np.inf, k, False)
    smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="valid")  # noqa: E731
    rel = lambda x, y: float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30)))  # noqa: E731
    final_a, final_b = a[-k:].mean(), b[-k:].mean()
    return Gap(
        max_rel_gap=rel(a, b),
        max_rel_gap_smoothed=rel(smooth(a), smooth(b)),
        window=window,
        final_rel_diff=float(abs(final_a - final_b) / max(abs(final_b), 1e-30)),
        final_steps=k,
        identical=bool(np.array_equal(a, b)),
    )


def run_parity(
    model: pi0.Pi0Like,
    task: pi0.Task,
    config: TrainConfig,
    backend_names: Sequence[str],
    *,
    on_run: Callable[[RunResult], None] | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> list[RunResult]:
    """The unpatched run first, then one run per backend, all from the same initial parameters."""
    known = (*backends.names(), FLOAT32)
    unknown = [b for b in backend_names if b not in known]
    if unknown:
        raise ValueError(f"backend_names must be among {', '.join(known)}; got {unknown}")
    params = init_params(model, task, config)
    results = []
    for backend in (None, *backend_names):
        name = backend or UNPATCHED
        hook = None if on_step is None else (lambda step, loss, name=name: on_step(name, step, loss))
        result = train(model, task, params, config, backend, on_step=hook)
        results.append(result)
        if on_run is not None:
            on_run(result)
    return results


def init_params(model: pi0.Pi0Like, task: pi0.Task, config: TrainConfig) -> Any:
    """Initial parameters from the run seed (flashpatch off: initialisation has no attention to patch)."""
    shapes = jax.eval_shape(lambda key: task.sample(key, 1), jax.random.PRNGKey(0))
    obs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    args = (_Keys.of(config.seed).init, obs, obs.actions, jnp.ones((1,)))
    with flashpatch.disable():
        return jax.jit(model.init).lower(*args).compile(config.compiler_options)(*args)
