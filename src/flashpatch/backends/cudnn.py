"""cuDNN flash attention, through `jax.nn.dot_product_attention(..., implementation="cudnn")`.

Each call picks, in-graph, one of two ways to hand the mask to cuDNN:

- padding-right masks (row t attends key s iff t < q_len[b] and s < kv_len[b], as a padded
  bidirectional prefix or a decode step over a left-aligned cache has) go in as per-example
  sequence lengths: no (B, T, S) bias is built, read or differentiated;
- every other mask goes in dense, as a (B, 1, T, S) bool mask that JAX turns into an additive bias.

The test is exact (the lengths rebuild the mask or the dense path runs), costs one elementwise pass
over the mask, and sits in a `lax.cond`, so only one cuDNN call runs. `is_causal` is never used:
openpi's block-causal masks are not plain causal, and cuDNN's causal decode with grouped-query
heads has been reported wrong.

What cuDNN is spared: rows that attend no key (their output is replaced by the caller) get a zero
query and attend key 0 only, so their softmax and gradients stay finite; keys that no row attends
get a zero key, so NaN/inf padding cannot reach other rows through the additive bias. JAX's cuDNN
path refuses odd T or S under differentiation, so odd lengths get one masked row or key appended.

Nothing GPU-only is imported here: the cuDNN version and the GPU are read inside `unsupported`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flashpatch import versions
from flashpatch.backends import machine
from flashpatch.backends.base import DenseBackend, Problem

#: JAX's own cuDNN attention tests require cuDNN 8.9.4 and an Ampere (sm80) or newer GPU.
MIN_CUDNN_VERSION = 8904
MIN_CAPABILITY = (8, 0)
#: cuDNN takes head dims that are multiples of 8, up to 128, or up to 256 on Hopper with cuDNN 9.5+.
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 128
MAX_HEAD_DIM_HOPPER = 256
HOPPER = (9, 0)
LARGE_HEAD_DIM_MIN_CUDNN = 90500
#: Head dims above 128 in training (the backward) on Blackwell: NVIDIA's TransformerEngine routes them to cuDNN on
#: compute capability 10.x only, from cuDNN 9.23 (`nvte_get_fused_attn_backend` in
#: transformer_engine/common/fused_attn/fused_attn.cpp: "d_qk = d_v = 256 + SM10x ... BE 9.23+ + bprop"), and on
#: 12.x not at all; JAX's own check lets both through from jax 0.8.2, and cuDNN then finds no engine at compile
#: time. flashpatch follows TransformerEngine's table (the compile guard catches what it misses).
BLACKWELL = (10, 0)
BLACKWELL_LARGE_HEAD_DIM_MIN_CUDNN = 92300
RTX_BLACKWELL = (12, 0)


def cudnn_version() -> int | None:
    """The cuDNN JAX has loaded (90501 for 9.5.1); None without one (`machine.cudnn_version`)."""
    return machine.cudnn_version()


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default device if it is an NVIDIA GPU under CUDA; None otherwise (`machine.gpu`)."""
    found = machine.gpu()
    return None if found is None else found.capability


def shape_limits(problem: Problem) -> str | None:
    """Why cuDNN cannot take `problem`'s dtypes or shapes on any GPU, or None."""
    if not problem.half_kv:
        return (
            f"k and v must share a half-precision dtype (bfloat16, float16); got {problem.k_dtype}, {problem.v_dtype}"
        )
    h = problem.head_dim
    if h % HEAD_DIM_MULTIPLE or h > MAX_HEAD_DIM_HOPPER:
        return f"the head dim must be a multiple of {HEAD_DIM_MULTIPLE} and at most {MAX_HEAD_DIM_HOPPER}; got {h}"
    if problem.kv_len == 1:
        return "cuDNN is reported to have no backward pass for a single key (kv length 1)"
    return None


def hardware_limits(head_dim: int, version: int | None, capability: tuple[int, int] | None) -> str | None:
    """Why the GPU or cuDNN at hand cannot run a head dim of `head_dim`, or None."""
    if capability is None:
        return "cuDNN needs an NVIDIA GPU under CUDA"
    if version is None:
        return "JAX reports no cuDNN (jax._src.lib.cuda_versions is missing or empty)"
    gpu = f"compute capability {capability[0]}.{capability[1]}"
    if capability < MIN_CAPABILITY:
        least = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
        return f"cuDNN flash attention needs compute capability {least} or newer; this GPU has {gpu}"
    if version < MIN_CUDNN_VERSION:
        least = machine.cudnn_text(MIN_CUDNN_VERSION)
        return f"cuDNN flash attention needs cuDNN {least} or newer; JAX loaded {machine.cudnn_text(version)}"
    if head_dim > MAX_HEAD_DIM:
        if capability < HOPPER:
            return f"cuDNN takes head dim {head_dim} (> {MAX_HEAD_DIM}) only on Hopper or newer; this GPU has {gpu}"
        if version < LARGE_HEAD_DIM_MIN_CUDNN:
            return (
                f"cuDNN takes head dim {head_dim} (> {MAX_HEAD_DIM}) only with cuDNN "
                f"{machine.cudnn_text(LARGE_HEAD_DIM_MIN_CUDNN)} or newer; JAX loaded {machine.cudnn_text(version)}"
            )
        if capability >= RTX_BLACKWELL:
            return (
                f"cuDNN has no backward for head dim {head_dim} (> {MAX_HEAD_DIM}) on {gpu} (NVIDIA's "
                "TransformerEngine lists none)"
            )
        if capability >= BLACKWELL and version < BLACKWELL_LARGE_HEAD_DIM_MIN_CUDNN:
            return (
                f"cuDNN's backward for head dim {head_dim} (> {MAX_HEAD_DIM}) on {gpu} needs cuDNN "
                f"{machine.cudnn_text(BLACKWELL_LARGE_HEAD_DIM_MIN_CUDNN)} or newer (NVIDIA's TransformerEngine "
                f"requires it); JAX loaded {machine.cudnn_text(version)}"
            )
    return None


class SeqLengths(NamedTuple):
    """A mask read as padding on the right: rows [0, q) attend keys [0, kv), nothing else."""

    q: jax.Array  # (B,) int32, at least 1
    kv: jax.Array  # (B,) int32, at least 1
    exact: jax.Array  # () bool: the lengths rebuild the mask exactly


def padding_right_lengths(mask: jax.Array) -> SeqLengths:
    """Per-example lengths of a (B, T, S) mask, and whether they reproduce it.

    An example with no key at all gets lengths 1 and 1 (cuDNN is not given empty sequences); its
    rows are replaced by the caller.
    """
    t, s = mask.shape[1:]
    q_len = jnp.sum(jnp.any(mask, axis=2), axis=1, dtype=jnp.int32)
    kv_len = jnp.sum(jnp.any(mask, axis=1), axis=1, dtype=jnp.int32)
    rows = jnp.arange(t)[None, :, None] < q_len[:, None, None]
    cols = jnp.arange(s)[None, None, :] < kv_len[:, None, None]
    exact = jnp.all((rows & cols) == mask)
    return SeqLengths(jnp.maximum(q_len, 1), jnp.maximum(kv_len, 1), exact)


def dense_mask(mask: jax.Array) -> jax.Array:
    """The (B, T, S) mask cuDNN gets: rows that attend nothing attend key 0 instead (outputs replaced later)."""
    empty = ~jnp.any(mask, axis=2, keepdims=True)
    return mask | (empty & (jnp.arange(mask.shape[2]) == 0))


def even_rows(x: jax.Array) -> jax.Array:
    """x (B, L, ...) with one zero row appended along L where L is odd."""
    if x.shape[1] % 2 == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))


def pad_to_even(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
    """Append one zero query row / key, masked out, where T / S is odd.

    Under differentiation JAX's cuDNN path refuses odd lengths (its check counts the placeholder it
    passes for "no bias" as a bias), with a dense mask or with sequence lengths alike.
    """
    pad_t, pad_s = q.shape[1] % 2, k.shape[1] % 2
    return even_rows(q), even_rows(k), even_rows(v), jnp.pad(mask, ((0, 0), (0, pad_t), (0, pad_s)))


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    out_dtype,
    *,
    use_seq_lengths: bool = True,
    implementation: str = "cudnn",
) -> jax.Array:
    """(B, T, N, H) attention of pre-scaled q over (B, T, S) `mask`; rows with no key come out finite.

    k and v must share a half-precision dtype; q is cast to it. `use_seq_lengths=False` sends every
    mask dense. `implementation` goes to `jax.nn.dot_product_attention`: 'xla' runs the same
    preparation anywhere (the CPU tests use it).
    """
    t = q.shape[1]
    rows = jnp.any(mask, axis=2)
    keys = jnp.any(mask, axis=1)
    q = jnp.where(rows[:, :, None, None], q, 0).astype(k.dtype)
    k = jnp.where(keys[:, :, None, None], k, jnp.zeros((), k.dtype))
    q, k, v, mask = pad_to_even(q, k, v, mask)
    attend = functools.partial(jax.nn.dot_product_attention, q, k, v, scale=1.0, implementation=implementation)
    dense = lambda: attend(mask=dense_mask(mask)[:, None])  # noqa: E731
    if use_seq_lengths:
        lengths = padding_right_lengths(mask)
        by_lengths = lambda: attend(query_seq_lengths=lengths.q, key_value_seq_lengths=lengths.kv)  # noqa: E731
        out = lax.cond(lengths.exact, by_lengths, dense)
    else:
        out = dense()
    return out[:, :t].astype(out_dtype)


#: JAX's own head-dim rule for cuDNN attention (`check_is_flash_attention` in
#: jax/_src/cudnn/fused_attention_stablehlo.py): up to 128, or 256 on compute capability exactly 9.0 with cuDNN
#: 9.5+ before jax 0.8.2 (`is_cuda_compute_capability_equal("9.0")`, as in 0.5.3), on 9.0 and newer from 0.8.2
#: (`check_compute_capability("9.0")`, as in 0.12).
JAX_HEAD_DIM_ANY_HOPPER_OR_NEWER = "0.8.2"


def simulated_jax_rule(problem: Problem) -> str | None:
    """`jax_rejects` for a simulated GPU (`machine.simulated`), whose JAX cannot be traced against it: JAX's rule
    by the simulated JAX version. On a real GPU JAX's own checks are traced instead."""
    gpu, jax_version = machine.gpu(), versions.installed("jax")
    if gpu is None or jax_version is None or problem.head_dim <= MAX_HEAD_DIM:
        return None
    any_newer = versions.satisfies(jax_version, f">={JAX_HEAD_DIM_ANY_HOPPER_OR_NEWER}")
    if gpu.capability == HOPPER or (any_newer and gpu.capability >= HOPPER):
        return None
    where = "9.0 or newer" if any_newer else "exactly 9.0"
    return (
        f"JAX's cuDNN attention refuses it: jax {jax_version} takes head dim {problem.head_dim} only on compute "
        f"capability {where}; this GPU has {gpu.capability[0]}.{gpu.capability[1]}"
    )


@functools.lru_cache(maxsize=512)
def jax_rejects(problem: Problem, use_seq_lengths: bool = True) -> str | None:
    """What JAX's own cuDNN checks (they differ across JAX versions) say about `problem`, or None.

    Traces forward and backward abstractly (nothing is compiled or run), so a shape that JAX would
    refuse inside a model falls back instead of raising.
    """
    args = problem.abstract_inputs()

    def loss(q, k, v, mask):
        out = cudnn_attention(q, k, v, mask, jnp.float32, use_seq_lengths=use_seq_lengths)
        return jnp.sum(out)

    try:
        jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), *args)
    except (NotImplementedError, ValueError, RuntimeError) as err:
        return f"JAX's cuDNN attention refuses it: {err}"
    return None


class CudnnBackend(DenseBackend):
    name = "cudnn"
    platforms = ("gpu",)
    #: q may be float32 (gemma_fast keeps it so) and is cast to k's dtype; k and v must be half.
    dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, use_seq_lengths: bool = True, *, implementation: str = "cudnn"):
        self.use_seq_lengths = use_seq_lengths
        #: What `jax.nn.dot_product_attention` is asked for: 'xla' runs the same preparation anywhere (CPU tests).
        self.implementation = implementation

    def unsupported(self, problem: Problem) -> str | None:
        reason = super().unsupported(problem) or shape_limits(problem)
        if reason is None:
            reason = hardware_limits(problem.head_dim, cudnn_version(), compute_capability())
        if reason is None:
            reason = (
                simulated_jax_rule(problem) if machine.is_simulated() else jax_rejects(problem, self.use_seq_lengths)
            )
        return reason

    def attend(self, q, k, v, mask, problem: Problem):
        return cudnn_attention(
            q, k, v, mask, problem.out_dtype, use_seq_lengths=self.use_seq_lengths, implementation=self.implementation
        )
