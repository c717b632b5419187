"""The ways to turn flashpatch on: a context manager, a process-wide default, a factory decorator."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import flax.linen as nn

from flashpatch import interception, jit_cache, settings
from flashpatch.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
_default_lock = threading.Lock()


class _Block:
    """One open enable()/disable() block: its hold on the targets, its settings, its jit-cache key."""

    def __init__(self, new: Settings | None):
        self.stack = contextlib.ExitStack()
        interception.acquire()
        self.stack.callback(interception.release)
        depth = settings.push(new)
        self.stack.callback(settings.pop, depth)
        self.stack.enter_context(jit_cache.keyed(new.cache_key if new else "off"))


_open = threading.local()


def _blocks() -> list[_Block]:
    blocks = getattr(_open, "blocks", None)
    if blocks is None:
        blocks = _open.blocks = []
    return blocks


@contextlib.contextmanager
def _activate(new: Settings | None) -> Iterator[Settings | None]:
    block = _Block(new)
    _blocks().append(block)
    try:
        yield new
    finally:
        _close(block)


def _close(block: _Block) -> None:
    """Close `block` and, if it is not the innermost, every block opened inside it, innermost first.

    Each block restores what it found when it opened, so closing in that order leaves the thread exactly as
    it was before `block` (settings, jit-cache key, patched classes), however the blocks were left.
    """
    blocks = _blocks()
    if block not in blocks:
        return  # already closed, when a block around it was left first
    index = blocks.index(block)
    inner = blocks[index + 1 :]
    del blocks[index:]
    for open_block in reversed([block, *inner]):
        open_block.stack.close()
    if inner:
        raise RuntimeError(
            "flashpatch: enable()/disable() blocks were left out of order (an outer block ended while an inner "
            "one was open); both are now closed on this thread. Leave nested blocks innermost first."
        )


def enable(backend: str = "auto", *, verify: bool = False) -> contextlib.AbstractContextManager[Settings]:
    """Patch openpi's attention on this thread for the duration of the block (or decorated call).

    Nestable: the innermost block wins and leaving it restores what was there before. Other
    threads are unaffected (they follow the process default, see `install`). Functions jitted
    inside retrace when the settings differ from those they were traced with.
    """
    return _activate(Settings(backend=backend, verify=verify))


def disable() -> contextlib.AbstractContextManager[None]:
    """Run the original attention on this thread for the duration of the block."""
    return _activate(None)


def install(backend: str = "auto", *, verify: bool = False) -> None:
    """Patch openpi's attention process-wide (every thread without its own enable()/disable())."""
    _set_default(Settings(backend=backend, verify=verify))


def uninstall() -> None:
    """Undo `install`. Harmless when nothing is installed."""
    _set_default(None)


def _set_default(new: Settings | None) -> None:
    with _default_lock:
        old = settings.swap_default(new)
        if new is not None and old is None:
            interception.acquire()
        elif new is None and old is not None:
            interception.release()
        if new != old:
            jit_cache.set_global_key(new.cache_key if new else None)


def installed() -> Settings | None:
    """The process-wide settings, or None."""
    return settings.get_default()


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


_LINEN_ENTRY_POINTS = ("init", "init_with_output", "apply", "lazy_init")


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
        for name in _LINEN_ENTRY_POINTS:
            if getattr(type(module), name) is not getattr(nn.Module, name):
                continue  # the class redefines it (openpi's Gemma has its own `init`); linen's are enough
            method = getattr(module, name)
            original = getattr(method, "__flashpatch_unpatched__", method)
            object.__setattr__(module, name, _under(chosen, original))
    return model


def _under(chosen: Settings, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(*args, **kwargs):
        with _activate(chosen):
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
