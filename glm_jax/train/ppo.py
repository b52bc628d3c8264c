"""PPO with the reference-response reward and capability retention (paper 3.4, eq. 3-6).

Four models: the policy (trained), the critic (trained, its own parameters), the reference
policy (the frozen initial weights) and the reward model (frozen). One iteration is

  rollout  sample a response per prompt (`lax.while_loop` over a static KV cache);
  score    reward on the response's last token (its EOS) minus the cached reward of the
           reference response to the same prompt (eq. 5) minus a penalty when there is no
           EOS; per-token KL against the reference (eq. 4); the policy's and critic's own
           log-probs and values; GAE; optional whitening;
  update   `ppo_epochs` shuffled passes of minibatch updates in `lax.scan`: clipped policy
           loss + value loss (+ eq. 6's next-token loss on supervised data),

and `PPOProgram.iteration` runs all three as ONE jitted program with donated state: no host
round trip and no weight copy between sampler and trainer. `PPOProgram.step_by_step` runs
the same three functions as separate programs with host transfers in between (for debugging
and for the benchmark's comparison).

Token contract: prompts are left-padded to P tokens, the sequence is `[prompt | response]`
with `T = P + R`, response token t is predicted from position `P - 1 + t`, and the response
mask covers tokens up to and including EOS, never padding. Old log-probs and values come
from the trainer's own forward pass over the same minibatches, so the first minibatch's
ratio is 1 (up to float reassociation across programs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from ml_collections import ConfigDict

from glm_jax.config import validate_config
from glm_jax.data.pipeline import SFTDataset
from glm_jax.data.records import read_jsonl
from glm_jax.losses import (
    gae,
    kl_penalised_token_rewards,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reference_relative_reward,
)
from glm_jax.models.heads import (
    GlmForCausalLM,
    GlmRewardModel,
    GlmValueModel,
)
from glm_jax.train.checkpoint import load_trained_model
from glm_jax.train.common import (
    check_tokenizer_fits,
    frozen_overrides,
    load_reward_model,
    mesh_from_config,
    model_from_config,
    read_prompts,
    template_from_config,
    tokenizer_from_config,
    trained_overrides,
)
from glm_jax.train.loop import run_stage, update_if_finite
from glm_jax.train.preflight import preflight
from glm_jax.train.programs import BoundStep, parameter_counts, ppo_iteration_flops
from glm_jax.train.prompts import (
    PromptDataset,
    ZippedBatches,
    cache_key,
    cached_jsonl,
    fingerprint,
    reference_records,
    reward_variance_filter,
)
from glm_jax.train.rollout import (
    SamplingSettings,
    encode_prompt_file,
    sample_prompts,
    sequence,
)
from glm_jax.train.sft import sft_batch_loss
from glm_jax.train.state import (
    copy_params,
    init_opt_state,
    make_optimizer,
    replicated_like,
    shardings_of,
)
from glm_jax.train.workdir import holds_workdir

Params = Any


@struct.dataclass
class PPOState:
    """Everything PPO trains, as one pytree (checkpointed whole).

    step: int32 scalar, iterations done. params / opt_state: the policy's. critic_params /
    critic_opt_state: the critic's. kl_coef: float32 scalar, the KL controller's current
    coefficient (constant unless adaptive).
    """

    step: jax.Array
    params: Params
    opt_state: Any
    critic_params: Params
    critic_opt_state: Any
    kl_coef: jax.Array


@struct.dataclass
class Rollout:
    """prompt_ids, prompt_mask: `[B, P]`; tokens, response_mask, sampler_logps: `[B, R]`
    (sampler_logps are the generator's untempered log-probs); ended_with_eos: `[B]` bool."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    sampler_logps: jax.Array
    ended_with_eos: jax.Array


@struct.dataclass
class Experience:
    """What the updates train on. ids, mask: `[B, T]`; response_mask, tokens, old_logps,
    old_values, advantages, returns: `[B, R]`."""

    ids: jax.Array
    mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    old_logps: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array


@dataclass(frozen=True)
class PPOSettings:
    """The static hyperparameters of an iteration (see `config.ppo` in configs/tiny.py)."""

    seed: int
    batch_size: int
    minibatch_size: int
    ppo_epochs: int
    clip_ratio: float
    clip_value: float
    value_coef: float
    gamma: float
    lam: float
    kl_kind: str
    kl_target: float
    kl_horizon: float
    whiten_rewards: bool
    whiten_advantages: bool
    sft_coef: float
    sft_batch_size: int
    no_eos_penalty: float

    @classmethod
    def from_config(cls, config: ConfigDict) -> PPOSettings:
        ppo = config.ppo
        if ppo.batch_size % ppo.minibatch_size:
            raise ValueError(f"config.ppo.batch_size={ppo.batch_size} must be a multiple of "
                             f"config.ppo.minibatch_size={ppo.minibatch_size}")
        if ppo.kl_kind not in ("k1", "k2", "k3"):
            raise ValueError(f"config.ppo.kl_kind={ppo.kl_kind!r}; choose k1, k2 or k3")
        return cls(seed=config.seed, **{name: ppo[name] for name in (
            "batch_size", "minibatch_size", "ppo_epochs", "clip_ratio", "clip_value",
            "value_coef", "gamma", "lam", "kl_kind", "kl_target", "kl_horizon",
            "whiten_rewards", "whiten_advantages", "sft_coef", "sft_batch_size",
            "no_eos_penalty")})

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.num_minibatches


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
    """`fn` over `num` consecutive row chunks of `trees` (leading axis B) with `lax.map`, the
    results concatenated back: the same minibatch shapes as the updates, and 1/num of the
    activations in memory at a time."""
    chunked = jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), trees)
    out = jax.lax.map(lambda xs: fn(*xs), chunked)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect critic)."""
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask),
                                                                   1e-8)


def adaptive_kl_coef(kl_coef: jax.Array, kl: jax.Array, settings: PPOSettings) -> jax.Array:
    """Ziegler et al.'s proportional controller: move the coefficient so the mean sequence KL
    approaches kl_target (kl_target 0: fixed coefficient)."""
    if settings.kl_target <= 0:
        return kl_coef
    error = jnp.clip(kl / settings.kl_target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * settings.batch_size / settings.kl_horizon)


@dataclass(frozen=True)
class PPOProgram:
    """The three pure phases of an iteration and their compositions. Graph definitions and
    settings are static; parameters come in as arguments."""

    policy_graphdef: nnx.GraphDef
    critic_graphdef: nnx.GraphDef
    reward_graphdef: nnx.GraphDef
    sampling: SamplingSettings
    settings: PPOSettings
    policy_tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation

    def rng(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sampling key, shuffling key) of iteration `step`: a pure function of (seed, step),
        so a resumed run samples exactly what the uninterrupted one did."""
        key = jax.random.fold_in(jax.random.key(self.settings.seed), step)
        return jax.random.split(key)

    def rollout(self, state: PPOState, batch: Mapping[str, jax.Array]) -> Rollout:
        policy = nnx.merge(self.policy_graphdef, state.params)
        out = self.sampling.sample(policy, batch["prompt_ids"], batch["prompt_mask"],
                                   self.rng(state.step)[0])
        return Rollout(prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"],
                       tokens=out.tokens, response_mask=out.response_mask,
                       sampler_logps=out.logprobs, ended_with_eos=out.ended_with_eos)

    def score(self, state: PPOState, ref_params: Params, reward_params: Params,
              rollout: Rollout, ref_rewards: jax.Array
              ) -> tuple[Experience, dict[str, jax.Array]]:
        """Rewards, KL, old log-probs and values, GAE. ref_rewards: `[B]`, the reward of the
        reference response to each prompt (zeros when eq. 5 is off)."""
        s, prompt_length = self.settings, rollout.prompt_ids.shape[1]
        ids, mask = sequence(rollout.prompt_ids, rollout.prompt_mask, rollout)
        response_mask, tokens = rollout.response_mask, rollout.tokens

        def forward(ids, mask, tokens):
            def logps(params):
                policy = nnx.merge(self.policy_graphdef, params)
                return response_logprobs(policy, ids, mask, tokens)

            critic = nnx.merge(self.critic_graphdef, state.critic_params)
            reward_model = nnx.merge(self.reward_graphdef, reward_params)
            return (logps(state.params), logps(ref_params),
                    response_values(critic, ids, mask, prompt_length), reward_model(ids, mask))

        old_logps, ref_logps, old_values, raw_scores = _in_minibatches(
            forward, s.num_minibatches, ids, mask, tokens)
        scores = reference_relative_reward(raw_scores, ref_rewards)
        scores = jnp.where(rollout.ended_with_eos, scores, scores - s.no_eos_penalty)
        kl = jnp.where(response_mask, kl_penalty(old_logps, ref_logps, s.kl_kind), 0.0)
        rewards = kl_penalised_token_rewards(scores, kl, response_mask, state.kl_coef)
        if s.whiten_rewards:
            # Rescale only: a shifted reward would change which responses are "good".
            rewards = masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, response_mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, response_mask)
        experience = Experience(ids=ids, mask=mask, tokens=tokens, response_mask=response_mask,
                                old_logps=old_logps, old_values=old_values,
                                advantages=advantages, returns=returns)
        lengths = jnp.sum(response_mask, axis=1, dtype=jnp.float32)
        stats = {
            "reward": jnp.mean(raw_scores), "reference_reward": jnp.mean(ref_rewards),
            "reward_minus_reference": jnp.mean(raw_scores - ref_rewards),
            "score": jnp.mean(scores), "kl": jnp.mean(jnp.sum(kl, axis=1)),
            "kl_coef": state.kl_coef,
            "explained_variance": explained_variance(old_values, returns, response_mask),
            "response_length": jnp.mean(lengths),
            "ended_with_eos": jnp.mean(rollout.ended_with_eos.astype(jnp.float32)),
            # Generator vs trainer log-probs of the same tokens: should be float noise.
            "sampler_logp_diff": jnp.max(jnp.where(
                response_mask, jnp.abs(rollout.sampler_logps - old_logps), 0.0)),
        }
        return experience, stats

    def loss(self, params: Params, critic_params: Params, minibatch: Experience,
             sft_minibatch: Mapping[str, jax.Array] | None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        s = self.settings
        prompt_length = minibatch.ids.shape[1] - minibatch.tokens.shape[1]
        policy = nnx.merge(self.policy_graphdef, params)
        critic = nnx.merge(self.critic_graphdef, critic_params)
        logps, entropy = response_logprobs(policy, minibatch.ids, minibatch.mask,
                                           minibatch.tokens, with_entropy=True)
        mask = minibatch.response_mask
        policy_loss, policy_stats = ppo_policy_loss(logps, minibatch.old_logps,
                                                    minibatch.advantages, mask, s.clip_ratio)
        values = response_values(critic, minibatch.ids, minibatch.mask, prompt_length)
        value_loss, value_stats = ppo_value_loss(values, minibatch.old_values,
                                                 minibatch.returns, mask, s.clip_value)
        loss = policy_loss + s.value_coef * value_loss
        stats = {"policy_loss": policy_loss, "value_loss": value_loss, **policy_stats,
                 **value_stats, "entropy": masked_mean(entropy, mask),
                 "ratio_max_deviation": jax.lax.stop_gradient(jnp.max(jnp.where(
                     mask, jnp.abs(jnp.expm1(logps - minibatch.old_logps)), 0.0)))}
        if sft_minibatch is not None:
            sft, _ = sft_batch_loss(policy, sft_minibatch)
            loss = loss + s.sft_coef * sft
            stats["sft_loss"] = sft
        return loss, stats

    def update(self, state: PPOState, experience: Experience,
               sft_batch: Mapping[str, jax.Array] | None
               ) -> tuple[PPOState, dict[str, jax.Array]]:
        """`ppo_epochs` passes over shuffled minibatches, in one `lax.scan`. sft_batch: rows
        `[updates_per_iteration * sft_batch_size, L]`, one slice per update (or None)."""
        s = self.settings
        shuffle_key = self.rng(state.step)[1]
        order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(shuffle_key, e),
                                                        s.batch_size)
                                 for e in range(s.ppo_epochs)])
        order = order.reshape(s.updates_per_iteration, s.minibatch_size)

        def one_update(carry, xs):
            params, opt_state, critic_params, critic_opt_state = carry
            rows, number = xs
            minibatch = jax.tree.map(lambda x: x[rows], experience)
            sft_minibatch = None if sft_batch is None else jax.tree.map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, number * s.sft_batch_size,
                                                       s.sft_batch_size), sft_batch)
            grad_fn = jax.value_and_grad(self.loss, argnums=(0, 1), has_aux=True)
            (loss, stats), (grads, critic_grads) = grad_fn(params, critic_params, minibatch,
                                                           sft_minibatch)
            grad_norm, critic_grad_norm = (optax.tree.norm(grads),
                                           optax.tree.norm(critic_grads))
            finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                      & jnp.isfinite(critic_grad_norm))

            def update():
                updates, new_opt_state = self.policy_tx.update(grads, opt_state, params)
                critic_updates, new_critic_opt_state = self.critic_tx.update(
                    critic_grads, critic_opt_state, critic_params)
                # A non-finite update with finite gradients (a NaN learning rate) is not
                # applied: zeroed in the same pass that adds it, so no second copy of the
                # parameters exists (the moments, finite with finite gradients, move on).
                applied = (jnp.isfinite(optax.tree.norm(updates))
                           & jnp.isfinite(optax.tree.norm(critic_updates)))

                def add(params, updates):
                    return jax.tree.map(lambda p, u: p + jnp.where(applied, u, 0).astype(p.dtype),
                                        params, updates)

                return (add(params, updates), new_opt_state,
                        add(critic_params, critic_updates), new_critic_opt_state), applied

            carry, applied = update_if_finite(finite, update, (carry, jnp.asarray(False)))
            stats = {"loss": loss, **stats, "grad_norm": grad_norm,
                     "critic_grad_norm": critic_grad_norm,
                     "skipped_nonfinite": 1.0 - applied.astype(jnp.float32)}
            return carry, stats

        carry = (state.params, state.opt_state, state.critic_params, state.critic_opt_state)
        carry, per_update = jax.lax.scan(
            one_update, carry, (order, jnp.arange(s.updates_per_iteration)))
        params, opt_state, critic_params, critic_opt_state = carry
        stats = {name: jnp.mean(value) for name, value in per_update.items()}
        stats["skipped_nonfinite"] = jnp.sum(per_update["skipped_nonfinite"])
        # The first update runs with the rollout's parameters: its ratio must be 1.
        stats["first_ratio_max_deviation"] = per_update["ratio_max_deviation"][0]
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  critic_params=critic_params,
                                  critic_opt_state=critic_opt_state)
        return new_state, stats

    def iteration(self, state: PPOState, ref_params: Params, reward_params: Params,
                  batch: Mapping[str, jax.Array]) -> tuple[PPOState, dict[str, jax.Array]]:
        """One whole PPO iteration (the fused program). batch: `prompt_ids`, `prompt_mask`
        `[B, P]`, `ref_reward` `[B]`, and with eq. 6 on, the SFT rows (`sft_input_ids`,
        `sft_attention_mask`, `sft_loss_mask`)."""
        rollout = self.rollout(state, batch)
        experience, score_stats = self.score(state, ref_params, reward_params, rollout,
                                             batch["ref_reward"])
        state, update_stats = self.update(state, experience, _sft_part(batch))
        state = state.replace(kl_coef=adaptive_kl_coef(state.kl_coef, score_stats["kl"],
                                                       self.settings))
        return state, {**score_stats, **update_stats}

    def jit_iteration(self, state_sharding: Any, batch_sharding: Any
                      ) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
        """The fused iteration, jitted with explicit shardings; the state is donated."""
        return jax.jit(self.iteration, in_shardings=(state_sharding, None, None, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0)

    def step_by_step(self, state_sharding: Any, batch_sharding: Any
                     ) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
        """The same iteration as three programs with the rollout and the experience fetched
        to the host in between (what a sampler/trainer split costs), for debugging."""
        rollout_fn = jax.jit(self.rollout)
        score_fn = jax.jit(self.score)

        def update(state, experience, batch):
            state, stats = self.update(state, experience, _sft_part(batch))
            return state, stats

        update_fn = jax.jit(update, out_shardings=(state_sharding, None), donate_argnums=0)

        def iteration(state, ref_params, reward_params, batch):
            rollout = jax.device_get(rollout_fn(state, batch))
            experience, score_stats = jax.device_get(
                score_fn(state, ref_params, reward_params, rollout, batch["ref_reward"]))
            state, update_stats = update_fn(state, experience, batch)
            kl_coef = adaptive_kl_coef(state.kl_coef, score_stats["kl"], self.settings)
            return state.replace(kl_coef=kl_coef), {**score_stats, **update_stats}

        return iteration


def _sft_part(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array] | None:
    if "sft_input_ids" not in batch:
        return None
    return {"input_ids": batch["sft_input_ids"], "attention_mask": batch["sft_attention_mask"],
            "loss_mask": batch["sft_loss_mask"]}


def init_ppo_state(policy: GlmForCausalLM, critic: GlmValueModel,
                   policy_tx: optax.GradientTransformation,
                   critic_tx: optax.GradientTransformation, kl_coef: float
                   ) -> tuple[nnx.GraphDef, nnx.GraphDef, PPOState]:
    """(policy graphdef, critic graphdef, state); optimizer states are sharded like their
    parameters."""
    policy_graphdef, params = nnx.split(policy)
    critic_graphdef, critic_params = nnx.split(critic)
    state = PPOState(step=replicated_like(params, jnp.zeros((), jnp.int32)), params=params,
                     opt_state=init_opt_state(policy_tx, params), critic_params=critic_params,
                     critic_opt_state=init_opt_state(critic_tx, critic_params),
                     kl_coef=replicated_like(params, jnp.asarray(kl_coef, jnp.float32)))
    return policy_graphdef, critic_graphdef, state


def ppo_optimizers(config: ConfigDict, settings: PPOSettings
                   ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(policy, critic) optimizers of config.ppo; their schedules count minibatch updates."""
    ppo = config.ppo
    optimizer = dict(num_steps=ppo.num_steps * settings.updates_per_iteration,
                     warmup_steps=ppo.warmup_steps, end_lr_ratio=ppo.end_lr_ratio,
                     weight_decay=ppo.weight_decay, max_grad_norm=ppo.max_grad_norm,
                     moment_dtype=config.model.moment_dtype)
    policy_tx, _ = make_optimizer(learning_rate=ppo.learning_rate, **optimizer)
    critic_tx, _ = make_optimizer(learning_rate=ppo.critic_learning_rate, **optimizer)
    return policy_tx, critic_tx


def _policy_source(config: ConfigDict) -> Any:
    """What the initial policy's weights depend on (for the cache keys)."""
    if config.model.init_checkpoint:
        return fingerprint(config.model.init_checkpoint)
    return {"seed": config.seed, "model": config.model.to_dict()}


def _critic(config: ConfigDict, mesh) -> GlmValueModel:
    init = config.ppo.critic_init
    if init == "reward":
        # Trained, so in the policy's precision whatever the reward model was saved in.
        return load_trained_model(config.ppo.reward_model, GlmValueModel, mesh,
                                  overrides=trained_overrides(config))
    if init == "policy":
        return model_from_config(config, "value", mesh)
    raise ValueError(f"config.ppo.critic_init={init!r}; choose 'reward' or 'policy'")


def prepare_prompts(config: ConfigDict, workdir: Path, policy: GlmForCausalLM,
                    reward_model: GlmRewardModel, prompt_ids: np.ndarray,
                    prompt_mask: np.ndarray, prompts: list, tokenizer, mesh
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The prompt filter and the reference rewards, each from its cache or computed once.

    Returns (kept `[n]` bool, ref_rewards `[n]` float32 (zeros with eq. 5 off), report)."""
    ppo, data = config.ppo, config.data
    n = len(prompts)
    common = dict(prompts=fingerprint(ppo.prompt_file), policy=_policy_source(config),
                  reward=fingerprint(Path(ppo.reward_model) / "checkpoints"),
                  max_prompt_tokens=data.max_prompt_tokens,
                  max_response_tokens=data.max_response_tokens, seed=config.seed,
                  # Which prompts are encoded, and how, depends on these too.
                  truncation=data.truncation, special_tokens=data.special_tokens)

    def sampled(num_samples: int, settings: SamplingSettings, seed: int, desc: str):
        return sample_prompts(policy, reward_model, prompt_ids, prompt_mask,
                              num_samples=num_samples, batch_size=ppo.batch_size,
                              settings=settings, seed=seed, mesh=mesh, desc=desc)

    report: dict[str, Any] = {"prompts": n}
    kept = np.ones(n, bool)
    if ppo.filter_samples > 0:
        settings = SamplingSettings.from_config(ppo, tokenizer, data.max_response_tokens)

        def compute_filter() -> list[dict[str, Any]]:
            samples = sampled(ppo.filter_samples, settings, config.seed + 2, "prompt filter")
            return [{"prompt_index": i, "rewards": samples.rewards[i].tolist()}
                    for i in range(n)]

        records = cached_jsonl(workdir / "prompt_filter.jsonl",
                               cache_key(**common, settings=settings, k=ppo.filter_samples),
                               compute_filter, "prompt filter")
        kept, variances = reward_variance_filter(
            np.asarray([r["rewards"] for r in records]), ppo.filter_min_variance)
        report.update(filter_dropped=int(n - kept.sum()),
                      filter_mean_variance=float(variances.mean()))
        print(f"prompt filter: kept {int(kept.sum())} of {n} prompts ({n - int(kept.sum())} "
              f"with reward variance < {ppo.filter_min_variance} over "
              f"{ppo.filter_samples} samples)")
    ref_rewards = np.zeros(n, np.float32)
    if ppo.reference_reward:
        settings = SamplingSettings.from_config(ppo, tokenizer, data.max_response_tokens,
                                                greedy=ppo.reference_greedy)
        cache = Path(ppo.reference_cache or workdir / "reference_responses.jsonl")
        records = cached_jsonl(
            cache, cache_key(**common, settings=settings),
            lambda: reference_records(prompts, sampled(1, settings, config.seed + 1,
                                                       "reference responses"), tokenizer),
            "reference responses")
        ref_rewards = np.asarray([r["reward"] for r in records], np.float32)
        report["reference_reward_mean"] = float(ref_rewards.mean())
    return kept, ref_rewards, report


@holds_workdir
def train_ppo(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """PPO of the policy in `config` (model.init_checkpoint, normally the SFT export) against
    the reward model in `ppo.reward_model` (an RM workdir), on `ppo.prompt_file`, in
    `workdir`, resuming from its latest checkpoint; exports the policy to `workdir/hf`."""
    validate_config(config)
    ppo, data = config.ppo, config.data
    for field in ("prompt_file", "reward_model"):
        if not ppo[field]:
            raise ValueError(f"config.ppo.{field} is empty: set it (e.g. "
                             f"--config.ppo.{field}=...)")
    if ppo.sft_coef > 0 and not ppo.sft_file:
        raise ValueError("config.ppo.sft_coef > 0 needs config.ppo.sft_file (an SFT JSONL)")
    settings = PPOSettings.from_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config)
    tokenizer, template = tokenizer_from_config(config), template_from_config(config)
    check_tokenizer_fits(config, tokenizer)  # before the pre-flight and any weights
    prompts = read_prompts(ppo.prompt_file, "config.ppo.prompt_file", data.on_error)

    # Before any weights load (the fused program; the step-by-step one is for debugging).
    checked = preflight(config, "ppo", mesh, "PPO") if ppo.fused else None
    policy = model_from_config(config, "lm", mesh)
    reward_model = load_reward_model(ppo.reward_model, "config.ppo.reward_model",
                                     tokenizer, mesh, frozen_overrides(config))
    prompts, prompt_ids, prompt_mask = encode_prompt_file(prompts, tokenizer, template, data,
                                                          "config.ppo.prompt_file")
    kept, ref_rewards, report = prepare_prompts(config, workdir, policy, reward_model,
                                                prompt_ids, prompt_mask, prompts, tokenizer,
                                                mesh)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    batches: Any = iter(PromptDataset(prompt_ids, prompt_mask, ref_rewards=ref_rewards,
                                      kept=kept, batch_size=ppo.batch_size, seed=config.seed,
                                      **process))
    if ppo.sft_coef > 0:
        examples, _ = read_jsonl(ppo.sft_file, "sft", on_error=data.on_error,
                                 field="config.ppo.sft_file")
        sft_data = SFTDataset(examples, tokenizer, template,
                              batch_size=settings.updates_per_iteration * ppo.sft_batch_size,
                              max_prompt_tokens=data.max_prompt_tokens,
                              max_response_tokens=data.max_response_tokens,
                              truncation=data.truncation,
                              special_tokens=data.special_tokens,
                              source=f"config.ppo.sft_file = {ppo.sft_file!r}",
                              seed=config.seed, **process)
        batches = ZippedBatches(batches, sft_data, prefix="sft_")

    policy_tx, critic_tx = ppo_optimizers(config, settings)
    critic = _critic(config, mesh)
    with jax.set_mesh(mesh):
        policy_graphdef, critic_graphdef, state = init_ppo_state(policy, critic, policy_tx,
                                                                 critic_tx, ppo.kl_coef)
        ref_params = copy_params(state.params, config.model.frozen_dtype)
    reward_graphdef, reward_params = nnx.split(reward_model)
    program = PPOProgram(
        policy_graphdef, critic_graphdef, reward_graphdef,
        SamplingSettings.from_config(ppo, tokenizer, data.max_response_tokens), settings,
        policy_tx, critic_tx)
    model_config = policy.config
    del policy, critic, reward_model

    def make_step(batch_shardings):
        build = program.jit_iteration if ppo.fused else program.step_by_step
        iteration = build(shardings_of(state), batch_shardings)
        return BoundStep(iteration, (ref_params, reward_params))

    sequence = (ppo.batch_size, data.max_prompt_tokens, data.max_response_tokens)
    flops = ppo_iteration_flops(
        model_config, parameter_counts(state.params), parameter_counts(state.critic_params),
        parameter_counts(reward_params), batch=sequence[0], prompt_length=sequence[1],
        response_length=sequence[2], epochs=ppo.ppo_epochs)
    last = run_stage(config, ppo, workdir, graphdef=policy_graphdef, state=state,
                     make_step=make_step, batches=batches, mesh=mesh,
                     model_config=model_config, tokenizer=tokenizer, desc="PPO",
                     export_hf=True, tokens_per_step=sequence[0] * (sequence[1] + sequence[2]),
                     flops_per_step=sum(flops.values()), precompiled=checked)
    return {**last, "prompts": report}
