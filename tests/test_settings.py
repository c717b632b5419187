"""Settings and the FLASHPATCH* environment variables: what they accept, and errors that name them."""

from __future__ import annotations

import re

import pytest

import flashpatch
from flashpatch.switch import interception, state
from flashpatch.switch.settings import Settings, from_env


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes", " 1 "])
def test_flag_on(value: str) -> None:
    assert from_env({"FLASHPATCH": value}) == Settings(backend="auto", verify=False)


@pytest.mark.parametrize("value", ["0", "false", "off", "No", "", "  "])
def test_flag_off(value: str) -> None:
    assert from_env({"FLASHPATCH": value}) is None


def test_unset_is_off() -> None:
    assert from_env({}) is None


@pytest.mark.parametrize(("value", "backend"), [("xla", "xla"), (" Reference ", "reference"), ("", "auto")])
def test_backend_variable(value: str, backend: str) -> None:
    assert from_env({"FLASHPATCH": "1", "FLASHPATCH_BACKEND": value}) == Settings(backend=backend)


@pytest.mark.parametrize(("value", "verify"), [("1", True), ("on", True), ("0", False), ("", False)])
def test_verify_variable(value: str, verify: bool) -> None:
    assert from_env({"FLASHPATCH": "1", "FLASHPATCH_VERIFY": value}).verify is verify


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHPATCH", "on")
    monkeypatch.setenv("FLASHPATCH_BACKEND", "xla")
    monkeypatch.setenv("FLASHPATCH_VERIFY", "yes")
    assert from_env() == Settings(backend="xla", verify=True)


@pytest.mark.parametrize(
    ("variable", "bad"), [("FLASHPATCH", "maybe"), ("FLASHPATCH_BACKEND", "nope"), ("FLASHPATCH_VERIFY", "2")]
)
def test_bad_values_name_the_variable(variable: str, bad: str) -> None:
    environ = {"FLASHPATCH": "1", variable: bad}
    with pytest.raises(ValueError, match=f"environment variable {variable} must be .*; got '{bad}'"):
        from_env(environ)


def test_other_variables_are_not_read_while_off() -> None:
    assert from_env({"FLASHPATCH": "0", "FLASHPATCH_BACKEND": "nope", "FLASHPATCH_VERIFY": "2"}) is None


def test_bad_backend_names_the_argument() -> None:
    with pytest.raises(
        ValueError,
        match=r"backend must be one of auto, reference, xla, kvax, cudnn, cudnn_split, flash, pallas; got 'nope'",
    ):
        Settings(backend="nope")


def test_verify_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="verify must be a bool"):
        Settings(verify="yes")  # type: ignore[arg-type]


def test_settings_are_hashable_values_with_distinct_cache_keys() -> None:
    assert Settings("xla") == Settings("xla") and hash(Settings("xla")) == hash(Settings("xla"))
    keys = {Settings(b, verify=v).cache_key for b in flashpatch.backend_choices() for v in (False, True)}
    assert len(keys) == 2 * len(flashpatch.backend_choices())


def test_bad_enable_opens_nothing() -> None:
    with pytest.raises(ValueError, match="backend"):
        flashpatch.enable("nope")
    with pytest.raises(ValueError, match="backend"):
        flashpatch.install("nope")
    assert state.current() is None and flashpatch.installed() is None
    assert not interception.bound_targets()


def test_backend_names_follow_the_registry() -> None:
    """Settings, FLASHPATCH_BACKEND and backend_choices() read the one registry: a new backend is accepted
    everywhere once registered, and nowhere after."""
    from flashpatch import backends
    from flashpatch.backends.xla import XlaBackend

    assert flashpatch.backend_choices() == ("auto", *backends.names())
    with pytest.raises(ValueError, match="got 'toy'"):
        Settings(backend="toy")
    backends.register("toy", XlaBackend)
    try:
        assert "toy" in flashpatch.backend_choices()
        assert Settings(backend="toy").backend == "toy"
        assert from_env({"FLASHPATCH": "1", "FLASHPATCH_BACKEND": "toy"}) == Settings(backend="toy")
    finally:
        backends.unregister("toy")
    with pytest.raises(ValueError, match="FLASHPATCH_BACKEND"):
        from_env({"FLASHPATCH": "1", "FLASHPATCH_BACKEND": "toy"})


def test_a_bad_flag_lists_every_accepted_spelling() -> None:
    """`FLASHPATCH=yes` works, so the error for a typo must say so (it listed 1/0/true/false/on/off only)."""
    with pytest.raises(ValueError, match="environment variable FLASHPATCH must be") as caught:
        from_env({"FLASHPATCH": "maybe"})
    listed = set(re.findall(r"\w+", str(caught.value).split("; got")[0]))
    assert {"1", "true", "on", "yes", "0", "false", "off", "no", "empty"} <= listed, caught.value
