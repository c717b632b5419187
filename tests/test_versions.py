"""flashpatch.versions against fake version strings, and the installed stack against the tested ranges."""

from __future__ import annotations

import importlib.metadata

import pytest

from flashpatch import versions


def fake(table: dict[str, str]) -> versions.Lookup:
    """A metadata lookup that knows only `table` (missing names raise like importlib.metadata)."""

    def lookup(name: str) -> str:
        if name not in table:
            raise importlib.metadata.PackageNotFoundError(name)
        return table[name]

    return lookup


@pytest.mark.parametrize(
    ("text", "want"),
    [("0.5.3", (0, 5, 3)), (" 0.4.36.dev20241201 ", (0, 4, 36)), ("2.7.1+cu126", (2, 7, 1)), ("3.2.0rc1", (3, 2, 0))],
)
def test_parse_reads_the_forms_our_stacks_use(text: str, want: tuple[int, ...]) -> None:
    assert versions.parse(text).release == want


def test_parse_orders_like_pip() -> None:
    chain = ["0.4.36.dev20241201", "0.4.36", "0.5.3", "0.9.0.1", "0.10.2", "3.2.0rc1", "3.2.0", "3.2.0.post1"]
    parsed = [versions.parse(text) for text in chain]
    assert sorted(reversed(parsed)) == parsed


@pytest.mark.parametrize("text", ["", "jax", "0.5.x", "1..2", "0.5.3-cuda", "+cu126"])
def test_parse_rejects_non_versions(text: str) -> None:
    with pytest.raises(ValueError, match="version must look like"):
        versions.parse(text)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="version must be a str"):
        versions.parse(0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ("0.5.3", ">=0.5.3,<0.6", True),
        ("0.6.0", ">=0.5.3,<0.6", False),
        ("0.5.2", ">=0.5.3,<0.6", False),
        ("0.6.0rc1", "<0.6", False),  # PEP 440: "<0.6" excludes 0.6's own pre-releases
        ("0.6.0rc1", "<0.7", True),
        ("3.1.0", "==3.1", True),
        ("3.1.0", "!=3.1.0", False),
        ("3.3.1+git123", "==3.3.1", True),
        ("0.10.2", " > 0.9 , <= 0.10.2 ", True),
    ],
)
def test_satisfies(version: str, spec: str, expected: bool) -> None:
    assert versions.satisfies(version, spec) is expected
    assert versions.satisfies(versions.parse(version), spec) is expected


@pytest.mark.parametrize("spec", ["", "0.5.3", ">=", ">=0.5;<0.6"])
def test_satisfies_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="spec"):
        versions.satisfies("0.5.3", spec)


def test_installed_reads_the_lookup_and_reports_missing_as_none() -> None:
    lookup = fake({"jax": "0.5.3", "jax-triton": "0.2.0"})
    assert versions.installed("jax", lookup) == versions.parse("0.5.3")
    assert versions.installed("kvax", lookup) is None
    assert versions.stack(["jax", "jax-triton", "triton"], lookup) == {
        "jax": versions.parse("0.5.3"),
        "jax-triton": versions.parse("0.2.0"),
        "triton": None,
    }


def test_installed_reports_a_broken_version_string() -> None:
    with pytest.raises(ValueError, match="got 'unknown'"):
        versions.installed("jax", fake({"jax": "unknown"}))


def test_installed_defaults_to_the_real_metadata() -> None:
    assert versions.installed("pytest") == versions.parse(pytest.__version__)
    assert versions.installed("no-such-distribution-flashpatch-test") is None


@pytest.mark.parametrize(
    ("stack", "outside"),
    [
        ({"jax": "0.5.3", "jaxlib": "0.5.3", "flax": "0.10.2"}, set()),  # openpi's pins
        ({"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8"}, set()),  # newest on Python 3.11
        ({"jax": "0.12.0.1", "jaxlib": "0.12.0.1", "flax": "0.12.12"}, set()),  # newest on Python 3.12
        ({"jax": "0.13.0", "jaxlib": "0.13.0", "flax": "0.12.12"}, {"jax", "jaxlib"}),  # a new JAX
        ({"jax": "0.5.1", "flax": "0.13.0"}, {"jax", "flax"}),
    ],
)
def test_outside_tested(stack: dict[str, str], outside: set[str]) -> None:
    found = versions.outside_tested(lookup=fake(stack))
    assert set(found) == outside
    for name, (version, spec) in found.items():
        assert version == versions.parse(stack[name]) and spec == versions.TESTED[name]


def test_installed_stack_is_within_the_tested_ranges() -> None:
    """Fails, on purpose, the first time CI resolves a JAX or Flax release nobody has tested.

    Then: run the suite on it, check `flashpatch.switch.jit_key.carrier_name` and the kvax compat gates,
    update docs/user-guide.md, and widen `versions.TESTED`.
    """
    outside = versions.outside_tested()
    assert not outside, "untested releases installed: " + ", ".join(
        f"{name} {version} (tested: {spec})" for name, (version, spec) in outside.items()
    )
