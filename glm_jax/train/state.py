"""Train state as an explicit pytree, and the optimizer every stage uses."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model's nnx.State; opt_state: optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(*, learning_rate: float, num_steps: int, warmup_steps: int = 0,
                   end_lr_ratio: float = 0.1, weight_decay: float = 0.0,
                   max_grad_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay to `end_lr_ratio * learning_rate`, after
    global-norm gradient clipping (`max_grad_norm <= 0` disables clipping)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup_steps, decay_steps=max(num_steps, warmup_steps + 1),
        end_value=learning_rate * end_lr_ratio)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts), schedule


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation
                     ) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` into its static graph and a TrainState; the optimizer state is created
    under jit so it inherits the parameters' shardings."""
    graphdef, params = nnx.split(model)
    opt_state = jax.jit(tx.init)(params)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=opt_state)


def copy_params(params: Any) -> Any:
    """A separate copy (same shardings) of `params`: a frozen reference must survive the
    donation of the trained parameters' buffers at every step."""
    return jax.tree.map(jnp.copy, params)


def shardings_of(tree: Any) -> Any:
    """The sharding of every array in `tree` (to pin a step's outputs to its inputs')."""
    return jax.tree.map(lambda x: x.sharding, tree)


def optimizer_from_config(section: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` from a stage's config section (learning_rate, num_steps, ...)."""
    return make_optimizer(learning_rate=section.learning_rate, num_steps=section.num_steps,
                          warmup_steps=section.warmup_steps, end_lr_ratio=section.end_lr_ratio,
                          weight_decay=section.weight_decay, max_grad_norm=section.max_grad_norm)
