"""@flashpatch.patch and patch_model: models that run their attention through flashpatch.

A patched linen module carries, on the instance, its own linen entry points (init, apply, ...), each run
inside an ON frame of its settings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import flax.linen as nn

from flashpatch import switch
from flashpatch.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

#: linen's entry points, patched where the class does not redefine them (openpi's Gemma has its own
#: `init`, which calls linen's).
LINEN_ENTRY_POINTS = ("init", "init_with_output", "apply", "lazy_init")


@overload
def patch(factory: F) -> F: ...
@overload
def patch(*, backend: str = "auto", verify: bool = False) -> Callable[[F], F]: ...


def patch(factory: Callable[..., Any] | None = None, *, backend: str = "auto", verify: bool = False):
    """Decorate a model factory: every model it returns runs its attention through flashpatch.

    The factory may return a Flax linen module or an NNX object holding linen modules (openpi's
    Pi0 wraps its Gemma through `nnx.bridge.ToNNX`). Their `init`/`apply` run inside `enable()`;
    the linen module objects survive `nnx.split`/`nnx.merge`, so the patch does too.
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
        if getattr(type(module), name) is not getattr(nn.Module, name):
            continue  # the class redefines it; linen's are enough
        method = getattr(module, name)
        original = getattr(method, "__flashpatch_unpatched__", method)
        object.__setattr__(module, name, _under(settings, original))
    return module


def _under(chosen: Settings, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(*args, **kwargs):
        with switch.entered(chosen):
            return method(*args, **kwargs)

    run.__flashpatch_unpatched__ = method
    return run


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
