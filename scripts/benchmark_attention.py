#!/usr/bin/env python
"""Benchmark flashpatch's attention backends against openpi's einsum path.

A thin wrapper over `python -m flashpatch.bench` that also runs from a checkout without installing
flashpatch. Same arguments; see `--help` and docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flashpatch.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
