"""openpi's Module classes: each call runs the whole layer stack, so one fallback decision serves every layer.

Nothing of the module is replaced: its call runs under `flashpatch.stack.decide`, which reads the mask
the call takes. openpi's modules hand that mask to every layer unchanged (gemma adds the head axis,
gemma_fast takes (B, T, S) or (B, 1, T, S)); the adapter checks the parameter is there, and the
decision checks at trace time that every layer's mask has its shape.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from flashpatch.targets.base import Adapter


class LayerStack(Adapter):
    kind = "stack"
    #: The parameter of the module's call that every layer's attention mask is.
    mask_parameter: ClassVar[str] = "mask"

    def drift(self, cls: type) -> str | None:
        try:
            params = tuple(inspect.signature(cls.__call__).parameters)
        except (TypeError, ValueError) as err:
            return f"cannot read the signature of {cls.__qualname__}.__call__ ({err})"
        if self.mask_parameter not in params:
            return f"__call__{params} takes no {self.mask_parameter}"
        return None

    def mask(self, module: Any, args: tuple, kwargs: dict) -> Any:
        """The call's mask as (B, T, S), or None where there is none to read (none passed, another rank)."""
        try:
            call = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
        except TypeError:
            return None
        mask = call.arguments.get(self.mask_parameter)
        ndim = getattr(mask, "ndim", None)
        if ndim == 4 and mask.shape[1] == 1:
            return mask[:, 0]
        return mask if ndim == 3 else None
