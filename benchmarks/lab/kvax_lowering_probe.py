"""Does the installed jax / jax-triton / triton / kvax stack fit together? Answered on a CPU-only machine.

kvax cannot be imported without a GPU (jax-triton refuses a jaxlib without CUDA), so nothing on CPU
says whether a stack can run kvax. This probe gets one step short of the GPU: it gives jaxlib's
`gpu_triton` module stand-ins for the few CUDA-only objects jax-triton touches, then traces kvax's
flash attention (mask creation, forward and backward, bf16, grouped-query) and lowers it for CUDA.
Lowering runs jax-triton's whole compile path, so every kvax Triton kernel goes through Triton's
front end and back end to PTX for sm_90 (H100). API breaks between jax, jax-triton, triton and kvax
show up here; whether the PTX runs correctly is left to the GPU suite.

    python benchmarks/lab/kvax_lowering_probe.py [--before MODULE] [--capability 90]

--before imports MODULE first (e.g. the kvax compat layer, so its shims apply). Prints one JSON
line; exits 0 when every kernel compiled, 1 when something failed (the error is in the JSON).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTIONS = ("jax", "jaxlib", "jax-triton", "triton", "kvax")


def installed_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


class _KernelStandIn:
    """Takes the place of jaxlib's TritonKernel / TritonKernelCall: keeps the PTX, serializes to nothing."""

    ptx: list[str] = []  # noqa: RUF012 - one list for the whole probe

    def __init__(self, *args: object) -> None:
        for arg in args:
            text = arg.decode(errors="replace") if isinstance(arg, bytes) else arg
            if isinstance(text, str) and ".target" in text and ".version" in text:
                self.ptx.append(text)

    def to_proto(self, *args: object) -> bytes:
        return b""


def stand_in_for_cuda(capability: int) -> None:
    """Give jaxlib's gpu_triton what a CUDA jaxlib has, so that jax-triton imports and lowers."""
    from jax._src.lib import gpu_triton

    for name in ("TritonKernel", "TritonKernelCall", "TritonAutotunedKernelCall"):
        setattr(gpu_triton, name, _KernelStandIn)
    gpu_triton.create_array_parameter = lambda *args: ("array", args)
    gpu_triton.create_scalar_parameter = lambda *args: ("scalar", args)
    gpu_triton.get_compute_capability = lambda device: capability
    gpu_triton.get_serialized_metadata = lambda ptx: b""


def lower_kvax(capability: int) -> dict[str, object]:
    """Lower kvax's masked flash attention, forward and backward, for CUDA; return what was compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from kvax.ops import create_attention_mask, flash_attention
    from kvax.utils import FlashAttentionParamsConfig, attention_specs

    # kvax picks block sizes from the GPU it sees; there is none, so give it its H100 choices.
    fwd = FlashAttentionParamsConfig(query_block_size=128, kv_block_size=128, num_warps=8, num_stages=3)
    bwd = FlashAttentionParamsConfig(query_block_size=64, kv_block_size=128, num_warps=8, num_stages=3)
    batch, length, heads, kv_heads, head_dim = 1, 256, 4, 1, 64
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = (None, None, None, None)

    def loss(q, k, v, positions, segments):
        with mesh, attention_specs(query_specs=replicated, kv_specs=replicated):
            masks = create_attention_mask(
                positions, segments, positions, segments, fwd_params=fwd, bwd_params=bwd, calc_bwd_mask=True, mesh=mesh
            )
            out = flash_attention(
                q, k, v, positions, segments, positions, segments, masks,
                scale=head_dim**-0.5, fwd_params=fwd, bwd_params=bwd, mesh=mesh,
            )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    targets = sorted(
        {line.split()[1] for ptx in _KernelStandIn.ptx for line in ptx.splitlines() if line.startswith(".target")}
    )
    return {
        "triton_custom_calls": text.count("triton_kernel_call"),
        "kernels_compiled": len(_KernelStandIn.ptx),
        "ptx_targets": targets,
    }


def describe(err: BaseException) -> str:
    """The deepest cause's type and last message line, past JAX's traceback wrappers (Triton puts
    the kernel source between its location and its message)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None:
        if type(current).__name__ != "JaxStackTraceBeforeTransformation":
            chain.append(current)
        current = current.__cause__
    root = chain[-1]
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[-1] if lines else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="MODULE", help="import MODULE first (e.g. the kvax compat layer)")
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability to compile for (90: H100)")
    args = parser.parse_args()
    report: dict[str, object] = {"versions": installed_versions(), "capability": args.capability}
    start = time.perf_counter()
    try:
        stand_in_for_cuda(args.capability)
        if args.before:
            importlib.import_module(args.before)
        report.update(lower_kvax(args.capability))
        ok = report["kernels_compiled"] == report["triton_custom_calls"] and report["triton_custom_calls"] > 0
        if not ok:
            report["error"] = "not every Triton custom call came with compiled PTX"
    except Exception as err:  # the probe's answer is the failure itself
        ok = False
        report["error"] = describe(err)
        report["where"] = traceback.extract_tb(err.__traceback__)[-1].filename
    report["ok"] = ok
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
