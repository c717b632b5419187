"""pytest plugin: `pytest --flashpatch [--flashpatch-backend NAME]` runs the whole session patched."""

from __future__ import annotations

import pytest

from flashpatch import backends


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
        default="auto",
        metavar="NAME",
        help=f"backend for --flashpatch: {', '.join(backends.choices())} (default auto)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("flashpatch"):
        return
    import flashpatch

    try:
        flashpatch.install(backend=config.getoption("flashpatch_backend"))
    except ValueError as err:
        raise pytest.UsageError(f"--flashpatch-backend: {err}") from err
    config.add_cleanup(flashpatch.uninstall)


def pytest_report_header(config: pytest.Config) -> str | None:
    if not config.getoption("flashpatch"):
        return None
    return f"flashpatch: installed process-wide, backend={config.getoption('flashpatch_backend')}"
