"""The benchmark users run: every attention backend against openpi's original einsum path, side by side.

`python -m flashpatch.bench --help` lists the options; docs/benchmarks.md says what each scenario measures.
Four scenarios: `core` (the attention op alone), `gemma` (pi0's two-expert stack: a training step and
inference), `gemma_fast` (pi0-FAST: prefill and autoregressive decode) and, where asked for, `openpi`
(openpi's own models, with the attention-free ceiling). Results go to JSON, markdown and one PNG per scenario.
"""
