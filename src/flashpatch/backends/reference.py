"""openpi's own attention math, operation for operation: the baseline every backend must match."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flashpatch.backends.base import DenseBackend, Problem

#: The fill openpi uses for masked logits (see gemma/modules.py upstream), not -inf: a row with
#: no key then gets a uniform softmax, i.e. the mean of V, instead of NaN.
BIG_NEG = -2.3819763e38


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, probs_dtype) -> jax.Array:
    """Dense attention exactly as openpi computes it; materialises (B, K, G, T, S) float32 logits."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q5 = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q5, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(probs_dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return encoded.reshape(b, t, n, h)


class ReferenceBackend(DenseBackend):
    """openpi's own math as a backend name (`enable("reference")`, the drift guard's yardstick).

    The core calls `reference_attention` itself for it (rows with no key keep openpi's own value,
    not the core's fill), and the registry will not let it be replaced: it is what every other
    backend is compared with.
    """

    name = "reference"
    dtypes = ("float32", "bfloat16", "float16", "float64")

    def attend(self, q, k, v, mask, problem: Problem):
        return reference_attention(q, k, v, mask, problem.probs_dtype)
