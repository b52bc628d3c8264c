"""Every training program compiled before anything is loaded: abstract parameters
(`nnx.eval_shape`, nothing allocated) with their real shardings, abstract batches of the
config's shapes, XLA's memory analysis read from the compiled program.

`compile_program(config, "rm", mesh)` is what `benchmarks/memory.py` tabulates for real model
shapes on forced CPU devices, and `preflight` is what each training script runs before its
weights load: it refuses a program that will not fit the device, naming the figure and the
knobs, and prints the figure where the device has no limit (CPU).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from glm_jax.models.lora import partition
from glm_jax.sharding import logical_to_spec
from glm_jax.train.common import model_config_from_config
from glm_jax.train.programs import GIB, StepCost, check_fits, device_memory_limit, step_cost
from glm_jax.train.roles import abstract_like, abstract_role, abstract_roles
from glm_jax.train.state import TrainState, optimizer_from_config

PROGRAMS = ("sft", "rm", "dpo", "ppo")


def abstract_batch(mesh: Mesh, spec: dict[str, tuple[tuple[int, ...], Any]]
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """{key: (shape, dtype)} as abstract arrays whose rows split over the data-parallel axes
    (as the training loop places real batches)."""
    def place(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        axes = ("batch",) + (None,) * (len(shape) - 1)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
            mesh, logical_to_spec(axes, shape, mesh)))

    return {key: place(shape, dtype) for key, (shape, dtype) in spec.items()}


def _scalar(mesh: Mesh, dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _train_state(config: ConfigDict, head: str, section: ConfigDict, mesh: Mesh, lora_role: str
                 ) -> tuple[nnx.GraphDef, optax.GradientTransformation, optax.Schedule,
                            TrainState]:
    role = abstract_role(model_config_from_config(config, lora_role), head, mesh)
    tx, schedule = optimizer_from_config(section, config.model.moment_dtype)
    state = TrainState(step=_scalar(mesh, jnp.int32), params=role.params,
                       opt_state=abstract_like(jax.eval_shape(tx.init,
                                                              partition(role.params)[0]), mesh))
    return role.graphdef, tx, schedule, state


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def _pair_batch(config: ConfigDict, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    length = config.data.max_prompt_tokens + config.data.max_response_tokens
    spec = {}
    for name in ("chosen", "rejected"):
        spec[f"{name}_ids"] = ((batch_size, length), jnp.int32)
        for mask in ("mask", "response_mask"):
            spec[f"{name}_{mask}"] = ((batch_size, length), jnp.bool_)
    return spec


def sft_program(config: ConfigDict, mesh: Mesh) -> tuple[Callable, tuple[Any, ...]]:
    """The SFT step and its abstract (state, batch)."""
    from glm_jax.train import sft

    graphdef, tx, schedule, state = _train_state(config, "lm", config.sft, mesh, "sft")
    length = config.data.max_prompt_tokens + config.data.max_response_tokens
    spec = {"input_ids": ((config.sft.batch_size, length), jnp.int32),
            "attention_mask": ((config.sft.batch_size, length), jnp.bool_),
            "loss_mask": ((config.sft.batch_size, length), jnp.bool_)}
    if config.sft.packing:
        spec["segment_ids"] = ((config.sft.batch_size, length), jnp.int32)
    batch = abstract_batch(mesh, spec)
    step = sft.make_train_step(graphdef, tx, schedule, _shardings(state), _shardings(batch))
    return step, (state, batch)


def rm_program(config: ConfigDict, mesh: Mesh) -> tuple[Callable, tuple[Any, ...]]:
    """The reward-model step and its abstract (state, batch of rm.batch_size pairs)."""
    from glm_jax.train import reward

    graphdef, tx, schedule, state = _train_state(config, "reward", config.rm, mesh, "reward")
    batch = abstract_batch(mesh, _pair_batch(config, config.rm.batch_size))
    step = reward.make_train_step(graphdef, tx, schedule, config.rm.l2_coef, _shardings(state),
                                  _shardings(batch))
    return step, (state, batch)


def dpo_program(config: ConfigDict, mesh: Mesh) -> tuple[Callable, tuple[Any, ...]]:
    """The offline DPO step (reference log-probs cached) and its abstract (state, batch)."""
    from glm_jax.train import dpo

    graphdef, tx, schedule, state = _train_state(config, "lm", config.dpo, mesh, "policy")
    size = config.dpo.batch_size
    spec = {**_pair_batch(config, size), "ref_chosen_logps": ((size,), jnp.float32),
            "ref_rejected_logps": ((size,), jnp.float32)}
    batch = abstract_batch(mesh, spec)
    step = dpo.make_train_step(graphdef, tx, schedule, config.dpo.beta, config.dpo.sft_coef,
                               _shardings(state), _shardings(batch))
    return step, (state, batch)


def ppo_program(config: ConfigDict, mesh: Mesh) -> tuple[Callable, tuple[Any, ...]]:
    """The fused RL iteration of config.ppo.algorithm and its abstract (state, frozen
    parameters, batch): the policy (and PPO's critic) trained, the reference and the reward
    model frozen. With a rule reward (config.ppo.reward_rule), the program after the rollout,
    `learn`, and its abstract (state, frozen, rollout, batch, scores)."""
    from glm_jax.train import ppo, rl
    from glm_jax.train.rollout import SamplingSettings

    section, data = config.ppo, config.data
    settings = rl.RLSettings.from_config(config)
    rule = bool(section.reward_rule)
    roles = abstract_roles(config, mesh, reward=not rule, **rl.required_roles(settings))
    model_config = roles.policy.config
    sampling = SamplingSettings(max_new_tokens=data.max_response_tokens,
                                eos_token_ids=tuple(model_config.eos_token_id),
                                pad_token_id=model_config.pad_token_id,
                                temperature=section.temperature,
                                top_k=section.top_k, top_p=section.top_p)
    optimizers = ppo.rl_optimizers(config, settings)
    program, _, frozen = rl.make_rl(settings, roles, sampling, optimizers, init_state=False)

    def opt_state(name: str, params: Any) -> Any:
        return abstract_like(jax.eval_shape(optimizers[name][0].init, partition(params)[0]),
                             mesh)

    critic = roles.critic.params if roles.critic else None
    state = rl.RLState(
        step=_scalar(mesh, jnp.int32), params=roles.policy.params,
        opt_state=opt_state("policy", roles.policy.params), critic_params=critic,
        critic_opt_state=None if critic is None else opt_state("critic", critic),
        kl_coef=_scalar(mesh, jnp.float32))
    size, prompt = section.batch_size, data.max_prompt_tokens
    spec = {"prompt_ids": ((size, prompt), jnp.int32),
            "prompt_mask": ((size, prompt), jnp.bool_), "ref_reward": ((size,), jnp.float32)}
    if section.sft_coef > 0:
        rows = settings.updates_per_iteration * section.sft_batch_size
        length = prompt + data.max_response_tokens
        spec |= {"sft_input_ids": ((rows, length), jnp.int32),
                 "sft_attention_mask": ((rows, length), jnp.bool_),
                 "sft_loss_mask": ((rows, length), jnp.bool_)}
    batch = abstract_batch(mesh, spec)
    if not rule:
        iteration = program.jit_iteration(_shardings(state), _shardings(batch))
        return iteration, (state, frozen, batch)
    # Rule rewards: the larger of the two programs, everything after the rollout.
    rows, response = settings.rollout_size, data.max_response_tokens
    rollout = rl.Rollout(**abstract_batch(mesh, {
        "prompt_ids": ((rows, prompt), jnp.int32), "prompt_mask": ((rows, prompt), jnp.bool_),
        "tokens": ((rows, response), jnp.int32),
        "response_mask": ((rows, response), jnp.bool_),
        "sampler_logps": ((rows, response), jnp.float32),
        "ended_with_eos": ((rows,), jnp.bool_)}))
    scores = abstract_batch(mesh, {"scores": ((rows,), jnp.float32)})["scores"]
    learn = jax.jit(program.learn, out_shardings=(_shardings(state), None), donate_argnums=0)
    return learn, (state, frozen, rollout, batch, scores)


BUILDERS = {"sft": sft_program, "rm": rm_program, "dpo": dpo_program, "ppo": ppo_program}


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """One program compiled abstractly: XLA's per-device memory, the compile time, and the
    executable with the abstract arguments it was compiled for (a training loop whose real
    arguments match runs it instead of compiling again)."""

    program: str
    cost: StepCost
    compile_seconds: float
    compiled: Any = None
    args: tuple[Any, ...] = ()

    def accepts(self, *args: Any) -> bool:
        """Whether `args` have exactly the structure, shapes, dtypes and shardings compiled."""
        if jax.tree.structure(args) != jax.tree.structure(self.args):
            return False
        return all(a.shape == b.shape and a.dtype == b.dtype
                   and a.sharding.is_equivalent_to(b.sharding, len(a.shape))
                   for a, b in zip(jax.tree.leaves(args), jax.tree.leaves(self.args),
                                   strict=True))


def compile_program(config: ConfigDict, program: str, mesh: Mesh) -> ProgramCost:
    """Lowers and compiles `program` ("sft", "rm", "dpo", "ppo") of `config` on `mesh` with
    abstract parameters and batches, and reads its memory analysis."""
    if program not in BUILDERS:
        raise ValueError(f"program {program!r}; choose one of {', '.join(PROGRAMS)}")
    began = time.perf_counter()
    with jax.set_mesh(mesh):
        step, args = BUILDERS[program](config, mesh)
        compiled = step.lower(*args).compile()
    return ProgramCost(program, step_cost(compiled), time.perf_counter() - began, compiled,
                       args)


KNOBS = ("config.model.remat (full), a smaller batch size or sequence lengths, more sharding "
         "(config.mesh.fsdp / tensor), bfloat16 weights (config.model.param_dtype / "
         "frozen_dtype / moment_dtype)")


def preflight(config: ConfigDict, program: str, mesh: Mesh, desc: str) -> ProgramCost:
    """Compiles `program` abstractly before any weights load and raises MemoryError when it
    needs more than a device has, naming the figure and the knobs; prints the figure."""
    result = compile_program(config, program, mesh)
    limit = device_memory_limit(jax.local_devices()[0])
    check_fits(result.cost, desc, limit, "program", f"; nothing was loaded. Try {KNOBS}")
    where = "no device limit" if limit is None else f"of {limit / GIB:.1f} GiB per device"
    print(f"{desc} pre-flight: the compiled program needs {result.cost.describe()} "
          f"({where}); compiled in {result.compile_seconds:.1f} s", flush=True)
    return result
