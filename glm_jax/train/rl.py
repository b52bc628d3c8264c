"""The RL stage's algorithms as one pure program: PPO (paper 3.4, eq. 3-6) and the critic-free
family (GRPO, Dr. GRPO / DAPO, RLOO, REINFORCE++).

`make_rl(settings, roles, sampling, optimizers)` -> (program, state, frozen), purejaxrl's
`make_train` shape: settings are a plain dataclass, the roles (`roles.Roles`) give the graph
definitions and parameters, and nothing reads a config or a file. One iteration is

  rollout  `num_generations` responses to each of `batch_size` prompts (`lax.while_loop` over
           a static KV cache); row p * G + g is response g to prompt p (prompt-major), so a
           group is a reshape;
  score    the sequence score (reward model on the response's last token, or a rule's rewards
           computed on the host), minus the cached reference response's reward (eq. 5), minus
           the no-EOS and overlong penalties; the per-token KL against the reference (eq. 4);
           the policy's own log-probs (and the critic's values); the advantages of
           `settings.algorithm`:
             ppo           GAE over eq. 4's KL-penalised token rewards, with the critic
             grpo          (score - group mean) / group std (`scale_by_std=False`: Dr. GRPO)
             rloo          score - the mean of the other responses to the same prompt
             reinforce_pp  eq. 4's reward-to-go, normalised over the whole batch
  update   `ppo_epochs` shuffled passes of minibatch updates in `lax.scan`, each the shared
           `loop.train_step` on the clipped surrogate (clip_low / clip_high), + the value loss
           with a critic, + the k3 KL loss when the KL is a loss term, + eq. 6's SFT term.

`RLProgram.iteration` runs all three as ONE jitted program with donated state (the reward
model's path); `RLProgram.learn` is score + update alone, for rewards computed on the host
between two programs (rule rewards), and `step_by_step` splits the iteration into three
programs with host transfers (debugging, and the benchmark's comparison).

Token contract: prompts are left-padded to P tokens, the sequence is `[prompt | response]`
with `T = P + R`, response token t is predicted from position `P - 1 + t`, and the response
mask covers tokens up to and including EOS, never padding. Old log-probs (and values) come
from the trainer's own forward pass over the same minibatch shapes, so the first minibatch's
ratio is 1 up to float reassociation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from glm_jax.losses import (
    KLKind,
    clipped_policy_loss,
    gae,
    groups_without_signal,
    grpo_advantages,
    kl_loss,
    kl_penalised_token_rewards,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
    ppo_value_loss,
    reference_relative_reward,
    reinforce_pp_advantages,
    rloo_advantages,
)
from glm_jax.models.heads import GlmForCausalLM, GlmValueModel
from glm_jax.models.lora import (
    base_graphdef,
    base_state,
    has_adapters,
    partition,
    split_trained,
    unpartition,
)
from glm_jax.sharding import batch_sharding as batch_sharding_of
from glm_jax.sharding import global_to_device, to_host
from glm_jax.train.loop import train_step
from glm_jax.train.roles import Roles
from glm_jax.train.rollout import SamplingSettings, sequence
from glm_jax.train.sft import sft_batch_loss
from glm_jax.train.state import TrainState, init_opt_state, per_part, replicated_like

Params = Any

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
# Where each algorithm puts the KL against the reference by default: PPO, RLOO and REINFORCE++
# penalise the reward (eq. 4), GRPO adds a k3 loss term.
KL_IN_DEFAULT = {"ppo": "reward", "grpo": "loss", "rloo": "reward", "reinforce_pp": "reward"}
GROUP_ALGORITHMS = ("grpo", "rloo")  # those whose baseline is the prompt's other responses


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The static hyperparameters of an iteration (config.ppo's fields of the same names; see
    configs/tiny.py). batch_size counts prompts, minibatch_size sequences: an iteration samples
    batch_size * num_generations sequences."""

    seed: int
    algorithm: str = "ppo"
    batch_size: int = 16
    num_generations: int = 1
    minibatch_size: int = 8
    ppo_epochs: int = 2
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_value: float = 0.2
    value_coef: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_kind: KLKind = "k1"
    kl_in: str = "reward"
    kl_coef: float = 0.05
    kl_target: float = 0.0
    kl_horizon: float = 10000
    loss_aggregation: str = "token_mean"
    scale_by_std: bool = True
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    mask_equal_groups: bool = False
    sft_coef: float = 0.0
    sft_batch_size: int = 8
    no_eos_penalty: float = 0.0
    overlong_buffer: int = 0
    overlong_coef: float = 1.0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"config.ppo.algorithm={self.algorithm!r}; choose one of "
                             f"{', '.join(ALGORITHMS)}")
        if self.algorithm in GROUP_ALGORITHMS and self.num_generations < 2:
            raise ValueError(
                f"config.ppo.algorithm={self.algorithm!r} with config.ppo.num_generations="
                f"{self.num_generations}: its baseline is the other responses to the same "
                "prompt, so it needs num_generations >= 2 (e.g. --config.ppo.num_generations=4)")
        if self.rollout_size % self.minibatch_size:
            raise ValueError(
                f"config.ppo.batch_size={self.batch_size} x num_generations="
                f"{self.num_generations} = {self.rollout_size} sequences per iteration is not a "
                f"multiple of config.ppo.minibatch_size={self.minibatch_size}")
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"config.ppo.kl_in={self.kl_in!r}; choose 'reward', 'loss' or "
                             "'' (the algorithm's own)")

    @classmethod
    def from_config(cls, config: Any) -> RLSettings:
        ppo = config.ppo
        fields = {f.name for f in dataclasses.fields(cls)} - {"seed", "kl_in"}
        return cls(seed=config.seed, kl_in=ppo.kl_in or KL_IN_DEFAULT.get(ppo.algorithm, ""),
                   **{name: ppo[name] for name in fields})

    @property
    def rollout_size(self) -> int:
        """Sequences sampled per iteration."""
        return self.batch_size * self.num_generations

    @property
    def num_minibatches(self) -> int:
        return self.rollout_size // self.minibatch_size

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def uses_reference(self) -> bool:
        """False when the KL has a fixed coefficient of 0: no reference forward pass at all."""
        return self.kl_coef > 0 or self.kl_target > 0


@struct.dataclass
class RLState:
    """Everything the RL stage trains, as one pytree (checkpointed whole).

    step: int32 scalar, iterations done. params / opt_state: the policy's. critic_params /
    critic_opt_state: the critic's (None without one). kl_coef: float32 scalar, the KL
    controller's current coefficient (constant unless adaptive).
    """

    step: jax.Array
    params: Params
    opt_state: Any
    critic_params: Params
    critic_opt_state: Any
    kl_coef: jax.Array


@struct.dataclass
class Rollout:
    """prompt_ids, prompt_mask: `[N, P]`; tokens, response_mask, sampler_logps: `[N, R]`
    (sampler_logps are the generator's untempered log-probs); ended_with_eos: `[N]` bool.
    N = batch_size * num_generations, prompt-major."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    sampler_logps: jax.Array
    ended_with_eos: jax.Array


@struct.dataclass
class Experience:
    """What the updates train on. ids, mask: `[N, T]`; tokens, response_mask (the tokens that
    count in the loss), old_logps, advantages: `[N, R]`; with a critic old_values, returns
    `[N, R]`; with the KL as a loss term ref_logps `[N, R]` (else None)."""

    ids: jax.Array
    mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    old_logps: jax.Array
    advantages: jax.Array
    old_values: jax.Array | None = None
    returns: jax.Array | None = None
    ref_logps: jax.Array | None = None


def response_logprobs(policy: GlmForCausalLM, ids: jax.Array, mask: jax.Array,
                      tokens: jax.Array, *, with_entropy: bool = False
                      ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """float32 log-probs of the response `tokens` `[b, R]` (and their entropies) from `[b, T]`
    sequences; only the response positions go through the LM head, in chunks."""
    hidden, _ = policy.model(ids, mask)
    prompt_length = ids.shape[1] - tokens.shape[1]
    return policy.token_logprobs(hidden[:, prompt_length - 1:-1], tokens,
                                 with_entropy=with_entropy)


def response_values(critic: GlmValueModel, ids: jax.Array, mask: jax.Array,
                    prompt_length: int) -> jax.Array:
    """V(state before response token t): `[b, R]` float32."""
    return critic(ids, mask)[:, prompt_length - 1:-1]


def _in_minibatches(fn: Callable, num: int, *trees: Any) -> Any:
    """`fn` over `num` consecutive row chunks of `trees` (leading axis N) with `lax.map`, the
    results concatenated back: the same minibatch shapes as the updates, and 1/num of the
    activations in memory at a time."""
    chunked = jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), trees)
    out = jax.lax.map(lambda xs: fn(*xs), chunked)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect critic)."""
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask),
                                                                   1e-8)


def adaptive_kl_coef(kl_coef: jax.Array, kl: jax.Array, settings: RLSettings) -> jax.Array:
    """Ziegler et al.'s proportional controller: move the coefficient so the mean sequence KL
    approaches kl_target (kl_target 0: fixed coefficient)."""
    if settings.kl_target <= 0:
        return kl_coef
    error = jnp.clip(kl / settings.kl_target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * settings.rollout_size / settings.kl_horizon)


def advantages_of(settings: RLSettings, scores: jax.Array, kl: jax.Array,
                  response_mask: jax.Array, kl_coef: jax.Array,
                  values: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The advantages `[N, R]` of `settings.algorithm` (and PPO's returns `[N, R]`, else None).

    scores: `[N]` sequence scores (eq. 5's baseline and the penalties already applied).
    kl: `[N, R]` per-token KL estimates (zeros without a reference). values: `[N, R]` the
    critic's (PPO only). With the KL in the reward, it is eq. 4's per-token penalty for PPO
    and REINFORCE++, and its sequence sum for the group estimators (trl's RLOO).
    """
    s, mask = settings, response_mask
    kl_coef_in_reward = kl_coef if s.kl_in == "reward" else jnp.zeros_like(kl_coef)
    if s.algorithm == "ppo":
        rewards = kl_penalised_token_rewards(scores, kl, mask, kl_coef_in_reward)
        if s.whiten_rewards:
            # Rescale only: a shifted reward would change which responses are "good".
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return advantages, returns
    if s.algorithm == "reinforce_pp":
        return reinforce_pp_advantages(scores, kl, mask, kl_coef_in_reward, s.gamma), None
    rewards = scores - kl_coef_in_reward * jnp.sum(jnp.where(mask, kl, 0.0), axis=1)
    if s.algorithm == "grpo":
        per_sequence = grpo_advantages(rewards, s.num_generations, s.scale_by_std)
    else:
        per_sequence = rloo_advantages(rewards, s.num_generations)
    return jnp.where(mask, per_sequence[:, None], 0.0), None


@dataclasses.dataclass(frozen=True)
class RLProgram:
    """The pure phases of an iteration and their compositions. Graph definitions, settings and
    optimizers are static; parameters come in as arguments: the trained ones in the state, the
    frozen ones in `frozen` ({"reference": ..., "reward": ...}, either absent)."""

    settings: RLSettings
    sampling: SamplingSettings
    policy: nnx.GraphDef
    critic: nnx.GraphDef | None
    reward: nnx.GraphDef | None
    tx: optax.GradientTransformation  # over {"policy": ..., "critic": ...}
    schedule: optax.Schedule  # the policy's, over minibatch updates
    # With low-rank adapters on the policy, the reference is its own base with the adapters
    # off: this graph run on `base_state(state.params)`, no copy (None: `frozen["reference"]`).
    reference_base: nnx.GraphDef | None = None
    # A LoRA critic holds only its adapters and head; its frozen backbone is the policy's
    # base ("policy") or the reward model's ("reward"); "": the critic holds its own.
    critic_base: str = ""

    def critic_module(self, critic_params: Params, policy_params: Params,
                      frozen: Mapping[str, Params]) -> nnx.Module:
        """The critic of `critic_params`, with the backbone it shares (`critic_base`)."""
        if not self.critic_base:
            return nnx.merge(self.critic, critic_params)
        source = (split_trained(policy_params)[1] if self.critic_base == "policy"
                  else frozen["reward"])
        return nnx.merge(self.critic, critic_params, nnx.State({"model": source["model"]}))

    def rng(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sampling key, shuffling key) of iteration `step`: a pure function of (seed, step),
        so a resumed run samples exactly what the uninterrupted one did."""
        key = jax.random.fold_in(jax.random.key(self.settings.seed), step)
        return jax.random.split(key)

    def rollout(self, state: RLState, batch: Mapping[str, jax.Array]) -> Rollout:
        """batch: `prompt_ids`, `prompt_mask` `[batch_size, P]`."""
        group = self.settings.num_generations
        prompt_ids = jnp.repeat(batch["prompt_ids"], group, axis=0)
        prompt_mask = jnp.repeat(batch["prompt_mask"], group, axis=0)
        policy = nnx.merge(self.policy, state.params)
        out = self.sampling.sample(policy, prompt_ids, prompt_mask, self.rng(state.step)[0])
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=out.tokens,
                       response_mask=out.response_mask, sampler_logps=out.logprobs,
                       ended_with_eos=out.ended_with_eos)

    def score(self, state: RLState, frozen: Mapping[str, Params], rollout: Rollout,
              batch: Mapping[str, jax.Array], raw_scores: jax.Array | None = None
              ) -> tuple[Experience, dict[str, jax.Array]]:
        """Scores, KL, old log-probs (and values), advantages. batch: `ref_reward`
        `[batch_size]`, the reward of the reference response to each prompt (zeros when eq. 5
        is off). raw_scores: `[N]` rewards computed on the host (rule rewards); None: the
        reward model's."""
        s, prompt_length = self.settings, rollout.prompt_ids.shape[1]
        ids, mask = sequence(rollout.prompt_ids, rollout.prompt_mask, rollout)
        response_mask, tokens = rollout.response_mask, rollout.tokens

        def forward(ids, mask, tokens):
            def logps(graphdef, params):
                return response_logprobs(nnx.merge(graphdef, params), ids, mask, tokens)

            out = {"old_logps": logps(self.policy, state.params)}
            if self.reference_base is not None:
                out["ref_logps"] = logps(self.reference_base, base_state(state.params))
            elif "reference" in frozen:
                out["ref_logps"] = logps(self.policy, frozen["reference"])
            if self.critic is not None:
                critic = self.critic_module(state.critic_params, state.params, frozen)
                out["old_values"] = response_values(critic, ids, mask, prompt_length)
            if raw_scores is None:
                out["raw_scores"] = nnx.merge(self.reward, frozen["reward"])(ids, mask)
            return out

        forwarded = _in_minibatches(forward, s.num_minibatches, ids, mask, tokens)
        old_logps = forwarded["old_logps"]
        raw_scores = forwarded["raw_scores"] if raw_scores is None else raw_scores
        ref_rewards = jnp.repeat(batch["ref_reward"], s.num_generations)
        scores = reference_relative_reward(raw_scores, ref_rewards)
        scores = jnp.where(rollout.ended_with_eos, scores, scores - s.no_eos_penalty)
        lengths = jnp.sum(response_mask, axis=1, dtype=jnp.float32)
        if s.overlong_buffer:
            scores = scores + s.overlong_coef * overlong_penalty(
                lengths, self.sampling.max_new_tokens, s.overlong_buffer)
        ref_logps = forwarded.get("ref_logps")
        kl = (jnp.zeros_like(old_logps) if ref_logps is None
              else jnp.where(response_mask, kl_penalty(old_logps, ref_logps, s.kl_kind), 0.0))
        advantages, returns = advantages_of(s, scores, kl, response_mask, state.kl_coef,
                                            forwarded.get("old_values"))
        loss_mask = response_mask
        stats = {
            "reward": jnp.mean(raw_scores), "reference_reward": jnp.mean(ref_rewards),
            "reward_minus_reference": jnp.mean(raw_scores - ref_rewards),
            "score": jnp.mean(scores), "kl_coef": state.kl_coef,
            "response_length": jnp.mean(lengths),
            "ended_with_eos": jnp.mean(rollout.ended_with_eos.astype(jnp.float32)),
            # Generator vs trainer log-probs of the same tokens: should be float noise.
            "sampler_logp_diff": jnp.max(jnp.where(
                response_mask, jnp.abs(rollout.sampler_logps - old_logps), 0.0)),
        }
        if ref_logps is not None:
            stats["kl"] = jnp.mean(jnp.sum(kl, axis=1))
        if s.num_generations > 1:
            fraction, keep = groups_without_signal(scores, s.num_generations)
            stats["equal_reward_groups"] = fraction
            if s.mask_equal_groups:
                loss_mask = response_mask & keep[:, None]
        if returns is not None:
            stats["explained_variance"] = explained_variance(forwarded["old_values"], returns,
                                                             response_mask)
        experience = Experience(
            ids=ids, mask=mask, tokens=tokens, response_mask=loss_mask, old_logps=old_logps,
            advantages=advantages, old_values=forwarded.get("old_values"), returns=returns,
            ref_logps=ref_logps if s.kl_in == "loss" else None)
        return experience, stats

    def loss(self, params: dict[str, Params], frozen: Mapping[str, Params],
             batch: tuple[Experience, Any], kl_coef: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The minibatch loss over {"policy": ..., "critic": ...} parameters; batch:
        (minibatch, SFT rows or None)."""
        s = self.settings
        minibatch, sft_minibatch = batch
        policy = nnx.merge(self.policy, params["policy"])
        logps, entropy = response_logprobs(policy, minibatch.ids, minibatch.mask,
                                           minibatch.tokens, with_entropy=True)
        mask = minibatch.response_mask
        loss, stats = clipped_policy_loss(logps, minibatch.old_logps, minibatch.advantages,
                                          mask, s.clip_low, s.clip_high, s.loss_aggregation)
        stats = {"policy_loss": loss, **stats, "entropy": masked_mean(entropy, mask),
                 "ratio_max_deviation": jax.lax.stop_gradient(jnp.max(jnp.where(
                     mask, jnp.abs(jnp.expm1(logps - minibatch.old_logps)), 0.0)))}
        if self.critic is not None:
            prompt_length = minibatch.ids.shape[1] - minibatch.tokens.shape[1]
            critic = self.critic_module(params["critic"], params["policy"], frozen)
            values = response_values(critic, minibatch.ids, minibatch.mask, prompt_length)
            value_loss, value_stats = ppo_value_loss(values, minibatch.old_values,
                                                     minibatch.returns, mask, s.clip_value)
            loss = loss + s.value_coef * value_loss
            stats |= {"value_loss": value_loss, **value_stats}
        if minibatch.ref_logps is not None:
            kl_term = kl_loss(logps, minibatch.ref_logps, mask, kl_coef, s.kl_kind,
                              s.loss_aggregation)
            loss = loss + kl_term
            stats["kl_loss"] = kl_term
        if sft_minibatch is not None:
            sft, _ = sft_batch_loss(policy, sft_minibatch)
            loss = loss + s.sft_coef * sft
            stats["sft_loss"] = sft
        return loss, stats

    def update(self, state: RLState, frozen: Mapping[str, Params], experience: Experience,
               sft_batch: Mapping[str, jax.Array] | None
               ) -> tuple[RLState, dict[str, jax.Array]]:
        """`ppo_epochs` passes over shuffled minibatches in one `lax.scan`, each update the
        shared `loop.train_step`. sft_batch: rows `[updates_per_iteration * sft_batch_size, L]`,
        one slice per update (or None)."""
        s = self.settings
        shuffle_key = self.rng(state.step)[1]
        order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(shuffle_key, e),
                                                        s.rollout_size)
                                 for e in range(s.ppo_epochs)])
        order = order.reshape(s.updates_per_iteration, s.minibatch_size)
        # A LoRA model's frozen base stays out of the scan's carry: only what trains loops.
        trained, base = partition(_parts(state.params, state.critic_params))
        step = train_step(lambda params, batch: self.loss(unpartition(params, base), frozen,
                                                          batch, state.kl_coef),
                          self.tx, self.schedule)

        def one_update(train: TrainState, xs):
            rows, number = xs
            minibatch = jax.tree.map(lambda x: x[rows], experience)
            sft_minibatch = None if sft_batch is None else jax.tree.map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, number * s.sft_batch_size,
                                                       s.sft_batch_size), sft_batch)
            return step(train, (minibatch, sft_minibatch))

        train = TrainState(step=state.step * s.updates_per_iteration, params=trained,
                           opt_state=_parts(state.opt_state, state.critic_opt_state))
        train, per_update = jax.lax.scan(one_update, train,
                                         (order, jnp.arange(s.updates_per_iteration)))
        stats = {name: jnp.mean(value) for name, value in per_update.items()}
        stats["skipped_nonfinite"] = jnp.sum(per_update["skipped_nonfinite"])
        # The first update runs with the rollout's parameters: its ratio must be 1.
        stats["first_ratio_max_deviation"] = per_update["ratio_max_deviation"][0]
        params = unpartition(train.params, base)
        new_state = state.replace(
            step=state.step + 1, params=params["policy"],
            opt_state=train.opt_state["policy"], critic_params=params.get("critic"),
            critic_opt_state=train.opt_state.get("critic"))
        return new_state, stats

    def learn(self, state: RLState, frozen: Mapping[str, Params], rollout: Rollout,
              batch: Mapping[str, jax.Array], raw_scores: jax.Array | None = None
              ) -> tuple[RLState, dict[str, jax.Array]]:
        """Score + update + the KL controller: everything after the rollout."""
        experience, score_stats = self.score(state, frozen, rollout, batch, raw_scores)
        state, update_stats = self.update(state, frozen, experience, _sft_part(batch))
        if "kl" in score_stats:
            state = state.replace(kl_coef=adaptive_kl_coef(state.kl_coef, score_stats["kl"],
                                                           self.settings))
        return state, {**score_stats, **update_stats}

    def iteration(self, state: RLState, frozen: Mapping[str, Params],
                  batch: Mapping[str, jax.Array]) -> tuple[RLState, dict[str, jax.Array]]:
        """One whole iteration (the fused program). batch: `prompt_ids`, `prompt_mask`
        `[batch_size, P]`, `ref_reward` `[batch_size]`, and with eq. 6 on, the SFT rows
        (`sft_input_ids`, `sft_attention_mask`, `sft_loss_mask`)."""
        return self.learn(state, frozen, self.rollout(state, batch), batch)

    def jit_iteration(self, state_sharding: Any, batch_sharding: Any
                      ) -> Callable[..., tuple[RLState, dict[str, jax.Array]]]:
        """The fused iteration, jitted with explicit shardings; the state is donated."""
        return jax.jit(self.iteration, in_shardings=(state_sharding, None, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0)

    def step_by_step(self, state_sharding: Any, batch_sharding: Any
                     ) -> Callable[..., tuple[RLState, dict[str, jax.Array]]]:
        """The same iteration as three programs with the rollout and the experience fetched
        to the host in between (what a sampler/trainer split costs), for debugging."""
        rollout_fn = jax.jit(self.rollout)
        score_fn = jax.jit(self.score)

        def update(state, frozen, experience, batch):
            return self.update(state, frozen, experience, _sft_part(batch))

        update_fn = jax.jit(update, out_shardings=(state_sharding, None), donate_argnums=0)

        def iteration(state, frozen, batch):
            rollout = jax.device_get(rollout_fn(state, batch))
            experience, score_stats = jax.device_get(score_fn(state, frozen, rollout, batch))
            state, update_stats = update_fn(state, frozen, experience, batch)
            if "kl" in score_stats:
                state = state.replace(kl_coef=adaptive_kl_coef(
                    state.kl_coef, score_stats["kl"], self.settings))
            return state, {**score_stats, **update_stats}

        return iteration

    def with_host_rewards(self, host_scores: Callable[[Rollout, Mapping[str, Any]], Any],
                          state_sharding: Any, batch_sharding: Any
                          ) -> Callable[..., tuple[RLState, dict[str, jax.Array]]]:
        """The iteration as two programs with the rewards computed on the host between them
        (rule rewards): the rollout; `host_scores(rollout, batch)` on host copies of both,
        returning `[N]` float32; then `learn`, with the state donated."""
        rollout_fn = jax.jit(self.rollout, in_shardings=(state_sharding, batch_sharding))
        learn_fn = jax.jit(self.learn, out_shardings=(state_sharding, None), donate_argnums=0)

        def iteration(state, frozen, batch):
            rollout = rollout_fn(state, batch)
            scores = {"scores": np.asarray(host_scores(to_host(rollout), to_host(batch)),
                                           np.float32)}
            mesh = rollout.tokens.sharding.mesh
            scores = global_to_device(scores, batch_sharding_of(mesh, scores))["scores"]
            return learn_fn(state, frozen, rollout, batch, scores)

        return iteration


def _parts(policy: Any, critic: Any) -> dict[str, Any]:
    return {"policy": policy} if critic is None else {"policy": policy, "critic": critic}


def _sft_part(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array] | None:
    if "sft_input_ids" not in batch:
        return None
    return {"input_ids": batch["sft_input_ids"], "attention_mask": batch["sft_attention_mask"],
            "loss_mask": batch["sft_loss_mask"]}


def required_roles(settings: RLSettings) -> dict[str, bool]:
    """Which trained-against roles the algorithm needs (`roles_from_config` keywords); the
    reward model is needed unless the rewards come from a rule."""
    return {"reference": settings.uses_reference, "critic": settings.uses_critic}


def make_rl(settings: RLSettings, roles: Roles, sampling: SamplingSettings,
            optimizers: Mapping[str, tuple[optax.GradientTransformation, optax.Schedule]],
            init_state: bool = True) -> tuple[RLProgram, RLState | None, dict[str, Params]]:
    """The program of `settings.algorithm` over `roles`, its initial state and the frozen
    parameters its iteration reads.

    optimizers: {"policy": (tx, schedule), "critic": (tx, schedule)} (the critic's only with a
    critic); schedules count minibatch updates. The roles must match the settings: a critic
    for PPO and none otherwise, a reference unless the KL coefficient is fixed at 0.
    init_state: False skips the state (the pre-flight builds an abstract one).
    """
    # With adapters on the policy, its base (adapters off) is the reference.
    reference_base = (base_graphdef(GlmForCausalLM, roles.policy.config)
                      if settings.uses_reference and roles.reference is None
                      and has_adapters(roles.policy.params) else None)
    for name, needed in required_roles(settings).items():
        present = getattr(roles, name) is not None or (
            name == "reference" and reference_base is not None)
        if needed != present:
            raise ValueError(f"make_rl: algorithm {settings.algorithm!r} "
                             f"{'needs' if needed else 'takes no'} {name} role")
    txs = {"policy": optimizers["policy"][0]}
    if settings.uses_critic:
        txs["critic"] = optimizers["critic"][0]
    program = RLProgram(settings, sampling, roles.policy.graphdef,
                        roles.critic.graphdef if roles.critic else None,
                        roles.reward.graphdef if roles.reward else None, per_part(txs),
                        optimizers["policy"][1], reference_base=reference_base,
                        critic_base=roles.critic_base if roles.critic else "")
    frozen = {name: role.params for name, role in (("reference", roles.reference),
                                                    ("reward", roles.reward)) if role}
    if not init_state:
        return program, None, frozen
    params = roles.policy.params
    critic = roles.critic.params if roles.critic else None
    state = RLState(step=replicated_like(params, jnp.zeros((), jnp.int32)), params=params,
                    opt_state=init_opt_state(txs["policy"], partition(params)[0]),
                    critic_params=critic,
                    critic_opt_state=(None if critic is None
                                      else init_opt_state(txs["critic"], partition(critic)[0])),
                    kl_coef=replicated_like(params, jnp.asarray(settings.kl_coef, jnp.float32)))
    return program, state, frozen
