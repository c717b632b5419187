"""One fallback decision per layer stack instead of one per layer.

openpi runs its attention layers as one stack (a flax `nn.scan` over `Block`) that hands every layer the
same mask. A chain backend computes a mask exactly only where `accepts` says so, and the core otherwise
asks that in each layer: a conditional per layer in every pass (the host reads its predicate before it
launches a branch), with the ordering and select around it. On the H200 (pi0's mask, 18-layer scan) that
form took 4.43 ms per layer fwd+bwd at B=32, T=870 where the same kernels without it took 3.62 (flash; see
docs/benchmarks.md). Around a stack call, the question is asked once:

1. SPECULATE: the stack runs with each chain backend's output taken as it is (no conditional per layer);
   every core call records which backend ran on which problem.
2. The recorded backends' `accepts` is read from the mask the stack call hands its layers (openpi's
   blocks and attention pass it on unchanged; the adapters read it with `openpi_mask`).
3. One conditional keeps that output where all accept, and otherwise runs the stack again with each
   layer's exact fallback (FALLBACK), rematerialised so that none of its activations are kept, with one
   warning. A refused mask thus costs the fast stack and the exact one; openpi's own masks never are
   refused, and a backend that can refuse them (`ChainBackend.refuses_openpi_masks`: cudnn_split on
   pi0-FAST's long causal suffix) is left to decide in each layer.

It applies where the decision is safe to hoist: flashpatch is ON without `verify`, the module is not
initialising and mutates no collection (flax's lifted conditional then returns no variables), and this
JAX's conditional forwards residuals that are its own inputs (jax 0.12 does; jax 0.5.3 would write
zeros, and 0.11 would hold an empty buffer, for every parameter the rematerialised fallback reads).
Elsewhere each layer decides for itself, as before; FLASHPATCH_STACK=off asks for that everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flashpatch import diagnostics, masks
from flashpatch.backends.base import ChainBackend, Problem


class Mode(enum.Enum):
    SPECULATE = "speculate"  # chain backends' outputs taken as they are, backends recorded
    FALLBACK = "fallback"  # each chain backend's exact fallback, no conditional


@dataclasses.dataclass
class Decision:
    """The stack call being traced on this thread, and what its layers ran."""

    mode: Mode
    ran: dict[tuple[str, Problem], ChainBackend] = dataclasses.field(default_factory=dict)
    mask_shapes: set[tuple[int, ...]] = dataclasses.field(default_factory=set)

    def record(self, backend: ChainBackend, problem: Problem, mask_shape: tuple[int, ...]) -> None:
        self.ran[(backend.name, problem)] = backend
        self.mask_shapes.add(tuple(mask_shape))


_local = threading.local()


def current() -> Decision | None:
    """The decision of the stack call being traced on this thread, or None (each layer decides)."""
    return getattr(_local, "decision", None)


@contextmanager
def deciding(decision: Decision | None) -> Iterator[Decision | None]:
    saved = current()
    _local.decision = decision
    try:
        yield decision
    finally:
        _local.decision = saved


#: FLASHPATCH_STACK: "auto" (default: decide once per stack where this JAX allows it), "off" (each layer
#: decides, as before) or "force" (once per stack even where JAX keeps copies of the inputs: for timing
#: on such a JAX only, as it costs memory about the size of the stack's parameters). Read once per process.
STACK_ENV = "FLASHPATCH_STACK"
STACK_CHOICES = ("auto", "off", "force")


@functools.cache
def policy() -> str:
    value = os.environ.get(STACK_ENV, "auto").strip().lower() or "auto"
    if value not in STACK_CHOICES:
        diagnostics.warn_once(
            ("stack-env", value),
            f"environment variable {STACK_ENV} must be one of {', '.join(STACK_CHOICES)}; got {value!r}, so "
            "it is taken as auto",
        )
        return "auto"
    return value


@functools.cache
def cond_forwards_inputs() -> bool:
    """Whether this JAX's conditional keeps, as residuals, references to its inputs rather than copies.

    Asked of JAX itself: linearize a conditional whose second branch is rematerialised (its residuals are
    its inputs) and count the outputs of the conditional that runs forward. Without forwarding, it also
    writes those inputs (zeros in the first branch), one output more.
    """

    def f(x, pred):
        return lax.cond(pred, lambda: x, jax.checkpoint(lambda: jnp.sin(x) * x))

    def lin(x):
        return jax.linearize(lambda y: f(y, True), x)[0]

    jaxpr = jax.make_jaxpr(lin)(jnp.ones(3))
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    return len(conds) == 1 and len(conds[0].outvars) == 1


def eligible(module: nn.Module) -> bool:
    """Whether the decision for `module`'s stack can be taken once (see the module docstring)."""
    if module.is_initializing():
        return False
    mutable = module.scope.mutable
    if mutable not in (False, (), []):
        return False
    chosen = policy()
    return chosen == "force" or (chosen == "auto" and cond_forwards_inputs())


def decide(
    module: nn.Module,
    call: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    mask: jax.Array,
) -> Any:
    """`call(*args, **kwargs)` (the stack `module`'s own call) under one decision; `mask` (B, T, S) bool.

    Returns the stack's outputs, exact: the fast ones where every chain backend that ran accepts `mask`,
    else the exact fallback's.
    """
    speculation = Decision(Mode.SPECULATE)
    with deciding(speculation):
        fast = call(*args, **kwargs)
    if not speculation.ran:
        return fast  # no chain backend ran: nothing to decide
    if any(backend.refuses_openpi_masks(problem) for (_, problem), backend in speculation.ran.items()):
        return call(*args, **kwargs)  # each layer decides: a refusal then costs the exact path alone
    if speculation.mask_shapes != {tuple(mask.shape)}:
        # The layers saw masks of other shapes than the stack call's: the decision cannot be read from it.
        diagnostics.info_once(
            ("stack-shapes", type(module).__qualname__),
            f"{type(module).__qualname__}: its layers' masks {sorted(speculation.mask_shapes)} are not the "
            f"stack's {tuple(mask.shape)}; each layer decides for itself",
        )
        return call(*args, **kwargs)

    plan = masks.analyze(mask)
    accepted = functools.reduce(
        jnp.logical_and, [backend.accepts(plan, problem) for (_, problem), backend in speculation.ran.items()]
    )
    names = sorted({name for name, _ in speculation.ran})
    diagnostics.info_once(
        ("stack", type(module).__qualname__, *names),
        f"{type(module).__qualname__}: {', '.join(names)} checked once per call for all its layers' masks",
    )

    def keep(_):
        return fast

    def exact(mdl):
        _warn_fallback_ran(names)

        def run(inner):
            with deciding(Decision(Mode.FALLBACK)):
                return type(inner).__call__(inner, *args, **kwargs)

        return nn.remat(run)(mdl)

    return nn.cond(accepted, keep, exact, module)


def _warn_fallback_ran(names: list[str]) -> None:
    """Warn once, at run time, from inside the fallback branch (a callback without operands)."""

    def say() -> None:
        diagnostics.warn_once(
            ("structure", "stack", *names),
            f"a mask does not have the structure {', '.join(names)} computes, so the exact path ran for the "
            "whole layer stack (the fast one had run first; such masks cost more than openpi's own attention)",
        )

    jax.debug.callback(say)
