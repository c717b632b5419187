"""What a new user hit in their first hour, each fixed: these tests failed before the fixes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashpatch
from flashpatch import interception, settings, verify
from flashpatch.backends.xla import XlaBackend
from flashpatch.bench import records

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    env.update(PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("backend", ["xla", "auto", "reference"])
def test_no_keys_at_all_gives_openpis_zeros(backend: str) -> None:
    """S = 0: openpi's einsum gives zeros; the blockwise path divided by zero."""
    q = jnp.ones((2, 3, 4, 16))
    k = v = jnp.zeros((2, 0, 1, 16))
    mask = jnp.zeros((2, 1, 3, 0), jnp.bool_)
    attend = lambda q: flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend))  # noqa: E731
    out = jax.jit(attend)(q)
    assert out.shape == q.shape and not np.asarray(out).any()
    grad = jax.grad(lambda q: jnp.sum(attend(q)))(q)
    assert np.isfinite(np.asarray(grad)).all()
    assert flashpatch_xla_direct(q, k, v, mask).shape == q.shape


def flashpatch_xla_direct(q, k, v, mask):
    from flashpatch.backends.base import Problem

    problem = Problem.of(q, k, v, q.dtype, jax.default_backend())
    return XlaBackend().attend(q, k, v, mask[:, 0], problem)


def test_leaving_nested_blocks_out_of_order_leaves_nothing_patched() -> None:
    outer, inner = flashpatch.enable("xla"), flashpatch.enable("reference")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        outer.__exit__(None, None, None)
    assert settings.current() is None, "the thread is still patched after its outer block ended"
    inner.__exit__(None, None, None)  # a no-op now, and no second error
    assert settings.current() is None and not interception.bound_targets()


def test_leaving_blocks_out_of_order_leaves_no_stale_jit_key() -> None:
    """After blocks were left out of order, a function jitted while off must still retrace when enabled."""
    from patching import ZeroBackend, ran_patched, tiny_attention

    from flashpatch import backends

    tiny = tiny_attention()
    outer, inner = flashpatch.enable("xla"), flashpatch.enable("reference")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    with backends.override("xla", ZeroBackend()):
        run = jax.jit(lambda params: tiny(params))
        assert not ran_patched(run(tiny.params)), "off, yet the patched path ran"
        with flashpatch.enable("xla"):
            assert ran_patched(run(tiny.params)), "enabled, yet a stale compiled function ran"


def test_verify_reports_inside_flax_scan_on_this_stack() -> None:
    """openpi's Gemma stack is an nn.scan: verify mode must be able to report from inside it."""
    assert verify.works_in_flax_scan(), "verify mode cannot report inside nn.scan with this JAX/flax"


def test_the_first_example_shows_flashpatch_at_work() -> None:
    done = _python(str(ROOT / "examples" / "compare_patched.py"), "--length", "64")
    assert done.returncode == 0, done.stderr
    assert "flashpatch.enable('xla') ran: xla" in done.stdout, done.stdout
    diff = float(done.stdout.split("outputs ")[1].split(",")[0])
    assert 0 < diff < 1e-3, done.stdout  # a real second computation, close to the original
    assert "flashpatch (xla)" in done.stdout


def test_the_first_example_rejects_a_too_short_sequence_in_one_line() -> None:
    done = _python(str(ROOT / "examples" / "compare_patched.py"), "--length", "5")
    assert done.returncode == 2 and "--length must be at least" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_openpi_parity_script_has_a_main() -> None:
    done = _python(str(ROOT / "benchmarks" / "parity" / "openpi_parity.py"), "--help")
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stdout + done.stderr


def test_a_run_records_the_commit_of_a_non_editable_install(tmp_path: pathlib.Path) -> None:
    """pip copies the package out of its checkout; its direct_url.json still names the folder it came from."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run inside a git checkout")
    commit = records.git_commit(package_dir=tmp_path, direct_url={"url": f"file://{ROOT}", "dir_info": {}})
    assert commit is not None and commit.startswith(head.stdout.strip())
    vcs = {"url": "https://example.org/flashpatch.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}
    assert records.git_commit(package_dir=tmp_path, direct_url=vcs) == "abc123"
    assert records.git_commit(package_dir=tmp_path, direct_url={}) is None
