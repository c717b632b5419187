"""The per-generation compile check of the Pallas kernels, without a GPU (CI runs it through `.ci/generations`).

Two halves, run in two different venvs, because the compiler must not sit in the test venvs (their base-install
check says they hold no triton) and the kernels must be lowered by each JAX flashpatch supports (jax 0.5.3 and
0.12 lower Pallas to Triton differently):

- `lower` (in a stack venv: jax and flashpatch, no triton): for each target generation, JAX exports the three
  kernels (forward, dQ, dK/dV) of the tiling `tiling.config_for` picks there, as JAX lowers them for a CUDA
  device, and writes each kernel's Triton IR as text (`<dir>/<target>-<kernel>.ttir`) beside a manifest
  (`<dir>/manifest.json`) holding its warps, stages, the shared-memory limit of that generation
  (`flashpatch.backends.machine.SHARED_MEMORY`) and `tiling.shared_memory`'s estimate.
- `compile` (in a venv that holds only the `triton` package, no jax): compiles every IR file with Triton's own
  compiler and its bundled ptxas for its target (`triton.compile`, `GPUTarget("cuda", cc, 32)`) and checks the
  shared memory the compiler reports (`metadata.shared`) against the generation's limit, and the estimate
  against that figure. One line per kernel; one `FAIL` line per kernel that does not fit, does not compile, or
  whose estimate is below the compiler's figure; exit status 1 if any.

Which Triton is checked: the `triton` package from PyPI (the version `.ci/generations` installs), not the
Triton that XLA compiles a Pallas call with on the user's GPU (inside jaxlib's CUDA plugin; its version follows
the jaxlib). Both start from the same IR; their allocators may differ by some bytes. docs/architecture.md,
"The per-generation compile check", says what this does and does not show.

    python tests/pallas_generations.py lower DIR [--targets 80,86,...] [--dtypes bfloat16,float32] [--tiling NAME]
    python tests/pallas_generations.py compile DIR [--workers N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

#: The generations checked: compute capability as Triton spells it (major * 10 + minor), and the GPUs of
#: openpi's users each stands for (flashpatch.backends.machine.KNOWN).
TARGETS = {80: "A100", 86: "A6000, RTX 3090", 89: "RTX 4090, L40S", 90: "H100, H200", 100: "B200", 120: "RTX 5090"}
#: openpi's Gemma head dim, and the dtypes its models run attention in (bf16 training, float32 where configured).
HEAD_DIM = 256
DTYPES = ("bfloat16", "float32")
KERNELS = {"flashpatch_attention_fwd": "forward", "flashpatch_attention_dq": "dq", "flashpatch_attention_dkv": "dkv"}
#: The custom call every JAX from 0.5.3 to 0.12 lowers a Pallas Triton kernel to.
TRITON_CALL = "__gpu$xla.gpu.triton"
#: Shapes of the exported call: long enough that every tiling has several tiles, openpi's heads (8 q, 1 kv).
BATCH, TOKENS, HEADS, KV_HEADS = 1, 512, 8, 1


# --- lower: in a stack venv (jax, flashpatch) ---


def _pretend_gpu(cc: int):
    """JAX >= 0.11 asks the local GPU for its compute capability while lowering a Triton call (only float8 casts
    depend on it); answer with a GPU of generation `cc`. JAX before 0.11 asks nothing. Returns an undo callable."""
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
    except ImportError:
        return lambda: None
    info = gpu_info.GpuInfo(gpu_version=None, arch_name=f"{cc // 10}.{cc % 10}", compute_capability=cc)
    registration = pallas_call_registration.gpu_info_lib
    real = registration.get_gpu_info
    registration.get_gpu_info = lambda: info

    def undo() -> None:
        registration.get_gpu_info = real

    return undo


def triton_calls(config, dtype: str, cc: int) -> list[dict]:
    """The Triton kernels of one forward and backward pass with `config`, as JAX lowers them for a CUDA GPU of
    compute capability `cc`: a list of {kernel, num_warps, num_stages, ir (the Triton IR as text)}."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.interpreters import mlir
    from jax._src.lib import triton as jaxlib_triton
    from jax._src.lib.mlir import ir

    from flashpatch.backends.pallas import kernel

    q = jax.ShapeDtypeStruct((BATCH, TOKENS, HEADS, HEAD_DIM), dtype)
    kv = jax.ShapeDtypeStruct((BATCH, TOKENS, KV_HEADS, HEAD_DIM), dtype)
    rank = jax.ShapeDtypeStruct((BATCH, TOKENS), jnp.int32)

    def grads(q, k, v, rank):
        def loss(q, k, v):
            out = kernel.flash_attention(q, k, v, rank, config=config, interpret=False)
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    undo = _pretend_gpu(cc)
    try:
        exported = export.export(
            jax.jit(grads), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
        )(q, kv, kv, rank)
        text = exported.mlir_module()
    finally:
        undo()
    found: list[dict] = []
    with mlir.make_ir_context() as context, ir.Location.unknown():
        module = ir.Module.parse(text)

        def visit(op):
            if op.name == "stablehlo.custom_call" and ir.StringAttr(op.attributes["call_target_name"]).value == (
                TRITON_CALL
            ):
                # api_version 4: a dictionary, which a module printed and parsed again keeps as mhlo.backend_config
                names = [getattr(attr, "name", attr) for attr in op.attributes]  # NamedAttribute (0.5.3) or str
                key = "mhlo.backend_config" if "mhlo.backend_config" in names else "backend_config"
                found.append(op.attributes[key])
            return ir.WalkResult.ADVANCE

        module.operation.walk(visit)
        calls = []
        for config_attr in found:
            attrs = ir.DictAttr(config_attr)
            name = ir.StringAttr(attrs["name"]).value
            kernel_name = next((k for k in KERNELS if name.startswith(k)), name)
            calls.append(
                {
                    "kernel": KERNELS.get(kernel_name, name),
                    "num_warps": ir.IntegerAttr(attrs["num_warps"]).value,
                    "num_stages": ir.IntegerAttr(attrs["num_stages"]).value,
                    "bytecode": ir.StringAttr(attrs["ir"]).value_bytes,
                }
            )
    del context
    # The kernels' IR is MLIR bytecode of Triton's dialect: print it as text where that dialect is registered.
    triton_context = ir.Context()
    jaxlib_triton.dialect.register_dialect(triton_context)
    with triton_context, ir.Location.unknown():
        for call in calls:
            call["ir"] = ir.Module.parse(call.pop("bytecode")).operation.get_asm(enable_debug_info=False)
    return calls


def named_tiling(name: str):
    """A tiling of tiling.py by its name, e.g. 'sm90-128x64'."""
    from flashpatch.backends.pallas import tiling

    known = {c.name: c for c in (*tiling.SM100, *tiling.SM90, *tiling.SM80, *tiling.SM86, tiling.SMALLEST)}
    if name not in known:
        raise SystemExit(f"--tiling must be one of {', '.join(known)}; got {name!r}")
    return known[name]


def lower(out: Path, targets: list[int], dtypes: list[str], forced: str | None = None) -> int:
    """Write each target's kernels' Triton IR and the manifest to `out`; 0 on success.

    `forced`: that tiling (by name) on every target instead of the one `tiling.config_for` picks; the check of
    the check (a tiling that does not fit must fail it).
    """
    import jax

    from flashpatch.backends import machine
    from flashpatch.backends.pallas import gates, tiling

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    missing = gates.backend_missing()
    if missing is not None:  # the product refuses here too (pallas.unsupported): nothing of ours to compile
        print(f"generations: nothing lowered with jax {jax.__version__}: {missing}")
        targets = []
    for cc in targets:
        capability = (cc // 10, cc % 10)
        limit = machine.SHARED_MEMORY[capability]
        for dtype in dtypes:
            config = (
                named_tiling(forced)
                if forced
                else tiling.config_for(f"{capability[0]}.{capability[1]}", HEAD_DIM, dtype)
            )
            estimate = tiling.shared_memory(config, HEAD_DIM, dtype, f"{capability[0]}.{capability[1]}")
            for call in triton_calls(config, dtype, cc):
                stem = f"sm{cc}-{dtype}-{call['kernel']}"
                (out / f"{stem}.ttir").write_text(call["ir"])
                entries.append(
                    {
                        "target": cc,
                        "dtype": dtype,
                        "tiling": config.name,
                        "kernel": call["kernel"],
                        "num_warps": call["num_warps"],
                        "num_stages": call["num_stages"],
                        "limit": limit,
                        "estimate": estimate[call["kernel"]],
                        "ir": f"{stem}.ttir",
                    }
                )
    manifest = {"jax": jax.__version__, "head_dim": HEAD_DIM, "kernels": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"lowered {len(entries)} kernels with jax {jax.__version__} into {out}")
    return 0


# --- compile: in the triton venv (triton only) ---


def compile_one(path: Path, cc: int, num_warps: int, num_stages: int) -> int:
    """Shared memory in bytes that Triton's compiler gives the kernel in `path` on target `cc`."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns while it is unset; no effect on memory
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(
        str(path), target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return int(compiled.metadata.shared)


def _compile_entry(args: tuple[Path, dict]) -> int | str:
    """The compiler's shared-memory figure for one manifest entry, or the first line of its error."""
    directory, entry = args
    try:
        return compile_one(directory / entry["ir"], entry["target"], entry["num_warps"], entry["num_stages"])
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return f"{type(error).__name__}: {first}"


def check(directory: Path, workers: int | None = None) -> int:
    """Compile every kernel of the manifest in `directory` (`workers` processes, default one per core); print one
    line each and one FAIL line per failure; 1 if any failed, else 0."""
    import triton

    manifest = json.loads((directory / "manifest.json").read_text())
    entries = manifest["kernels"]
    source = f"jax {manifest['jax']}, triton {triton.__version__} from PyPI, not XLA's"
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(_compile_entry, [(directory, entry) for entry in entries]))
    failures = 0
    for entry, used in zip(entries, results, strict=True):
        where = f"sm{entry['target']} {entry['dtype']} {entry['tiling']} {entry['kernel']}"
        if isinstance(used, str):
            print(f"FAIL {where}: does not compile for sm{entry['target']} ({source}): {used}")
            failures += 1
            continue
        limit, estimate = entry["limit"], entry["estimate"]
        launch = f"warps {entry['num_warps']} stages {entry['num_stages']}"
        print(
            f"{where} ({launch}): {used} B of {limit} B; tiling.py estimates {estimate} B ({estimate / used - 1:+.0%})"
        )
        if used > limit:
            print(
                f"FAIL {where}: needs {used} B of shared memory, sm{entry['target']} allows {limit} B per block "
                f"({source}): give this generation a smaller tiling in src/flashpatch/backends/pallas/tiling.py"
            )
            failures += 1
        elif estimate < used:
            print(
                f"FAIL {where}: tiling.py estimates {estimate} B, below the compiler's {used} B ({source}): "
                "the estimate must not promise a fit the compiler does not give"
            )
            failures += 1
    print(f"generations: {len(entries) - failures} passed, {failures} failed ({source})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    low = sub.add_parser("lower", help="lower the kernels to Triton IR (a venv with jax and flashpatch)")
    low.add_argument("dir", type=Path)
    low.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    low.add_argument("--dtypes", default=",".join(DTYPES))
    low.add_argument("--tiling", default=None, help="this tiling (by name) on every target: the check's own check")
    comp = sub.add_parser("compile", help="compile the lowered kernels (a venv with triton)")
    comp.add_argument("dir", type=Path)
    comp.add_argument("--workers", type=int, default=None, help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    if args.command == "lower":
        return lower(args.dir, [int(t) for t in args.targets.split(",")], args.dtypes.split(","), args.tiling)
    return check(args.dir, args.workers)


if __name__ == "__main__":
    sys.exit(main())
