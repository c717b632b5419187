"""Benchmarks of every attention backend against openpi's original einsum path, side by side.

Run `python -m flashpatch.bench --help` (or scripts/benchmark_attention.py). Three scenarios:
`core` (the attention op alone), `gemma` (pi0's two-expert stack: training step and inference) and
`gemma_fast` (pi0-FAST: prefill and autoregressive decode). Results go to JSON, markdown and PNGs.
"""
