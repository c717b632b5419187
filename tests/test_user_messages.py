"""What a user reads when flashpatch warns: the warning points at the user's own line (or at none), never
at a line inside flashpatch; and a target registered under a module name that does not exist is reported."""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap
import uuid
import warnings

import jax
import jax.numpy as jnp
import pytest

import flashpatch
from flashpatch.switch import interception
from flashpatch.testing import gemma

PACKAGE_DIR = pathlib.Path(flashpatch.__file__).resolve().parent
SRC = PACKAGE_DIR.parent


def _flashpatch_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, flashpatch.FlashpatchWarning)]


def _python(code: str, cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    environ.update(PYTHONPATH=str(SRC), JAX_PLATFORMS="cpu", **env)
    script = cwd / "user_script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=environ, capture_output=True, text=True, timeout=180
    )


def test_a_warning_from_a_patched_model_names_the_callers_line() -> None:
    """The warning's line is the one that called the model, not one inside flashpatch, flax or JAX."""
    cfg = gemma.get_config("tiny")
    attention = gemma.Attention(configs=(cfg,))
    x = jax.ShapeDtypeStruct((1, 4, cfg.width), jnp.float32)
    positions, mask = jnp.arange(4)[None], jnp.tril(jnp.ones((4, 4), bool))[None, None]
    params = jax.eval_shape(lambda x: attention.init(jax.random.PRNGKey(0), [x], positions, mask, None), x)
    with warnings.catch_warnings(record=True) as caught, flashpatch.enable("cudnn"):
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        jax.eval_shape(lambda p, x: attention.apply(p, [x], positions, mask, None), params, x)
    [warning] = _flashpatch_warnings(caught)
    assert "cudnn cannot run this call" in str(warning.message)
    assert (pathlib.Path(warning.filename), warning.lineno) == (pathlib.Path(__file__), line)


def test_a_script_sees_its_own_line_under_the_warning(tmp_path: pathlib.Path) -> None:
    done = _python(
        """
        import jax
        import jax.numpy as jnp
        import flashpatch
        from flashpatch.testing import gemma, register

        register()
        cfg = gemma.get_config("tiny")
        attention = gemma.Attention(configs=(cfg,))
        x, positions, mask = jnp.ones((1, 4, cfg.width)), jnp.arange(4)[None], jnp.ones((1, 1, 4, 4), bool)
        params = attention.init(jax.random.PRNGKey(0), [x], positions, mask, None)
        with flashpatch.enable("cudnn"):
            out = attention.apply(params, [x], positions, mask, None)  # the user's line
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "FlashpatchWarning: flashpatch:" in done.stderr, done.stderr
    assert "user_script.py:13: FlashpatchWarning" in done.stderr, done.stderr
    assert "# the user's line" in done.stderr, done.stderr
    assert str(PACKAGE_DIR) not in done.stderr, done.stderr


def test_a_typo_in_the_environment_shows_no_line_of_flashpatch(tmp_path: pathlib.Path) -> None:
    done = _python("import _flashpatch_autoload\n", tmp_path, FLASHPATCH="1", FLASHPATCH_BACKEND="nonsense")
    assert "FlashpatchWarning: flashpatch is OFF" in done.stderr, done.stderr
    assert "_flashpatch_autoload" not in done.stderr and str(PACKAGE_DIR) not in done.stderr, done.stderr


def test_register_target_with_a_module_that_does_not_exist_warns_once() -> None:
    name = f"fp_no_such_package_{uuid.uuid4().hex[:8]}.models.gemma"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        flashpatch.register_target(name, "Attention")
        flashpatch.register_target(name, "Attention")
    [warning] = _flashpatch_warnings(caught)
    message = str(warning.message)
    assert f"{name}.Attention" in message and "no module named" in message.lower(), message
    assert "check the module name" in message, message
    assert (pathlib.Path(warning.filename), warning.lineno) == (pathlib.Path(__file__), line)


def test_register_target_with_a_missing_submodule_of_an_imported_package_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flashpatch.register_target("flashpatch.testing.gema", "Attention")
    [warning] = _flashpatch_warnings(caught)
    assert "flashpatch.testing.gema.Attention" in str(warning.message)


def test_register_target_of_a_findable_module_neither_warns_nor_imports_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"fp_later_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "gemma.py").write_text(pathlib.Path(gemma.__file__).read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashpatch.register_target(f"{name}.gemma", "Attention")
    assert name not in sys.modules, "registering imported the package"


def test_a_module_that_becomes_importable_later_is_still_patched(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check is a warning, never a refusal: a path added after register_target still gets patched."""
    name = f"fp_late_path_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(pathlib.Path(gemma.__file__).read_text())
    with pytest.warns(flashpatch.FlashpatchWarning, match="if it becomes importable later"):
        flashpatch.register_target(name, "Attention")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with flashpatch.enable("xla"):
            module = importlib.import_module(name)
            assert interception.bound_targets()[f"{name}.Attention"] is module.Attention
    finally:
        sys.modules.pop(name, None)


def test_a_fallback_warning_names_flashpatch_once() -> None:
    """flashpatch's warnings start "flashpatch: " unless the site they name already says flashpatch."""
    q = jnp.zeros((1, 4, 2, 8))
    k = jnp.zeros((1, 4, 1, 8))
    mask = jnp.ones((1, 1, 4, 4), bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flashpatch.attention(q, k, k, mask, settings="cudnn")
        flashpatch.attention(q, k, k, mask, settings="cudnn", site="my_model.Attention")
    texts = [str(w.message) for w in _flashpatch_warnings(caught)]
    assert len(texts) == 2, texts
    assert texts[0].startswith("flashpatch.attention: cudnn cannot run this call"), texts[0]
    assert texts[1].startswith("flashpatch: my_model.Attention: cudnn cannot run this call"), texts[1]
    assert not any("flashpatch: flashpatch" in text for text in texts), texts
