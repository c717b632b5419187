"""Attention core alone: openpi's shapes and pi0 mask (padding mid-sequence), forward and forward+backward."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import flashpatch
from flashpatch.backends.reference import reference_attention
from flashpatch.bench.harness import Harness, Lazy, Variant
from flashpatch.bench.records import Record
from flashpatch.testing import layouts
from flashpatch.testing.conformance import rel_err

CASES = ("fwd", "fwd_bwd")
#: Backward FLOPs as a multiple of forward (two matmuls forward, five backward).
BACKWARD_FLOP_RATIO = 2.5
#: Query rows per chunk of the float32 reference (bounds its memory to chunk x S logits).
REFERENCE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Inputs:
    sets: list[tuple[jax.Array, ...]]  # (q, k, v, mask, dout), fresh random data per set, one mask
    pairs: int  # unmasked (query, key) pairs over the batch


def make_inputs(harness: Harness, size: int) -> Inputs:
    """pi0's training layout at T = S = size: three images (the middle one missing in odd rows),
    a prompt with padding, then state and action tokens; bf16 q (scaled like openpi), k, v, dout."""
    o = harness.options
    layout = layouts.pi0(o.core_batch, size - o.action_horizon - 1, actions=o.action_horizon, masked_image=1)
    dense = layout.mask  # built on each access: keep it
    mask = jnp.asarray(dense)[:, None]
    b, n, kv, h = o.core_batch, o.num_heads, o.num_kv_heads, o.head_dim
    sets = []
    for i in range(o.input_sets):
        kq, kk, kv_, kd = jax.random.split(jax.random.PRNGKey(o.seed * 1000 + i), 4)
        q = (jax.random.normal(kq, (b, size, n, h)) * h**-0.5).astype(jnp.bfloat16)
        k = jax.random.normal(kk, (b, size, kv, h)).astype(jnp.bfloat16)
        v = jax.random.normal(kv_, (b, size, kv, h)).astype(jnp.bfloat16)
        dout = jax.random.normal(kd, (b, size, n, h)).astype(jnp.bfloat16)
        sets.append((q, k, v, mask, dout))
    return Inputs(sets=sets, pairs=int(np.sum(dense)))


def _reference_f32(q, k, v, mask):
    """Dense float32 attention, query rows in chunks (openpi's math, less memory), highest precision."""
    b, t, n, h = q.shape
    chunk = math.gcd(t, REFERENCE_CHUNK)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    rows = q32.reshape(b, t // chunk, chunk, n, h).swapaxes(0, 1)
    masks = mask[:, 0].reshape(b, t // chunk, chunk, -1).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        return reference_attention(args[0], k32, v32, args[1], jnp.float32)

    out = lax.map(one, (rows, masks))
    return out.swapaxes(0, 1).reshape(b, t, n, h)


def make_reference(inputs: Lazy[Inputs]) -> dict[str, object]:
    """float32 output and gradients on the first input set."""
    q, k, v, mask, dout = inputs.get().sets[0]
    with jax.default_matmul_precision("highest"):

        @jax.jit
        def forward_and_grads(q, k, v, mask, dout):
            out, pullback = jax.vjp(lambda q, k, v: _reference_f32(q, k, v, mask), q, k, v)
            return out, pullback(dout.astype(jnp.float32))

        out, grads = forward_and_grads(q, k, v, mask, dout)
        return {"out": out, "grads": grads}


def _attend(backend: str, q, k, v, mask):
    settings = flashpatch.Settings(backend=backend)
    return flashpatch.attention(q, k, v, mask, probs_dtype=jnp.bfloat16, settings=settings, site="bench.core")


def _fwd(backend: str, q, k, v, mask, dout):
    del dout
    return _attend(backend, q, k, v, mask)


def _fwd_bwd(backend: str, q, k, v, mask, dout):
    out, pullback = jax.vjp(functools.partial(_attend, backend, mask=mask), q, k, v)
    return out, pullback(dout)


def _case(harness: Harness, variant: Variant, case: str, inputs: Lazy[Inputs], reference: Lazy[dict]):
    o = harness.options

    def body(rec: Record) -> None:
        data = inputs.get()
        fn = functools.partial(_fwd if case == "fwd" else _fwd_bwd, variant.backend)
        compiled = harness.compile(rec, variant, fn, *data.sets[0])
        sets = data.sets
        result = harness.time(rec, "call", lambda i: compiled(*sets[i % len(sets)]))
        rec.ms = result.median_ms
        flops = 4 * o.num_heads * o.head_dim * data.pairs * (1 if case == "fwd" else 1 + BACKWARD_FLOP_RATIO)
        rec.metrics["tflops"] = flops / (result.median_ms * 1e-3) / 1e12
        got = compiled(*sets[0])
        try:
            ref = reference.get()
        except Exception as err:  # the float32 reference may not fit where the path under test does
            rec.notes.append(f"no rel_err: float32 reference failed ({type(err).__name__})")
            return
        if case == "fwd":
            rec.metrics["rel_err"] = rel_err(got, ref["out"])
        else:
            rec.metrics["rel_err"] = max(rel_err(g, r) for g, r in zip(got[1], ref["grads"], strict=True))

    return body


def run(harness: Harness) -> None:
    o = harness.options
    harness.budget.begin("core")
    for size in o.core_sizes:
        inputs = Lazy(functools.partial(make_inputs, harness, size))
        reference = Lazy(functools.partial(make_reference, inputs))
        for case in CASES:
            for variant in harness.variants:
                harness.run_case(
                    "core", case, variant, size, o.core_batch, _case(harness, variant, case, inputs, reference)
                )
        inputs.drop()
        reference.drop()
