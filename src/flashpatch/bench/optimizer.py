"""openpi's default training optimizer, through optax (openpi's own optimizer library).

AdamW with b1 0.9, b2 0.95, eps 1e-8, weight decay 1e-10 and global-norm clipping at 1.0, as
`openpi.training.optimizer.AdamW` builds it; a constant learning rate (the schedule does not change
a step's cost).
"""

from __future__ import annotations


def openpi_adamw(learning_rate: float = 2.5e-5):
    import optax

    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-10),
    )
