"""Train state as an explicit pytree, and the optimizer every stage uses."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.models.lora import partition
from glm_jax.sharding import state_shardings


@struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model's nnx.State; opt_state: optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def stored_in(inner: optax.GradientTransformation, dtype: str
              ) -> optax.GradientTransformation:
    """`inner` with its floating-point state (Adam's moments) stored in `dtype` between steps
    and computed in float32: bfloat16 moments halve the optimizer's memory."""
    if dtype == "float32":
        return inner

    def cast(tree: Any, to: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating)
                            else x, tree)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


def make_optimizer(*, learning_rate: float, num_steps: int, warmup_steps: int = 0,
                   end_lr_ratio: float = 0.1, weight_decay: float = 0.0,
                   max_grad_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95,
                   moment_dtype: str = "float32"
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay to `end_lr_ratio * learning_rate`, after
    global-norm gradient clipping (`max_grad_norm <= 0` disables clipping); the moments are
    stored in `moment_dtype`."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup_steps, decay_steps=max(num_steps, warmup_steps + 1),
        end_value=learning_rate * end_lr_ratio)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    parts.append(stored_in(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
                           moment_dtype))
    return optax.chain(*parts), schedule


def per_part(txs: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimizer over `{name: params}` that applies `txs[name]` to each part (PPO: the
    policy's and the critic's, each with its own learning rate and clipping)."""

    def init(params: dict[str, Any]) -> dict[str, Any]:
        return {name: tx.init(params[name]) for name, tx in txs.items()}

    def update(updates: dict[str, Any], state: dict[str, Any], params: Any = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        out = {name: tx.update(updates[name], state[name],
                               None if params is None else params[name])
               for name, tx in txs.items()}
        return ({name: u for name, (u, _) in out.items()},
                {name: s for name, (_, s) in out.items()})

    return optax.GradientTransformation(init, update)


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)` placed exactly like the parameters (ZeRO-3: each moment sharded over
    fsdp and tensor as its parameter is; counts replicated). Left to the compiler, jit would
    replicate the moments on every device."""
    sharding = jax.tree.leaves(params)[0].sharding
    if not isinstance(sharding, NamedSharding):  # parameters on one device, not on a mesh
        return jax.jit(tx.init)(params)
    shardings = state_shardings(jax.eval_shape(tx.init, params), sharding.mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation
                     ) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` into its static graph and a TrainState; the optimizer state is sharded
    like the parameters (`init_opt_state`) and covers only what trains (with low-rank
    adapters: the adapters and a scalar head, `lora.partition`)."""
    graphdef, params = nnx.split(model)
    return graphdef, TrainState(step=replicated_like(params, jnp.zeros((), jnp.int32)),
                                params=params,
                                opt_state=init_opt_state(tx, partition(params)[0]))


def replicated_like(params: Any, value: jax.Array) -> jax.Array:
    """`value` replicated over the mesh `params` live on (a step count, a coefficient), so
    every argument of a step is placed on the mesh, as the pre-flight compiles it."""
    sharding = jax.tree.leaves(params)[0].sharding
    if not isinstance(sharding, NamedSharding):
        return value
    return jax.device_put(value, NamedSharding(sharding.mesh, PartitionSpec()))


def copy_params(params: Any, dtype: str = "") -> Any:
    """A separate copy (same shardings) of `params`, cast to `dtype` when given ("bfloat16":
    a frozen reference at half the memory): a frozen reference must survive the donation of
    the trained parameters' buffers at every step."""
    if not dtype:
        return jax.tree.map(jnp.copy, params)
    cast = jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree),
                   out_shardings=shardings_of(params))
    return cast(params)


def shardings_of(tree: Any) -> Any:
    """The sharding of every array in `tree` (to pin a step's outputs to its inputs')."""
    return jax.tree.map(lambda x: x.sharding, tree)


def optimizer_from_config(section: Any, moment_dtype: str = "float32"
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` from a stage's config section (learning_rate, num_steps, ...) and
    config.model.moment_dtype."""
    return make_optimizer(learning_rate=section.learning_rate, num_steps=section.num_steps,
                          warmup_steps=section.warmup_steps, end_lr_ratio=section.end_lr_ratio,
                          weight_decay=section.weight_decay, max_grad_norm=section.max_grad_norm,
                          moment_dtype=moment_dtype)
