"""The models an algorithm uses, built in one place: the policy (trained), the reference policy
(its frozen initial weights), the reward model (frozen) and the critic (trained). Any but the
policy may be absent.

Each model is a `Role`: a static graph definition and its parameters (arrays sharded by the
logical-axis rules, or abstract `ShapeDtypeStruct`s in the pre-flight), so an algorithm's
program takes the graph definitions as static settings and the parameters as arguments.
Three builders, one per kind of caller:

  roles_from_config  the training stages: the policy from config.model, the reward model from
                     an RM workdir, the critic from the reward model or the policy, in the
                     config's precision (frozen models in model.frozen_dtype)
  random_roles       tests and benchmarks: freshly initialised models of one GlmConfig
  abstract_roles     the pre-flight and benchmarks/memory.py: nothing allocated
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glm_jax.models.convert import HEADS
from glm_jax.models.glm import GlmConfig
from glm_jax.models.heads import GlmValueModel
from glm_jax.models.lora import (
    add_adapters,
    cast_frozen,
    fresh_part,
    graph_of,
    has_adapters,
    is_trained,
    merged_model,
)
from glm_jax.sharding import check_model_fits_mesh, shard_state, state_shardings
from glm_jax.train.checkpoint import load_trained_model
from glm_jax.train.common import (
    frozen_overrides,
    load_reward_model,
    lora_overrides,
    model_config_from_config,
    model_from_config,
    trained_overrides,
)
from glm_jax.train.state import copy_params

CRITIC_INITS = ("reward", "policy")


@dataclasses.dataclass(frozen=True)
class Role:
    """One model: its graph definition (static), its parameters (an nnx State) and its
    GlmConfig (None for a toy model of a test)."""

    graphdef: nnx.GraphDef
    params: Any
    config: GlmConfig | None = None

    @classmethod
    def of(cls, module: nnx.Module) -> Role:
        graphdef, params = nnx.split(module)
        return cls(graphdef, params, getattr(module, "config", None))

    def module(self, params: Any = None) -> nnx.Module:
        """The model with `params` (default: the role's own)."""
        return nnx.merge(self.graphdef, self.params if params is None else params)


@dataclasses.dataclass(frozen=True)
class Roles:
    """The models of one algorithm. `reference` shares the policy's graph definition (its
    parameters are a separate frozen copy, which survives the donation of the trained ones);
    with low-rank adapters on the policy there is none: the reference is the policy's own
    base, adapters off. `critic_base`: a LoRA critic whose params are only its adapters and
    head shares the frozen backbone of the "policy" (its base) or of the "reward" model."""

    policy: Role
    reference: Role | None = None
    reward: Role | None = None
    critic: Role | None = None
    critic_base: str = ""


def _reference(policy: Role, dtype: str, mesh: Mesh) -> Role:
    with jax.set_mesh(mesh):
        params = copy_params(policy.params, dtype)
    return dataclasses.replace(policy, params=params)


def roles_from_config(config: ConfigDict, mesh: Mesh, *, tokenizer: Any = None,
                      section: str = "ppo", reference: bool = False, reward: bool = False,
                      critic: bool = False) -> Roles:
    """The roles a stage asks for, from `config`: the policy from config.model (its init
    checkpoint or the tiny default); with `reference`, a frozen copy of it in
    model.frozen_dtype; with `reward`, the reward model of `config.<section>.reward_model`
    (checked against the policy's `tokenizer`), frozen; with `critic`, a value model from
    the reward model or the policy (`config.<section>.critic_init`), trained, in the
    policy's precision."""
    policy = Role.of(model_from_config(config, "lm", mesh, role="policy"))
    roles = Roles(policy)
    if reference and not has_adapters(policy.params):
        roles = dataclasses.replace(roles, reference=_reference(
            policy, config.model.frozen_dtype, mesh))
    if reward:
        field = f"config.{section}.reward_model"
        roles = dataclasses.replace(roles, reward=Role.of(load_reward_model(
            config[section].reward_model, field, tokenizer, mesh, frozen_overrides(config))))
    if critic:
        roles = _with_critic(roles, config, section, mesh)
    return roles


def _with_critic(roles: Roles, config: ConfigDict, section: str, mesh: Mesh) -> Roles:
    """`roles` with the critic of `config.<section>.critic_init`, trained in the policy's
    precision. With low-rank adapters on the critic it shares a frozen backbone where one is
    there to share: the policy's base when it starts from the policy and the policy has
    adapters too (the same frozen weights), the reward model's when it starts from it."""
    init = config[section].critic_init
    if init not in CRITIC_INITS:
        raise ValueError(f"config.{section}.critic_init={init!r}; choose one of "
                         f"{', '.join(CRITIC_INITS)}")
    lora = lora_overrides(config, "critic")
    param_dtype = config.model.param_dtype
    if lora and init == "policy" and has_adapters(roles.policy.params):
        critic_config = roles.policy.config.replace(**lora)
        trained = fresh_part(GlmValueModel, critic_config, config.seed, mesh, is_trained)
        return dataclasses.replace(roles, critic=Role(
            graph_of(GlmValueModel, critic_config), trained, critic_config),
            critic_base="policy")
    if lora and init == "reward" and roles.reward is not None:
        # The reward model's head, trained from here in the policy's precision.
        critic_config = roles.reward.config.replace(param_dtype=param_dtype, **lora)
        adapters = fresh_part(GlmValueModel, critic_config, config.seed, mesh)
        # A copy (astype to its own dtype would return the same buffer, which the trained
        # state's donation would then free under the frozen reward model).
        head = nnx.split_state(roles.reward.params, is_trained, ...)[0]
        head = jax.tree.map(lambda x: jnp.copy(x).astype(param_dtype), head)
        return dataclasses.replace(roles, critic=Role(
            graph_of(GlmValueModel, critic_config), nnx.merge_state(head, adapters),
            critic_config), critic_base="reward")
    if init == "reward":
        # Trained, so in the policy's precision whatever the reward model was saved in.
        model = load_trained_model(config[section].reward_model, GlmValueModel, mesh,
                                   overrides=trained_overrides(config))
        if model.config.lora_rank:  # a LoRA reward model: its adapters folded in
            model = merged_model(model)
        if lora:
            model = cast_frozen(add_adapters(model, mesh, config.seed, param_dtype, **lora),
                                frozen_overrides(config)["param_dtype"])
    else:
        model = model_from_config(config, "value", mesh, role="critic")
    return dataclasses.replace(roles, critic=Role.of(model))


def random_roles(glm_config: GlmConfig, mesh: Mesh, *, reference: bool = False,
                 reward: bool = False, critic: bool = False, seed: int = 0) -> Roles:
    """Freshly initialised roles of one `glm_config`, sharded over `mesh` (tests, benchmarks).
    The policy, critic and reward model get seeds seed, seed + 1, seed + 2; the reference is a
    copy of the policy."""
    check_model_fits_mesh(glm_config, mesh)

    def fresh(head: str, offset: int) -> Role:
        model = HEADS[head](glm_config, rngs=nnx.Rngs(seed + offset))
        graphdef, params = nnx.split(model)
        return Role(graphdef, shard_state(params, mesh), glm_config)

    policy = fresh("lm", 0)
    return Roles(policy, reference=_reference(policy, "", mesh) if reference else None,
                 critic=fresh("value", 1) if critic else None,
                 reward=fresh("reward", 2) if reward else None)


def _abstract(tree: Any, shardings: Any) -> Any:
    """`tree` (arrays, Variables or ShapeDtypeStructs) as ShapeDtypeStructs placed by
    `shardings` (one per Variable or leaf, as `state_shardings` gives)."""
    def one(sharding: jax.sharding.NamedSharding, x: Any) -> Any:
        value = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x.replace(value) if isinstance(x, nnx.Variable) else value

    return jax.tree.map(one, shardings, tree)


def abstract_role(glm_config: GlmConfig, head: str, mesh: Mesh) -> Role:
    """The `head` model of `glm_config` with abstract parameters placed by the logical-axis
    rules: nothing is allocated."""
    check_model_fits_mesh(glm_config, mesh)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: HEADS[head](glm_config,
                                                                   rngs=nnx.Rngs(0))))
    return Role(graphdef, _abstract(params, state_shardings(params, mesh)), glm_config)


def abstract_roles(config: ConfigDict, mesh: Mesh, *, reference: bool = False,
                   reward: bool = False, critic: bool = False) -> Roles:
    """`roles_from_config`'s roles, abstract: the same shapes, dtypes and shardings, read from
    config.json files alone."""
    model_config = model_config_from_config(config)
    frozen_config = model_config.replace(**frozen_overrides(config))
    policy_config = model_config_from_config(config, "policy")
    policy = abstract_role(policy_config, "lm", mesh)
    if policy_config.lora_rank:  # the base in frozen_dtype
        policy = _abstract_frozen_cast(policy, frozen_config.param_dtype)
    roles = Roles(
        policy,
        reference=(abstract_role(frozen_config, "lm", mesh)
                   if reference and not policy_config.lora_rank else None),
        reward=abstract_role(frozen_config, "reward", mesh) if reward else None)
    if not critic:
        return roles
    lora = lora_overrides(config, "critic")
    init = config.ppo.critic_init
    if lora and ((init == "policy" and policy_config.lora_rank) or
                 (init == "reward" and reward)):
        critic_config = model_config.replace(**lora)
        full = abstract_role(critic_config, "value", mesh)
        trained = nnx.split_state(full.params, is_trained, ...)[0]
        return dataclasses.replace(roles, critic=Role(full.graphdef, trained, critic_config),
                                   critic_base="policy" if init == "policy" else "reward")
    critic_role = abstract_role(model_config.replace(**lora), "value", mesh)
    if lora:
        critic_role = _abstract_frozen_cast(critic_role, frozen_config.param_dtype)
    return dataclasses.replace(roles, critic=critic_role)


def _abstract_frozen_cast(role: Role, dtype: str) -> Role:
    """An abstract LoRA role with its frozen part in `dtype`, as `cast_frozen` makes it."""
    trained, frozen = nnx.split_state(role.params, is_trained, ...)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding),
                          frozen)
    return dataclasses.replace(role, params=nnx.merge_state(frozen, trained))


def abstract_like(tree: Any, mesh: Mesh) -> Any:
    """Abstract arrays of `tree`'s shapes (e.g. `jax.eval_shape`'s output) placed by the
    logical-axis rules, as `state_shardings` places real ones."""
    return _abstract(tree, state_shardings(tree, mesh))
