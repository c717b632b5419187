"""Numerics helpers shared by the tests."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from flashpatch.backends.xla import XlaBackend
from flashpatch.testing.conformance import TOL, assert_finite, rel_err  # noqa: F401 - the tests' shared checks


def tree_rel_err(out, ref) -> float:
    """Largest rel_err over matching leaves of two pytrees."""
    errs = jax.tree.leaves(jax.tree.map(rel_err, out, ref))
    return max(errs) if errs else 0.0


def normal(key, shape, dtype, scale: float = 1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


#: XLA:CPU options that cut the compile time of the small test models about five-fold (legacy
#: fusion emitters, no LLVM optimisation, one codegen unit). They change code generation only;
#: both sides of every comparison are compiled with the same options.
_FAST_COMPILE_WANTED = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
    "xla_cpu_parallel_codegen_split_count": 1,
}


def _accepted(options: dict) -> dict:
    """The options this XLA knows (XLA drops and renames compile options between JAX releases)."""
    kept = {}
    for name, value in options.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={**kept, name: value}).lower(1.0).compile()
        except Exception:  # an unknown option is an INVALID_ARGUMENT at compile time
            continue
        kept[name] = value
    return kept


FAST_COMPILE = _accepted(_FAST_COMPILE_WANTED)


def fast_jit(fn, **kwargs):
    """jax.jit with FAST_COMPILE, for tests whose time goes into compiling."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


class CountingXla(XlaBackend):
    """The xla backend, counting the attention calls traced through it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def attend(self, q, k, v, mask, problem):
        self.calls += 1
        return super().attend(q, k, v, mask, problem)


def computations(hlo: str) -> dict[str, str]:
    """Optimised HLO text split into its computations, by name."""
    found = {}
    for block in re.split(r"\n(?=(?:ENTRY )?%)", hlo):
        match = re.match(r"(?:ENTRY )?%([\w.\-]+)", block)
        if match:
            found[match.group(1)] = block
    return found


def called(name: str, comps: dict[str, str]) -> set[str]:
    """`name` and every computation it calls, transitively."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in comps:
            continue
        seen.add(current)
        todo += re.findall(r"(?:body|condition|to_apply|calls|branch_computations)=\{?%([\w.\-]+)", comps[current])
        for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[current]):
            todo += re.findall(r"%([\w.\-]+)", group)
    return seen


def openpi_problem(**changes):
    """A `Problem` of openpi's shapes on a GPU (8 query heads, 1 kv head, head dim 256, bf16), with `changes`."""
    from flashpatch.backends.base import Problem

    fields = dict(
        batch=2,
        q_len=51,
        kv_len=867,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        q_dtype="bfloat16",
        k_dtype="bfloat16",
        v_dtype="bfloat16",
        probs_dtype="bfloat16",
        platform="gpu",
    )
    return Problem(**{**fields, **changes})


def sorts_in_a_layer_loop(backend: str, case: str, dtype: str) -> tuple[int, int]:
    """(sorts in the compiled program, sorts inside its layer loop) for `backend` under a 4-layer scan, as
    openpi's nn.scan runs attention: a mask analysis that depends on the mask alone belongs outside the loop."""
    import flashpatch
    from flashpatch.testing import conformance

    q, k, v, mask = conformance.CASES[case].arrays(dtype)

    def layers(q, k, v, mask):
        step = lambda x, _: (flashpatch.attention(x, k, v, mask, settings=backend), None)  # noqa: E731
        return jax.lax.scan(step, q, None, length=4)[0]

    hlo = jax.jit(layers).lower(q, k, v, mask).compile().as_text()
    comps = computations(hlo)
    bodies = re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)
    assert bodies, "expected the scan to stay a loop"
    inside = set().union(*(called(body, comps) for body in bodies))
    return hlo.count(" sort("), sum(comps[name].count(" sort(") for name in inside)
