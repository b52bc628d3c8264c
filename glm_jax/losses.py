"""Losses of the training programs, as pure functions over arrays (shapes in docstrings)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward_model_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                      l2_coef: float = 0.0) -> jax.Array:
    """Pairwise reward-model loss, paper eq. (1) + (2), averaged over the (global) batch.

    `-log sigmoid(r_chosen - r_rejected) + l2_coef * (r_chosen^2 + r_rejected^2)`; the
    regulariser keeps the reward scale from drifting (trl's "center rewards" penalises
    `(r_chosen + r_rejected)^2` instead: a different objective).

    chosen_rewards, rejected_rewards: `[batch]`. Returns a float32 scalar.
    """
    chosen = chosen_rewards.astype(jnp.float32)
    rejected = rejected_rewards.astype(jnp.float32)
    pairwise = -jax.nn.log_sigmoid(chosen - rejected)
    return jnp.mean(pairwise + l2_coef * (chosen**2 + rejected**2))
