"""openpi's attention calls, for `python -m flashpatch tune`: their shapes and masks, per model.

Every number is read from openpi's own code (github.com/Physical-Intelligence/openpi, src/openpi; the file is
named beside each), or from one of openpi's train configs where openpi is installed (`from_openpi`). The masks
are built as openpi builds them (`make_attn_mask` from per-token flags), with its padding: prompts of random
length, and the second camera missing in every third row.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flashpatch.backends.base import Problem
from flashpatch.core import tuning
from flashpatch.core.tuning import FORWARD
from flashpatch.testing.layouts import make_attn_mask

# openpi's attention shapes, read from openpi's code (github.com/Physical-Intelligence/openpi, src/openpi/models):
#: model.py IMAGE_KEYS: every model takes three images.
IMAGES = 3
#: siglip.py "So400m/14" (patch 14) on model.py's IMAGE_RESOLUTION (224, 224): (224 / 14) ** 2 tokens per image.
IMAGE_TOKENS = 256
#: gemma.py get_config: gemma_2b and gemma_300m (and their _lora variants) alike: 8 query heads, 1 key/value head,
#: head_dim 256 (the two experts of pi0 attend as one sequence, so they must agree).
HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256
#: pi0_fast.py Pi0FAST.sample_actions: the KV cache holds the prefix and max_decoding_steps=256 more tokens.
MAX_DECODING_STEPS = 256
#: training/config.py TrainConfig.batch_size: openpi's default global batch.
OPENPI_BATCH = 32
CALL_KINDS = ("train", "sample")


@dataclasses.dataclass(frozen=True)
class Model:
    """What shapes a model's attention calls (openpi's defaults, or one of openpi's train configs)."""

    name: str
    kind: str  # pi0 | pi05 | pi0_fast
    max_token_len: int
    action_horizon: int
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    source: str = ""


#: pi0_config.py Pi0Config: max_token_len 48 (200 with pi05), action_horizon 50; pi0.py embed_suffix: pi0 adds a
#: state token before the actions, pi0.5 does not. pi0_fast.py Pi0FASTConfig: max_token_len 250, the actions are
#: tokens of the prompt (action_horizon does not reach attention).
MODELS = {
    "pi0": Model("pi0", "pi0", 48, 50, source="openpi Pi0Config()"),
    "pi05": Model("pi05", "pi05", 200, 50, source="openpi Pi0Config(pi05=True)"),
    "pi0_fast": Model("pi0_fast", "pi0_fast", 250, 32, source="openpi Pi0FASTConfig()"),
}


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call to time: its problem, the modes to time, and how to build its mask."""

    label: str
    problem: Problem
    modes: tuple[str, ...]
    mask: Callable[[np.random.Generator], np.ndarray]  # (B, T, S) bool

    @property
    def key(self) -> dict[str, Any]:
        return {field: getattr(self.problem, field) for field in tuning.KEY_FIELDS}


def _prefix_valid(rng: np.random.Generator, batch: int, prompt: int) -> np.ndarray:
    """(B, images + prompt) valid tokens: the second camera missing in every third row, prompts of random length."""
    images = np.ones((batch, IMAGES * IMAGE_TOKENS), bool)
    images[2::3, IMAGE_TOKENS : 2 * IMAGE_TOKENS] = False
    lengths = rng.integers(max(1, prompt // 4), prompt + 1, batch)
    return np.concatenate([images, np.arange(prompt)[None, :] < lengths[:, None]], axis=1)


def _problem(batch: int, t: int, s: int, model_heads: tuple[int, int, int], dtype: str, platform: str, causal: bool):
    heads, kv_heads, head_dim = model_heads
    return Problem(batch, t, s, heads, kv_heads, head_dim, dtype, dtype, dtype, dtype, platform, causal)


def model_calls(
    model: Model, batch: int, sample_batch: int, dtype: str, platform: str, kinds: Sequence[str] = CALL_KINDS
) -> list[Call]:
    """The attention calls of `model`'s training step (forward and backward) and of its sample_actions (forward)."""
    heads = (model.heads, model.kv_heads, model.head_dim)
    prefix = IMAGES * IMAGE_TOKENS + model.max_token_len
    calls = []
    if model.kind in ("pi0", "pi05"):
        state = int(model.kind == "pi0")
        suffix = state + model.action_horizon
        full = prefix + suffix

        def flags(rng, b):
            valid = np.concatenate([_prefix_valid(rng, b, model.max_token_len), np.ones((b, suffix), bool)], axis=1)
            ar = np.zeros(full, bool)
            ar[prefix : prefix + state + 1] = True  # the state token (pi0) and the action block each start a block
            return valid, ar

        def train_mask(rng):
            return make_attn_mask(*flags(rng, batch))

        def prefill_mask(rng):
            return make_attn_mask(_prefix_valid(rng, sample_batch, model.max_token_len), np.zeros(prefix, bool))

        def denoise_mask(rng):
            return make_attn_mask(*flags(rng, sample_batch))[:, prefix:, :]  # the suffix over the prefix's cache

        if "train" in kinds:
            problem = _problem(batch, full, full, heads, dtype, platform, False)
            calls.append(Call(f"{model.name} train", problem, tuning.MODES, train_mask))
        if "sample" in kinds:
            problem = _problem(sample_batch, prefix, prefix, heads, dtype, platform, False)
            calls.append(Call(f"{model.name} sample prefill", problem, (FORWARD,), prefill_mask))
            problem = _problem(sample_batch, suffix, full, heads, dtype, platform, False)
            calls.append(Call(f"{model.name} sample denoise step", problem, (FORWARD,), denoise_mask))
        return calls

    cache = prefix + MAX_DECODING_STEPS

    def fast_train_mask(rng):
        valid = _prefix_valid(rng, batch, model.max_token_len)
        lengths = valid[:, IMAGES * IMAGE_TOKENS :].sum(axis=1)
        start = IMAGES * IMAGE_TOKENS + lengths // 2  # the second half of each prompt decodes causally (its actions)
        return make_attn_mask(valid, valid & (np.arange(prefix)[None, :] >= start[:, None]))

    def fast_prefill_mask(rng):
        mask = make_attn_mask(_prefix_valid(rng, sample_batch, model.max_token_len), np.zeros(prefix, bool))
        return np.pad(mask, ((0, 0), (0, 0), (0, MAX_DECODING_STEPS)))  # the empty cache slots

    def fast_decode_mask(rng):
        mask = np.zeros((sample_batch, 1, cache), bool)
        mask[:, 0, :prefix] = _prefix_valid(rng, sample_batch, model.max_token_len)
        mask[:, 0, prefix] = True  # the first decoded token
        return mask

    if "train" in kinds:
        problem = _problem(batch, prefix, prefix, heads, dtype, platform, True)
        calls.append(Call(f"{model.name} train", problem, tuning.MODES, fast_train_mask))
    if "sample" in kinds:
        problem = _problem(sample_batch, prefix, cache, heads, dtype, platform, True)
        calls.append(Call(f"{model.name} sample prefill", problem, (FORWARD,), fast_prefill_mask))
        problem = _problem(sample_batch, 1, cache, heads, dtype, platform, True)
        calls.append(Call(f"{model.name} sample decode step", problem, (FORWARD,), fast_decode_mask))
    return calls


def custom_call(problem: Problem, modes: tuple[str, ...]) -> Call:
    """A call of the user's shape: its queries are the last T of S tokens, a prefix padded at random lengths,
    and with causal runs the last quarter of the queries (at least one) decoding causally, as pi0-FAST's do."""
    b, t, s = problem.batch, problem.q_len, problem.kv_len

    def mask(rng):
        tail = max(1, t // 4) if problem.causal_runs else 0
        prefix = s - tail
        valid = np.ones((b, s), bool)
        lengths = rng.integers(max(1, prefix // 2), prefix + 1, b)
        valid[:, :prefix] = np.arange(prefix)[None, :] < lengths[:, None]
        ar = np.zeros(s, bool)
        ar[prefix:] = True
        return make_attn_mask(valid, ar)[:, s - t :, :]

    return Call("custom", problem, modes, mask)


class UnknownModel(ValueError):
    """A model name that is neither a built-in one nor an openpi train config, in one sentence."""


def _brief(err: BaseException, limit: int) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


def from_openpi(name: str) -> tuple[Model, int | None, str | None]:
    """(the model, openpi's batch per device, its dtype) of one of openpi's train configs (openpi installed)."""
    try:
        config = importlib.import_module("openpi.training.config")
    except Exception as err:  # openpi missing, or failing to import here
        raise UnknownModel(
            f"model must be {', '.join(MODELS)} or one of openpi's train config names; got {name!r} (openpi's "
            f"configs cannot be read here: {_brief(err, 120)})"
        ) from None
    try:
        train = config.get_config(name)
        model = train.model
        fast = type(model).__name__ == "Pi0FASTConfig"
        kind = "pi0_fast" if fast else ("pi05" if getattr(model, "pi05", False) else "pi0")
        gemma = importlib.import_module("openpi.models.gemma").get_config(model.paligemma_variant)
        found = Model(
            name,
            kind,
            int(model.max_token_len),
            int(model.action_horizon),
            int(gemma.num_heads),
            int(gemma.num_kv_heads),
            int(gemma.head_dim),
            source=f"openpi's train config {name!r}",
        )
    except Exception as err:  # an unknown name (openpi's get_config raises ValueError), a config of other shape
        raise UnknownModel(
            f"model {name!r} is neither {', '.join(MODELS)} nor an openpi train config ({_brief(err, 200)})"
        ) from None
    batch = getattr(train, "batch_size", None)
    if isinstance(batch, int):
        import jax

        batch = max(1, batch // jax.device_count())
    return found, batch if isinstance(batch, int) else None, getattr(model, "dtype", None)
