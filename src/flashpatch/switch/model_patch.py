"""@flashpatch.patch and patch_model: models that run their attention through flashpatch wherever they go.

A patched linen module carries, on the instance, its own linen entry points (init, apply, ...), each run
inside an ON frame of its settings (unless the caller's own enable()/disable() block is open), and its own
`clone`, which patches what it returns. They are small top-level classes rather than closures, so the model
pickles, and flax's `clone` (which copies dataclass fields, not instance attributes) and `copy` hand back
patched modules as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import flax.linen as nn

from flashpatch.switch import interception, state
from flashpatch.switch.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

interception.ensure_listening()  # a patched model's frame binds the targets like any block

#: linen's entry points, patched where the class does not redefine them (openpi's Gemma has its own
#: `init`, which calls linen's).
LINEN_ENTRY_POINTS = ("init", "init_with_output", "apply", "lazy_init")


class PatchedEntry:
    """One linen entry point of one patched module: the class's method, run inside an ON frame of its settings.

    Unless an enable() or disable() block of the caller's is open: the caller's explicit choice for this call
    wins over the model's standing one (`with flashpatch.disable(): model.apply(...)` runs the original).
    """

    def __init__(self, module: nn.Module, name: str, settings: Settings) -> None:
        self.module, self.name, self.settings = module, name, settings

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        method = getattr(type(self.module), self.name)
        if state.in_block():
            return method(self.module, *args, **kwargs)
        with state.entered(self.settings, source=state.Source.MODEL):
            return method(self.module, *args, **kwargs)

    @property
    def __name__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self.module).__name__}.{self.name} patched by flashpatch ({self.settings})>"


class PatchedClone:
    """`clone` of one patched module: the class's clone, patched with the same settings."""

    def __init__(self, module: nn.Module, settings: Settings) -> None:
        self.module, self.settings = module, settings

    @property
    def __name__(self) -> str:
        return "clone"

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return _patch_linen(type(self.module).clone(self.module, *args, **kwargs), self.settings)

    def __repr__(self) -> str:
        return f"<{type(self.module).__name__}.clone patched by flashpatch ({self.settings})>"


@overload
def patch(factory: F) -> F: ...
@overload
def patch(*, backend: str = "auto", verify: bool = False) -> Callable[[F], F]: ...


def patch(factory: Callable[..., Any] | None = None, *, backend: str = "auto", verify: bool = False):
    """Decorate a model factory: every model it returns runs its attention through flashpatch.

    The factory may return a Flax linen module or an NNX object holding linen modules (openpi's
    Pi0 wraps its Gemma through `nnx.bridge.ToNNX`). Their `init`/`apply` run patched with these settings,
    except inside an enable() or disable() block of the caller's, whose choice wins for that call; the
    linen module objects survive `nnx.split`/`nnx.merge`, pickling and `clone`, so the patch does too.
    """
    chosen = Settings(backend=backend, verify=verify)
    if factory is not None and not callable(factory):
        raise TypeError(
            "flashpatch.patch decorates a model factory and takes its options by keyword "
            f"(@flashpatch.patch(backend=...)); got {factory!r}"
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def patched_factory(*args, **kwargs):
            model = fn(*args, **kwargs)
            patch_model(model, backend=chosen.backend, verify=chosen.verify)
            return model

        return patched_factory

    return decorate if factory is None else decorate(factory)


def patch_model(model: Any, *, backend: str = "auto", verify: bool = False) -> Any:
    """Patch one model object in place (what `patch` does to each result). Returns the model."""
    chosen = Settings(backend=backend, verify=verify)
    modules = list(_linen_modules(model))
    if not modules:
        raise TypeError(
            "flashpatch.patch needs a flax linen Module, or an NNX object holding linen modules "
            f"(nnx.bridge.ToNNX); got {type(model).__name__}"
        )
    for module in modules:
        _patch_linen(module, chosen)
    return model


def _patch_linen(module: nn.Module, settings: Settings) -> nn.Module:
    for name in LINEN_ENTRY_POINTS:
        if getattr(type(module), name) is getattr(nn.Module, name):
            object.__setattr__(module, name, PatchedEntry(module, name, settings))
    object.__setattr__(module, "clone", PatchedClone(module, settings))
    return module


def _linen_modules(model: Any) -> Iterator[nn.Module]:
    if isinstance(model, nn.Module):
        yield model
        return
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax without nnx
        return
    # flax >= 0.11 roots NNX objects at nnx.Pytree (its nnx.Object is a deprecated sibling of Module);
    # older flax roots them at nnx.Object.
    if not isinstance(model, getattr(nnx, "Pytree", None) or nnx.Object):
        return
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.bridge.ToNNX):
            # flax >= 0.11 keeps the wrapped module in `to_nnx__module`, older flax in `module`.
            module = getattr(node, "to_nnx__module", None) or getattr(node, "module", None)
            if isinstance(module, nn.Module):
                yield module
