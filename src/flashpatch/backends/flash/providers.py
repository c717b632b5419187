"""Which library runs the flash backend's varlen kernel on this GPU under this JAX, and why the others cannot.

Two libraries provide the same `segments.VarlenKernel`: dew-flash-attn (FlashAttention-3 on Hopper, FA2 elsewhere;
JAX >= 0.11.2) and flash-attn-jax (FA2; JAX 0.6 to 0.8). Their JAX ranges do not overlap, so at most one of them
serves a stack; the first whose gates pass is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

from flashpatch.backends import machine
from flashpatch.backends.flash import flash_attn_jax, kernel

#: In the order they are tried. Each module has NAME, limits(gpu, head_dim) (what its build and versions allow),
#: load() (the module, or why it does not import) and varlen.
PROVIDERS: tuple[ModuleType, ...] = (kernel, flash_attn_jax)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The provider that serves (None: none does) and, per provider tried, why it cannot."""

    provider: ModuleType | None
    refusals: tuple[tuple[str, str], ...]  # (provider name, reason)

    @property
    def name(self) -> str | None:
        return None if self.provider is None else self.provider.NAME

    @property
    def varlen(self) -> Callable:
        if self.provider is None:
            raise RuntimeError(self.reason)
        return self.provider.varlen

    @property
    def reason(self) -> str:
        """One sentence: why no library serves (empty when one does)."""
        return "; ".join(reason for _, reason in self.refusals) if self.provider is None else ""


def choose(gpu: machine.Gpu | None, head_dim: int) -> Choice:
    """The provider for openpi's attention at `head_dim` on `gpu` (`machine.gpu()`), with every refusal before it."""
    if gpu is None:
        return Choice(None, (("flash", "FlashAttention's kernels need an NVIDIA GPU under CUDA"),))
    refusals = []
    for provider in PROVIDERS:
        reason = provider.limits(gpu, head_dim)
        if reason is None and not machine.is_simulated():  # a simulated provider is not on disk to import
            module = provider.load()
            reason = module if isinstance(module, str) else None
        if reason is None:
            return Choice(provider, tuple(refusals))
        refusals.append((provider.NAME, reason))
    return Choice(None, tuple(refusals))
