"""The exact path a chain-form backend hands a mask it refuses: never slower than openpi's own.

cuDNN's dense-mask path where it runs the problem (Hopper with cuDNN 9.5+ at head_dim 256); else
openpi's own attention, unless its logits would not fit the GPU, where only the blockwise `xla`
path (memory O(T)) trains at all.
"""

from __future__ import annotations

from flashpatch.backends.base import DenseBackend, Problem


def exact_fallback(problem: Problem) -> DenseBackend:
    """The fastest exact dense backend measured for `problem` that can run it here."""
    from flashpatch import selection
    from flashpatch.backends import cudnn, reference, xla

    dense = cudnn.CudnnBackend(use_seq_lengths=False)
    if dense.unsupported(problem) is None:
        return dense
    if selection.einsum_would_not_fit(problem):
        return xla.XlaBackend()
    return reference.ReferenceBackend()
