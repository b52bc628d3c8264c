"""The RL stage's driver (paper 3.4): PPO with the reference-response reward and capability
retention (eq. 3-6), or a critic-free algorithm of `config.ppo.algorithm` (`rl.ALGORITHMS`).

The algorithms themselves are the pure program of `glm_jax.train.rl`; this module reads the
config and the files around it: the roles (policy, reference, reward model, critic), the
prompts, the prompt filter and the reference responses (each computed once and cached), the
SFT rows of eq. 6, and the training loop with its checkpoints, metrics and HF export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glm_jax.config import validate_config
from glm_jax.data.chat_template import Template
from glm_jax.data.datasets import SFTDataset
from glm_jax.data.records import read_jsonl
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel
from glm_jax.rewards import RewardRule, get_rule, score_texts
from glm_jax.train.cache import cache_key, cached_jsonl, fingerprint
from glm_jax.train.common import (
    check_tokenizer_fits,
    mesh_from_config,
    read_prompts,
    template_from_config,
    tokenizer_from_config,
)
from glm_jax.train.loop import run_stage
from glm_jax.train.preflight import preflight
from glm_jax.train.programs import BoundStep, parameter_counts, rl_iteration_flops
from glm_jax.train.prompts import (
    PromptDataset,
    ZippedBatches,
    reference_records,
    reward_variance_filter,
)
from glm_jax.train.rl import RLSettings, Rollout, make_rl, required_roles
from glm_jax.train.roles import roles_from_config
from glm_jax.train.rollout import (
    SamplingSettings,
    encode_prompt_file,
    response_texts,
    sample_prompts,
)
from glm_jax.train.state import make_optimizer, shardings_of
from glm_jax.train.workdir import holds_workdir


def rl_optimizers(config: ConfigDict, settings: RLSettings
                  ) -> dict[str, tuple[optax.GradientTransformation, optax.Schedule]]:
    """{"policy": (tx, schedule), "critic": ...} of config.ppo (the critic's only when the
    algorithm has one); the schedules count minibatch updates."""
    ppo = config.ppo
    optimizer = dict(num_steps=ppo.num_steps * settings.updates_per_iteration,
                     warmup_steps=ppo.warmup_steps, end_lr_ratio=ppo.end_lr_ratio,
                     weight_decay=ppo.weight_decay, max_grad_norm=ppo.max_grad_norm,
                     moment_dtype=config.model.moment_dtype)
    out = {"policy": make_optimizer(learning_rate=ppo.learning_rate, **optimizer)}
    if settings.uses_critic:
        out["critic"] = make_optimizer(learning_rate=ppo.critic_learning_rate, **optimizer)
    return out


def _policy_source(config: ConfigDict) -> Any:
    """What the initial policy's weights depend on (for the cache keys)."""
    if config.model.init_checkpoint:
        return fingerprint(config.model.init_checkpoint)
    return {"seed": config.seed, "model": config.model.to_dict()}


def prepare_prompts(config: ConfigDict, workdir: Path, policy: GlmForCausalLM,
                    reward_model: GlmRewardModel | None, prompt_ids: np.ndarray,
                    prompt_mask: np.ndarray, prompts: list, tokenizer: Tokenizer,
                    template: Template, mesh: Mesh,
                    rule: RewardRule | None = None
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The prompt filter and the reference rewards, each from its cache or computed once,
    with the reward model or, given `rule` (config.ppo.reward_rule), the rule on the texts.

    Returns (kept `[n]` bool, ref_rewards `[n]` float32 (zeros with eq. 5 off), report)."""
    ppo, data = config.ppo, config.data
    n = len(prompts)
    reward = (ppo.reward_rule if rule else
              fingerprint(Path(ppo.reward_model) / "checkpoints"))
    common = dict(prompts=fingerprint(ppo.prompt_file), policy=_policy_source(config),
                  reward=reward,
                  max_prompt_tokens=data.max_prompt_tokens,
                  max_response_tokens=data.max_response_tokens, seed=config.seed,
                  # Which prompts are encoded, and how, depends on these too.
                  truncation=data.truncation, special_tokens=data.special_tokens)

    def sampled(num_samples: int, settings: SamplingSettings, seed: int, desc: str):
        samples = sample_prompts(policy, reward_model, prompt_ids, prompt_mask,
                                 num_samples=num_samples, batch_size=ppo.batch_size,
                                 settings=settings, seed=seed, mesh=mesh, desc=desc)
        if rule is None:
            return samples
        texts = [text for row in samples.texts(tokenizer, template) for text in row]
        rows = [prompts[i] for i in range(n) for _ in range(num_samples)]
        rewards = score_texts(rule, ppo.reward_rule, rows, texts)
        return dataclasses.replace(samples, rewards=rewards.reshape(n, num_samples))

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
                                                       "reference responses"), tokenizer,
                                              template),
            "reference responses")
        ref_rewards = np.asarray([r["reward"] for r in records], np.float32)
        report["reference_reward_mean"] = float(ref_rewards.mean())
    return kept, ref_rewards, report


@holds_workdir
def train_ppo(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """The RL stage (`config.ppo.algorithm`: PPO by default) of the policy in `config`
    (model.init_checkpoint, normally the SFT export) against the reward model in
    `ppo.reward_model` (an RM workdir), on `ppo.prompt_file`, in `workdir`, resuming from its
    latest checkpoint; exports the policy to `workdir/hf`."""
    validate_config(config)
    ppo, data = config.ppo, config.data
    rule = get_rule(ppo.reward_rule) if ppo.reward_rule else None
    for field in ("prompt_file",) + (() if rule else ("reward_model",)):
        if not ppo[field]:
            raise ValueError(f"config.ppo.{field} is empty: set it (e.g. "
                             f"--config.ppo.{field}=...)")
    if ppo.sft_coef > 0 and not ppo.sft_file:
        raise ValueError("config.ppo.sft_coef > 0 needs config.ppo.sft_file (an SFT JSONL)")
    settings = RLSettings.from_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config)
    tokenizer = tokenizer_from_config(config)
    template = template_from_config(config, tokenizer)
    check_tokenizer_fits(config, tokenizer)  # before the pre-flight and any weights
    prompts = read_prompts(ppo.prompt_file, "config.ppo.prompt_file", data.on_error)

    # Before any weights load (the fused program, or with a rule reward the program after the
    # rollout; the step-by-step one is for debugging).
    checked = (preflight(config, "ppo", mesh, ppo.algorithm.upper())
               if ppo.fused or rule else None)
    roles = roles_from_config(config, mesh, tokenizer=tokenizer, reward=rule is None,
                              **required_roles(settings))
    prompts, prompt_ids, prompt_mask = encode_prompt_file(prompts, tokenizer, template, data,
                                                          "config.ppo.prompt_file")
    kept, ref_rewards, report = prepare_prompts(
        config, workdir, roles.policy.module(), roles.reward and roles.reward.module(),
        prompt_ids, prompt_mask, prompts, tokenizer, template, mesh, rule)
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

    sampling = SamplingSettings.from_config(ppo, tokenizer, data.max_response_tokens)
    with jax.set_mesh(mesh):
        program, state, frozen = make_rl(settings, roles, sampling,
                                         rl_optimizers(config, settings))

    def host_scores(rollout: Rollout, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The rule's reward of each response, as the tokenizer decodes it (without EOS)."""
        rows = np.repeat(batch["prompt_index"], settings.num_generations)
        texts = response_texts(rollout.tokens, rollout.response_mask, tokenizer,
                               template)
        return score_texts(rule, ppo.reward_rule, [prompts[i] for i in rows], texts)

    def make_step(batch_shardings):
        if rule is not None:
            step = program.with_host_rewards(host_scores, shardings_of(state), batch_shardings)
        else:
            build = program.jit_iteration if ppo.fused else program.step_by_step
            step = build(shardings_of(state), batch_shardings)
        return BoundStep(step, (frozen,))

    sequence = (settings.rollout_size, data.max_prompt_tokens, data.max_response_tokens)
    critic = (nnx.state(program.critic_module(state.critic_params, state.params, frozen))
              if roles.critic else None)  # with the backbone a LoRA critic shares
    flops = rl_iteration_flops(
        roles.policy.config, parameter_counts(state.params),
        parameter_counts(critic) if critic is not None else None,
        parameter_counts(frozen["reward"]) if "reward" in frozen else None,
        batch=sequence[0], prompt_length=sequence[1], response_length=sequence[2],
        epochs=ppo.ppo_epochs, reference=settings.uses_reference)
    policy_graphdef, model_config = roles.policy.graphdef, roles.policy.config
    del roles  # the state and `frozen` hold the parameters the loop needs
    last = run_stage(config, ppo, workdir, graphdef=policy_graphdef, state=state,
                     make_step=make_step, batches=batches, mesh=mesh,
                     model_config=model_config, tokenizer=tokenizer,
                     desc=ppo.algorithm.upper(),
                     export_hf=True, tokens_per_step=sequence[0] * (sequence[1] + sequence[2]),
                     flops_per_step=sum(flops.values()), precompiled=checked,
                     step_reads=("prompt_index",) if rule else ())
    return {**last, "prompts": report}
