"""train_parity.py --openpi: a few AdamW steps of real openpi's Pi0 on fake data, unpatched and patched.

    python benchmarks/parity/openpi_parity.py [train_parity.py's options]   # = train_parity.py --openpi ...

Needs openpi importable (it is not on PyPI: clone github.com/Physical-Intelligence/openpi and install it,
or put its src/ on PYTHONPATH in an environment with its dependencies). Without it, this mode says so
and exits 0. openpi's model is an NNX module; flashpatch reroutes the `openpi.models.gemma.Attention`
inside it, so nothing here is flashpatch-specific beyond `flashpatch.enable(backend)` around tracing.

The batch starts from openpi's own `config.fake_obs()` / `config.fake_act()` and is then filled with
random values, padded prompts and one camera missing in odd rows, so that the masks have padding in
the middle, as in real training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import parity

import flashpatch


def main(args: argparse.Namespace) -> int:
    try:
        from flax import nnx
        from openpi.models import pi0_config
    except ImportError as err:
        print(
            f"--openpi: openpi is not importable ({err}); skipping. Install openpi "
            "(https://github.com/Physical-Intelligence/openpi) in this environment to run this mode."
        )
        return 0

    config = pi0_config.Pi0Config(
        paligemma_variant=args.openpi_variant, action_expert_variant=args.openpi_variant, dtype=args.dtype
    )
    with flashpatch.disable():
        model = config.create(jax.random.key(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    obs, actions = fake_batch(config, args.batch, args.seed)
    optimizer = optax.adamw(args.lr)

    def train_step(state, step):
        def loss_fn(p):
            merged = nnx.merge(graphdef, p, rest)
            rng = jax.random.fold_in(jax.random.key(args.seed), step)
            return jnp.mean(merged.compute_loss(rng, obs, actions, train=False))

        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    backend_names = args.backends if args.backends is not None else parity.runnable_backends()
    runs = {}
    for backend in (None, *backend_names):
        name = backend or parity.UNPATCHED
        fresh = jax.tree.map(jnp.copy, params)
        state = (fresh, optimizer.init(fresh))
        with parity.activation(backend):
            started = time.perf_counter()
            compiled = jax.jit(train_step, donate_argnums=0).lower(state, np.int32(0)).compile()
            compile_s = time.perf_counter() - started
        losses = []
        for step in range(args.steps):
            state, loss = compiled(state, np.int32(step))
            losses.append(float(loss))
        runs[name] = losses
        print(f"  {name}: compile {compile_s:.1f} s, losses {', '.join(f'{x:.6f}' for x in losses)}", flush=True)

    baseline = np.asarray(runs[parity.UNPATCHED])
    gaps = {
        name: dataclasses.asdict(parity.compare(np.asarray(losses), baseline, window=1, final_steps=1))
        for name, losses in runs.items()
        if name != parity.UNPATCHED
    }
    for name, gap in gaps.items():
        print(f"  {name} vs unpatched: max rel gap {gap['max_rel_gap']:.3g}, identical {gap['identical']}")
    record = {
        "openpi": {"variant": args.openpi_variant, "dtype": args.dtype, "batch": args.batch, "steps": args.steps},
        "device": getattr(jax.devices()[0], "device_kind", str(jax.devices()[0])),
        "jax": jax.__version__,
        "losses": runs,
        "gaps": gaps,
    }
    (args.out / "results_openpi.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}/results_openpi.json", flush=True)
    return 0 if all(np.isfinite(gap["max_rel_gap"]) for gap in gaps.values()) else 1


def fake_batch(config, batch: int, seed: int):
    """openpi's fake observation and actions, filled with random values and padding."""
    rng = np.random.default_rng(seed)
    obs = config.fake_obs(batch)
    actions = config.fake_act(batch)
    images = {k: jnp.asarray(rng.uniform(-1, 1, v.shape), v.dtype) for k, v in obs.images.items()}
    image_masks = dict(obs.image_masks)
    second = list(image_masks)[1]
    image_masks[second] = jnp.asarray(np.arange(batch) % 2 == 0)  # missing in odd rows
    tokens = obs.tokenized_prompt.shape[1]
    lengths = rng.integers(2, tokens + 1, batch)
    prompt_mask = np.arange(tokens)[None, :] < lengths[:, None]
    prompt = np.where(prompt_mask, rng.integers(1, 1000, (batch, tokens)), 0)
    obs = obs.replace(
        images=images,
        image_masks=image_masks,
        state=jnp.asarray(rng.normal(size=obs.state.shape), obs.state.dtype),
        tokenized_prompt=jnp.asarray(prompt, obs.tokenized_prompt.dtype),
        tokenized_prompt_mask=jnp.asarray(prompt_mask),
    )
    return obs, jnp.asarray(rng.uniform(-1, 1, actions.shape), actions.dtype)


if __name__ == "__main__":
    import sys

    import train_parity

    sys.exit(train_parity.main(["--openpi", *sys.argv[1:]]))
