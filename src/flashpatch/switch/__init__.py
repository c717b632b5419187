"""Turning flashpatch on and off: settings, the context-local switch, and what it drives.

    settings.py      Settings (backend, verify) and the FLASHPATCH* variables (no JAX: the start-up hook reads it)
    state.py         the frames in force per thread / asyncio task, the process default, who holds the targets
    toggle.py        enable() / disable() (blocks and decorators, coroutines and generators too), install()
    model_patch.py   @flashpatch.patch and patch_model: models that carry their own settings
    jit_key.py       JAX's jit-cache key follows the frame in force, so switching always retraces
    interception.py  the gate on each target class's __call__, bound while anything holds the targets
    drift.py         the drift guard: the replacement must reproduce the original's variables and outputs

Imports nothing at package import (the interpreter-start hook imports `settings` before JAX may load).
"""
