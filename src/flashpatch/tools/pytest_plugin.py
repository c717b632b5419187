"""pytest plugin: `pytest --flashpatch [--flashpatch-backend NAME]` runs the whole session patched.

`--flashpatch-backend NAME` alone implies `--flashpatch`: naming a backend asks for it, and a session that
quietly ran unpatched instead would look like a passing patched run.
"""

from __future__ import annotations

import pytest

from flashpatch import backends

#: JAX (from 0.11.2) warns at every Pallas Triton lowering that the backend is deprecated. In a session that runs
#: flashpatch, the warning is about flashpatch's `pallas` kernel, which the tests' authors did not write and cannot
#: change (docs/user-guide.md, "The Pallas Triton deprecation"); a user's own Pallas Triton kernels still warn
#: in sessions without --flashpatch.
PALLAS_TRITON_DEPRECATION = "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flashpatch")
    group.addoption(
        "--flashpatch",
        action="store_true",
        default=False,
        help="run every test with openpi's attention patched by flashpatch (process-wide)",
    )
    group.addoption(
        "--flashpatch-backend",
        default=None,
        metavar="NAME",
        help=f"backend for --flashpatch, which it implies: {', '.join(backends.choices())} (default auto)",
    )


def _backend(config: pytest.Config) -> str | None:
    """The backend the session runs patched with; None: flashpatch stays off."""
    named = config.getoption("flashpatch_backend")
    if named is None and not config.getoption("flashpatch"):
        return None
    return "auto" if named is None else named


def pytest_configure(config: pytest.Config) -> None:
    backend = _backend(config)
    if backend is None:
        return
    import flashpatch

    try:
        flashpatch.install(backend=backend)
    except ValueError as err:
        raise pytest.UsageError(f"--flashpatch-backend: {err}") from err
    config.add_cleanup(flashpatch.uninstall)
    config.addinivalue_line("filterwarnings", PALLAS_TRITON_DEPRECATION)


def pytest_report_header(config: pytest.Config) -> str | None:
    backend = _backend(config)
    return None if backend is None else f"flashpatch: installed process-wide, backend={backend}"
