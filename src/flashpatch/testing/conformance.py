"""The conformance kit: the one suite every attention backend runs, for flashpatch's and for yours.

A backend passes when, through flashpatch's public `attention()`, on every mask layout in `CASES`
(openpi's pi0, pi0.5 and pi0-FAST masks with padding mid-sequence, a masked camera, a KV-cache
suffix, one-token decode, batch 1, odd lengths, grouped and plain multi-head attention, and one
arbitrary mask) and each dtype it declares:

- forward and gradients (q, k, v) match openpi's math computed in float32, by relative error (on the
  one mask that is not openpi's, where a chain backend runs openpi's own path, no tighter than that
  path's own error: `tolerances`);
- rows that attend no key hold openpi's value (the mean of V), and nothing is NaN or inf;
- NaN in padding (q of rows that attend nothing, k of keys nobody attends) does not leak;
- two runs on the same inputs are bitwise equal.

What a backend supports it declares (`platforms`, `dtypes`, and `unsupported` per problem); cases it
cannot run here are skipped with the reason, never passed. Each check also asserts that the backend
itself ran: chosen for the call, and on an openpi mask without its in-graph fallback. To check a backend of your own:

    from flashpatch import backends
    from flashpatch.testing import conformance

    backends.register("mine", MyBackend)
    conformance.check_all("mine")            # raises AssertionError naming the first failure

or, in pytest, `@pytest.mark.parametrize(("case", "dtype"), conformance.params("mine"))` and
`conformance.check("mine", conformance.CASES[case], dtype)`. A deliberately broken backend fails
it (tests/test_backend_conformance.py shows two).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.core.verify import AGREEMENT
from flashpatch.testing import layouts

#: Tolerances on rel. error against the float32 reference: float32 inputs land near rounding; bf16
#: inputs carry bf16 rounding of q, k, v and probabilities (openpi's own bf16 path is ~3e-3 off). The same
#: bounds verify mode calls an agreement.
TOL = {dtype: AGREEMENT[dtype] for dtype in ("float32", "bfloat16")}
# Checks raise AssertionError themselves, never by `assert`: the kit must check under `python -O` too.
DTYPES = tuple(TOL)


def rel_err(out, ref, rows=None) -> float:
    """||out - ref|| / ||ref|| in float32, over the rows selected by `rows` (broadcast) if given. NaN stays NaN."""
    out = jnp.asarray(out, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    if rows is not None:
        out = jnp.where(rows, out, 0.0)
        ref = jnp.where(rows, ref, 0.0)
    return float(jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def assert_finite(tree, what: str = "value") -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(jnp.asarray(leaf, jnp.float32))
        if not (np.isfinite(arr).all()):
            raise AssertionError(f"{what} has NaN/inf at {jax.tree_util.keystr(path)}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: a (B, T, S) mask and head shapes; `arrays()` draws fresh inputs."""

    name: str
    mask: np.ndarray  # (B, T, S) bool
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 16
    structured: bool = True  # the mask is block-causal (a chain), as openpi's are

    def arrays(self, dtype, seed: int = 0):
        """Fresh random q (pre-scaled like openpi), k, v and the (B, 1, T, S) mask."""
        b, t, s = self.mask.shape
        key = jax.random.PRNGKey(zlib.crc32(self.name.encode()) + seed)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (b, t, self.num_heads, self.head_dim), jnp.float32) * self.head_dim**-0.5
        k = jax.random.normal(kk, (b, s, self.num_kv_heads, self.head_dim), jnp.float32)
        v = jax.random.normal(kv, (b, s, self.num_kv_heads, self.head_dim), jnp.float32)
        return q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.asarray(self.mask)[:, None]


def _decode_mask(batch: int, cache: int, filled: np.ndarray, start: np.ndarray) -> np.ndarray:
    """pi0-FAST decode step: one query over cache slots [start, filled] (later slots are empty)."""
    idx = np.arange(cache)
    return ((idx[None, :] >= start[:, None]) & (idx[None, :] <= filled[:, None]))[:, None, :]


def _random_mask(batch: int, t: int, s: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, t, s)) < 0.5
    mask[:, 0, :] = False  # one fully masked row
    return mask


def all_cases() -> list[Case]:
    prefix = layouts.pi0(2, 40, actions=9, seed=1)
    return [
        Case("pi0_padding_mid", layouts.pi0(2, 48, actions=10, seed=0).mask),
        Case("pi0_masked_image", layouts.pi0(3, 64, actions=10, masked_image=1, seed=2).mask),
        Case("pi05", layouts.pi0(2, 40, actions=12, state_token=False, seed=3).mask),
        Case("pi0_fast", layouts.pi0_fast(2, 40, causal=13, masked_image=2, seed=4).mask),
        Case("causal_odd", layouts.causal(2, 37).mask),
        Case("prefix_padded", layouts.prefix_only(2, 29, pad=5).mask),
        Case("batch1", layouts.pi0(1, 33, actions=7, seed=5).mask),
        Case("gqa_2kv", layouts.pi0(2, 24, actions=5, seed=6).mask, num_heads=4, num_kv_heads=2),
        Case("mha", layouts.causal(1, 19).mask, num_heads=2, num_kv_heads=2, head_dim=8),
        Case(
            "suffix_over_cache",
            layouts.suffix_over_cache(prefix.valid[:, :40], layouts.pi0(2, 0, actions=9, seed=7)),
        ),
        Case("decode_t1", _decode_mask(2, 41, filled=np.array([17, 30]), start=np.array([0, 4]))),
        Case("arbitrary", _random_mask(2, 21, 23, seed=8), structured=False),
    ]


CASES = {case.name: case for case in all_cases()}


def problem_of(case: Case, dtype: str, platform: str | None = None):
    """The `Problem` the core builds for `case` in `dtype` on this platform (or `platform`)."""
    from flashpatch.backends.base import Problem

    b, t, s = case.mask.shape
    return Problem(
        b, t, s, case.num_heads, case.num_kv_heads, case.head_dim, *[dtype] * 4, platform or jax.default_backend()
    )


def skip_reason(backend: str, dtype: str, platform: str | None = None, case: Case | None = None) -> str | None:
    """Why `backend` is not checked in `dtype` here: what it declares (platforms, dtypes) and, given a
    case, what its `unsupported` says of that case's problem; None where it runs."""
    from flashpatch import backends

    declared = backends.get(backend)
    platform = platform or jax.default_backend()
    if platform not in declared.platforms:
        return f"{backend} runs on {', '.join(declared.platforms)}, not {platform}"
    if dtype not in declared.dtypes:
        return f"{backend} takes {', '.join(declared.dtypes)}, not {dtype}"
    if case is not None:
        return declared.unsupported(problem_of(case, dtype, platform))
    return None


def params(backend: str) -> Iterator[tuple[str, str]]:
    """(case name, dtype) pairs to parametrize a test of `backend` with: those it declares it runs here."""
    for name, case in CASES.items():
        for dtype in DTYPES:
            if skip_reason(backend, dtype, case=case) is None:
                yield name, dtype


def float32_reference(q, k, v, mask):
    """openpi's math in float32 (inputs upcast), the yardstick for every backend and dtype.

    Its products are IEEE float32. On a GPU, XLA's default computes float32 products in TF32, whose
    error is far above the float32 tolerance: with that yardstick exact float32 backends failed on the
    H200, and passed at highest precision. The precision is recorded in the traced products, so
    gradients taken of this function are IEEE float32 too.
    """
    from flashpatch.backends.reference import reference_attention

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        return reference_attention(f32(q), f32(k), f32(v), mask[:, 0], jnp.float32).astype(jnp.float32)


#: On a mask that is not openpi's (`Case.structured` False) a chain backend runs its exact fallback,
#: openpi's own math at the caller's matmul precision, by design; there the bound is also this many
#: times the original's own error (a GPU computes float32 products in TF32 by default).
ORIGINAL_SLACK = 1.5


def original_attention(q, k, v, mask):
    """openpi's attention as openpi runs it: the inputs' dtype, the default matmul precision."""
    from flashpatch.backends.reference import reference_attention

    return reference_attention(q, k, v, mask[:, 0], q.dtype)


def tolerances(case: Case, dtype: str, inputs, refs, loss) -> list[float]:
    """Bounds on rel. error of (out, dq, dk, dv): TOL, and on an unstructured case no tighter than the original's.

    `refs` are the float32 yardstick's output and gradients, `loss` the cotangent-weighted sum the
    gradients are taken of. A backend is never held closer to float32 than openpi's own path on a mask
    where flashpatch promises only to run openpi's own path.
    """
    bounds = [TOL[dtype]] * 4
    if case.structured:
        return bounds
    out = original_attention(*inputs)
    grads = jax.grad(loss(original_attention), argnums=(0, 1, 2))(*inputs)
    return [max(b, ORIGINAL_SLACK * rel_err(o, r)) for b, o, r in zip(bounds, (out, *grads), refs, strict=True)]


def check(backend: str, case: Case, dtype: str) -> None:
    """Raise AssertionError where `backend` does not compute `case` like openpi."""
    import warnings

    import flashpatch
    from flashpatch import diagnostics
    from flashpatch.core import selection

    q, k, v, mask = case.arrays(dtype)
    settings = flashpatch.Settings(backend=backend)
    # The mask is an argument, not a closed-over constant (XLA would constant-fold the analysis).
    attend = jax.jit(lambda q, k, v, mask: flashpatch.attention(q, k, v, mask, settings=settings))
    run = lambda q, k, v: attend(q, k, v, mask)  # noqa: E731
    diagnostics.forget()
    with selection.recording() as chosen, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", diagnostics.FlashpatchWarning)
        out = jax.block_until_ready(run(q, k, v))
    # The backend itself ran: not openpi's attention in its place, nor (on an openpi mask) its fallback.
    if not ([c.backend for c in chosen] == [backend]):
        raise AssertionError(f"{backend} {case.name} {dtype}: {chosen[0].reason}")
    fell_back = [str(w.message) for w in said if "does not have the structure" in str(w.message)]
    if case.structured and fell_back:
        raise AssertionError(f"{backend} {case.name}: its fallback ran ({fell_back[0]})")
    ref = float32_reference(q, k, v, mask)
    if not (out.shape == ref.shape and out.dtype == q.dtype):
        raise AssertionError((out.shape, out.dtype))
    assert_finite(out, "output")
    cot = jax.random.normal(jax.random.PRNGKey(7), out.shape, jnp.float32)

    def loss(f):
        return lambda q, k, v, mask: jnp.sum(f(q, k, v, mask).astype(jnp.float32) * cot)

    want = jax.grad(loss(float32_reference), argnums=(0, 1, 2))(q, k, v, mask)
    bounds = tolerances(case, dtype, (q, k, v, mask), (ref, *want), loss)
    err = rel_err(out, ref)
    if not (err < bounds[0]):
        raise AssertionError(f"{backend} {case.name} {dtype}: forward rel.err {err:.2e} >= {bounds[0]:.2e}")

    grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v, mask)
    assert_finite(grads, "gradients")
    for name, got, exp, bound in zip("qkv", grads, want, bounds[1:], strict=True):
        if not (got.dtype == jnp.dtype(dtype)):
            raise AssertionError((name, got.dtype))
        err = rel_err(got, exp)
        if not (err < bound):
            raise AssertionError(f"{backend} {case.name} {dtype}: d{name} rel.err {err:.2e} >= {bound:.2e}")

    again = run(q, k, v)
    if not (bool(jnp.all(again == out))):
        raise AssertionError(f"{backend} {case.name}: two runs on the same inputs differ")

    # Padding filled with NaN must not leak: q of rows that attend nothing and k of keys that no row
    # attends do not enter openpi's result (v does: empty rows average all of it).
    rows = jnp.any(mask[:, 0], axis=-1)
    keys = jnp.any(mask[:, 0], axis=-2)
    q_nan = jnp.where(rows[:, :, None, None], q, jnp.nan)
    k_nan = jnp.where(keys[:, :, None, None], k, jnp.nan)
    poisoned = run(q_nan, k_nan, v)
    assert_finite(poisoned, "output with NaN padding")
    err = rel_err(poisoned, ref)
    if not (err < bounds[0]):
        raise AssertionError(f"{backend} {case.name}: NaN in padding changed the output (rel.err {err:.2e})")


def check_all(backend: str, dtypes: tuple[str, ...] = DTYPES) -> list[str]:
    """Run every case and dtype `backend` declares here; returns what was skipped and why.

    Raises AssertionError at the first failure, and also when nothing at all could be checked.
    """
    skipped = []
    for name in CASES:
        for dtype in dtypes:
            reason = skip_reason(backend, dtype, case=CASES[name])
            if reason is not None:
                skipped.append(f"{name}/{dtype}: {reason}")
                continue
            check(backend, CASES[name], dtype)
    if not (len(skipped) < len(CASES) * len(dtypes)):
        raise AssertionError(f"{backend}: nothing could be checked here ({skipped[0]})")
    return skipped
