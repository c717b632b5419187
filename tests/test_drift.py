"""The drift guard: a target that no longer looks like what flashpatch knows runs unpatched.

Each test writes a variant of an openpi-compatible fixture module to tmp_path (a fork with a
changed `__call__` signature, a renamed or added parameter, a renamed helper), imports it under
a fresh name, registers its Attention as a target, and runs it with flashpatch on: one
FlashpatchWarning must say why, the original must run (bit-identical to flashpatch off, the
backend never called), and the warning must not repeat on a second call or enable() block.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
import types
import uuid
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import CountingXla, fast_jit

import flashpatch
from flashpatch.switch import interception
from flashpatch.testing import gemma, gemma_fast, layouts

EXPERT = gemma.get_config("tiny")
FIXTURES = {"gemma": gemma, "gemma_fast": gemma_fast}
KINDS = list(FIXTURES)

SIGNATURE_CHANGE = {
    "gemma": {
        "def __call__(self, xs, positions, attn_mask, kv_cache):": (
            "def __call__(self, xs, positions, attn_mask, kv_cache, bias=None):"
        )
    },
    "gemma_fast": {
        "def __call__(self, x, positions, attn_mask, kv_cache, decode, deterministic=True):": (
            "def __call__(self, x, positions, attn_mask, kv_cache, decode, deterministic=True, sow=False):"
        )
    },
}
#: Forks whose signature still fits but whose parameters differ from what the replacement creates.
LAYOUT_CHANGE = {
    "gemma": ({'name=_name("q_einsum", i)': 'name=_name("query_einsum", i)'}, "q_einsum"),
    "gemma_fast": (
        {
            "        q *= self.head_dim**-0.5\n": (
                '        q *= self.head_dim**-0.5 * self.param("query_scale", nn.initializers.ones, (self.head_dim,))\n'
            )
        },
        "query_scale",
    ),
}
HELPER_CHANGE = {"_apply_rope": "_rotate"}


def _fork(tmp_path, monkeypatch, kind: str, replacements: dict[str, str]) -> types.ModuleType:
    """The fixture module of `kind` with `replacements` made, imported from tmp_path under a new name."""
    source = inspect.getsource(FIXTURES[kind])
    for old, new in replacements.items():
        assert old in source, f"the {kind} fixture no longer contains {old!r}"
        source = source.replace(old, new)
    name = f"flashpatch_drift_{kind}_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _attention(module: types.ModuleType, kind: str) -> nn.Module:
    if kind == "gemma":
        return module.Attention(configs=(EXPERT,))
    return module.Attention(
        num_heads=EXPERT.num_heads, num_kv_heads=EXPERT.num_kv_heads, features=EXPERT.width, head_dim=EXPERT.head_dim
    )


def _arguments(kind: str, length: int) -> tuple:
    x = np.random.default_rng(length).standard_normal((2, length, EXPERT.width)).astype(np.float32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
    mask = layouts.causal(2, length).mask[:, None]
    return ([x], positions, mask, None) if kind == "gemma" else (x, positions, mask, None, False)


def _init_and_call(attention: nn.Module, arguments: tuple):
    """(output, variables): init creates the parameters the call itself asks for."""
    return jax.device_get(fast_jit(lambda key: attention.init_with_output(key, *arguments))(jax.random.PRNGKey(0)))


@dataclasses.dataclass
class Outcome:
    warnings: list[str]  # FlashpatchWarning messages
    bound: bool  # the class was patched while flashpatch was on
    replacement_calls: int  # attention calls that reached the backend
    same_as_original: bool  # outputs and variables bit-identical to flashpatch off
    variables: dict


def _run(use_backend, module: types.ModuleType, kind: str, *, register_inside: bool = False) -> Outcome:
    """Register module.Attention, init and call it with flashpatch on and off, then trace it once
    more at another length in a second enable() block (a new layout check, no new warning)."""
    counter = CountingXla()
    use_backend("xla", counter)
    attention = _attention(module, kind)
    site = f"{module.__name__}.Attention"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not register_inside:
            flashpatch.register_target(module.__name__, "Attention", kind=kind)
        arguments = _arguments(kind, 7)
        want = _init_and_call(attention, arguments)
        with flashpatch.enable("xla"):
            if register_inside:
                flashpatch.register_target(module.__name__, "Attention", kind=kind)
            bound = site in interception.bound_targets()
            got = _init_and_call(attention, arguments)
        with flashpatch.enable("xla"):
            longer = _arguments(kind, 9)
            jax.eval_shape(lambda key: attention.init_with_output(key, *longer), jax.random.PRNGKey(0))
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    same = jax.tree.structure(got) == jax.tree.structure(want) and all(np.array_equal(*p) for p in pairs)
    messages = [str(w.message) for w in caught if issubclass(w.category, flashpatch.FlashpatchWarning)]
    assert all(site in m for m in messages), messages
    return Outcome(messages, bound, counter.calls, same, got[1])


@pytest.mark.parametrize("kind", KINDS)
def test_the_unchanged_fixture_is_patched(use_backend, kind: str) -> None:
    """The control: the same procedure on the fixture itself sees the replacement run, silently."""
    outcome = _run(use_backend, FIXTURES[kind], kind)
    assert outcome.bound and outcome.replacement_calls > 0 and not outcome.warnings, outcome.warnings


@pytest.mark.parametrize("kind", KINDS)
def test_a_changed_call_signature_is_not_patched(tmp_path, monkeypatch, use_backend, kind: str) -> None:
    module = _fork(tmp_path, monkeypatch, kind, SIGNATURE_CHANGE[kind])
    outcome = _run(use_backend, module, kind)
    assert len(outcome.warnings) == 1, outcome.warnings
    assert "__call__" in outcome.warnings[0] and "not patched" in outcome.warnings[0], outcome.warnings
    assert not outcome.bound, "a class with another __call__ signature was patched"
    assert outcome.replacement_calls == 0 and outcome.same_as_original


@pytest.mark.parametrize("kind", KINDS)
def test_a_different_parameter_layout_runs_the_original(tmp_path, monkeypatch, use_backend, kind: str) -> None:
    """A fork with the right signature whose parameters differ (renamed, or one more) is caught by
    the abstract layout check: checkpoints of the fork must keep loading."""
    replacements, parameter = LAYOUT_CHANGE[kind]
    module = _fork(tmp_path, monkeypatch, kind, replacements)
    outcome = _run(use_backend, module, kind)
    assert outcome.bound, "the fork's signature fits, so it is bound and checked per call"
    assert len(outcome.warnings) == 1, outcome.warnings
    assert parameter in outcome.warnings[0] and "the original runs" in outcome.warnings[0], outcome.warnings
    assert outcome.replacement_calls == 0 and outcome.same_as_original
    names = str(jax.tree_util.tree_structure(outcome.variables))
    assert parameter.replace("q_einsum", "query_einsum") in names, names


@pytest.mark.parametrize("kind", KINDS)
def test_a_module_without_the_rope_helper_is_not_patched(tmp_path, monkeypatch, use_backend, kind: str) -> None:
    module = _fork(tmp_path, monkeypatch, kind, HELPER_CHANGE)
    outcome = _run(use_backend, module, kind, register_inside=True)
    assert len(outcome.warnings) == 1, outcome.warnings
    assert "_apply_rope" in outcome.warnings[0] and "not patched" in outcome.warnings[0], outcome.warnings
    assert not outcome.bound
    assert outcome.replacement_calls == 0 and outcome.same_as_original
