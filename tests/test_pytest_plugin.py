"""`pytest --flashpatch [--flashpatch-backend NAME]`: inner pytest sessions (pytester, in this process)."""

from __future__ import annotations

import importlib.metadata

import pytest

import flashpatch
from flashpatch.switch import interception


def _plugin_args() -> list[str]:
    """Where flashpatch is pip-installed pytest loads the plugin by its entry point; else name it with -p."""
    installed = any(
        ep.value == "flashpatch.tools.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "flashpatch.tools.pytest_plugin"]


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """An inner session that starts from flashpatch off, even when this session runs with --flashpatch
    (the autouse fixture in conftest.py puts this session's install back afterwards)."""
    flashpatch.uninstall()
    return pytester


def _inner_test(expected: str) -> str:
    return f"""
import flashpatch

def test_state():
    installed = flashpatch.installed()
    assert {expected}, installed
"""


def test_flag_installs_for_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(_inner_test('installed is not None and installed.backend == "xla"'))
    result = pytester.runpytest_inprocess("--flashpatch", "--flashpatch-backend", "xla", *_plugin_args())
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["flashpatch: installed process-wide, backend=xla"])
    assert flashpatch.installed() is None, "the session's install outlived it"
    assert interception.bound_targets() == {}


def test_default_backend_is_auto(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(_inner_test('installed is not None and installed.backend == "auto"'))
    pytester.runpytest_inprocess("--flashpatch", *_plugin_args()).assert_outcomes(passed=1)


def test_without_flag_nothing_is_installed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(_inner_test("installed is None"))
    result = pytester.runpytest_inprocess(*_plugin_args())
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*flashpatch: installed*")


def test_flag_takes_no_value(pytester: pytest.Pytester) -> None:
    """`pytest --flashpatch src/openpi` runs src/openpi: the path is not taken as the option's value."""
    pytester.mkpydir("picked")
    pytester.makepyfile(**{"picked/test_inside": _inner_test("installed is not None")})
    pytester.makepyfile(test_outside="def test_not_collected():\n    raise AssertionError('ran outside the path')\n")
    result = pytester.runpytest_inprocess("--flashpatch", "picked", *_plugin_args())
    result.assert_outcomes(passed=1)


def test_bad_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(_inner_test("True"))
    result = pytester.runpytest_inprocess("--flashpatch", "--flashpatch-backend", "bogus", *_plugin_args())
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --flashpatch-backend: backend must be one of *; got 'bogus'"])
    assert flashpatch.installed() is None


def test_naming_a_backend_alone_turns_flashpatch_on(pytester: pytest.Pytester) -> None:
    """`--flashpatch-backend xla` without `--flashpatch` means patched with xla, never a silent unpatched run."""
    pytester.makepyfile(_inner_test('installed is not None and installed.backend == "xla"'))
    result = pytester.runpytest_inprocess("--flashpatch-backend", "xla", *_plugin_args())
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["flashpatch: installed process-wide, backend=xla"])
    assert flashpatch.installed() is None


def test_a_bad_backend_alone_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(_inner_test("True"))
    result = pytester.runpytest_inprocess("--flashpatch-backend", "bogus", *_plugin_args())
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --flashpatch-backend: backend must be one of *; got 'bogus'"])


_DEPRECATION = """
import warnings

def test_lowers_a_pallas_triton_kernel():
    warnings.warn(
        "The Pallas Triton backend is deprecated and will be removed in a future JAX version.", DeprecationWarning
    )
"""


def test_the_pallas_triton_deprecation_stays_out_of_a_flashpatch_session(pytester: pytest.Pytester) -> None:
    """With --flashpatch the warning concerns flashpatch's own kernel: not in the user's summary. Without it, a
    user's own Pallas Triton kernel still warns."""
    pytester.makepyfile(_DEPRECATION)
    quiet = pytester.runpytest_inprocess("--flashpatch", *_plugin_args())
    quiet.assert_outcomes(passed=1)
    quiet.stdout.no_fnmatch_line("*Pallas Triton backend is deprecated*")
    loud = pytester.runpytest_inprocess(*_plugin_args())
    loud.assert_outcomes(passed=1, warnings=1)
