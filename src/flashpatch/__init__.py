"""flashpatch: flash attention for openpi's Gemma models, switched on at run time, no source edits.

    with flashpatch.enable():            # this thread or asyncio task, this block
        ...
    flashpatch.install()                 # the whole process (what FLASHPATCH=1 does)

    @flashpatch.patch                    # every model the factory returns
    def make_model(config, rng): ...

Names load on first use, so `import flashpatch` imports no JAX (the interpreter-start hook relies on
it). PYTEST_DONT_REWRITE: that hook may import this package before pytest starts, and pytest would
otherwise warn that it cannot rewrite a module of a plugin's distribution.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    import jax

    from flashpatch.diagnostics import FlashpatchWarning
    from flashpatch.switch.model_patch import patch, patch_model
    from flashpatch.switch.settings import Settings
    from flashpatch.switch.toggle import disable, enable, install, installed, uninstall
    from flashpatch.targets import register as register_target

#: public name -> (module, attribute).
_LAZY: dict[str, tuple[str, str]] = {
    "FlashpatchWarning": ("flashpatch.diagnostics", "FlashpatchWarning"),
    "Settings": ("flashpatch.switch.settings", "Settings"),
    "register_target": ("flashpatch.targets", "register"),
    "disable": ("flashpatch.switch.toggle", "disable"),
    "enable": ("flashpatch.switch.toggle", "enable"),
    "install": ("flashpatch.switch.toggle", "install"),
    "installed": ("flashpatch.switch.toggle", "installed"),
    "patch": ("flashpatch.switch.model_patch", "patch"),
    "patch_model": ("flashpatch.switch.model_patch", "patch_model"),
    "uninstall": ("flashpatch.switch.toggle", "uninstall"),
}
_SUBMODULES = (
    "backends",
    "bench",
    "core",
    "diagnostics",
    "openpi_sites",
    "switch",
    "targets",
    "testing",
    "tools",
    "versions",
)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attn_mask: jax.Array,
    *,
    probs_dtype: Any = None,
    settings: Settings | str | None = None,
    site: str = "flashpatch.attention",
    causal_runs: bool = True,
) -> jax.Array:
    """softmax(q k^T, masked) v with openpi's semantics, through flashpatch's backends.

    q: (B, T, N, H), already scaled by head_dim**-0.5 as openpi does; k, v: (B, S, K, H); attn_mask:
    (B, 1, T, S) bool. `probs_dtype` is the dtype openpi casts the softmax to (default: q's dtype).
    `settings` (a Settings, or a backend name such as 'xla') defaults to the enable() block in force here,
    else the process default (`install`), else `auto`. `causal_runs=False` promises that no run of several
    rows in the mask is causal (pi0's and pi0.5's masks; pi0-FAST's suffix is one). Returns (B, T, N, H) in
    result_type(probs_dtype, v.dtype), as openpi does.
    """
    from flashpatch.core.attention import attention as core_attention
    from flashpatch.switch import state
    from flashpatch.switch.settings import Settings

    if settings is None:
        settings = state.current() or Settings()
    elif isinstance(settings, str):
        settings = Settings(backend=settings)
    elif not isinstance(settings, Settings):
        raise TypeError(
            f"settings must be a flashpatch.Settings or a backend name such as 'auto'; got {type(settings).__name__}"
        )
    return core_attention(
        q,
        k,
        v,
        attn_mask,
        backend=settings.backend,
        verify=settings.verify,
        probs_dtype=probs_dtype,
        site=site,
        causal_runs=causal_runs,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"flashpatch.{name}")
    else:
        raise AttributeError(f"module 'flashpatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


def backend_names() -> tuple[str, ...]:
    """Every registered backend, built-in ones first (as `flashpatch.backends.names()`)."""
    from flashpatch import backends

    return backends.names()


def backend_choices() -> tuple[str, ...]:
    """What `enable(backend=...)` and FLASHPATCH_BACKEND accept: 'auto' and every registered backend."""
    from flashpatch import backends

    return backends.choices()


__all__ = [
    "FlashpatchWarning",
    "Settings",
    "__version__",
    "attention",
    "backend_choices",
    "backend_names",
    "disable",
    "enable",
    "install",
    "installed",
    "patch",
    "patch_model",
    "register_target",
    "uninstall",
]
