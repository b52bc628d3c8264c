"""The config schema: every field a glm_jax program reads, with its default and type.

`default_config()` is the embedded tiny default (configs/tiny.py is exactly it); the other
files in configs/ start from it and change fields. `validate_config` checks a config against
it before a program starts: an unknown field is an error naming the field and the closest
valid names, a value of the wrong type is an error naming the field and both types, and a
size or choice outside its valid values (the tables `_RULES` and `_choices`) is an error
naming the field, the value and what is valid. `MESH_PRESETS` are the mesh shapes a config
file can pick with `--config configs/x.py:preset`. The scripts' `--config` flag is in
glm_jax.cli.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any, get_args

from ml_collections import ConfigDict

from glm_jax.models.glm import LORA_TARGETS

# Mesh axis sizes for common machines (`data`, `fsdp`, `tensor`; -1 takes the remaining
# devices). Training programs shard parameters over fsdp x tensor and the batch over
# data x fsdp; PPO's generation favours tensor over fsdp (no all-gathers per decode step).
MESH_PRESETS: dict[str, dict[str, int]] = {
    "cpu": dict(data=1, fsdp=-1, tensor=1),  # every (forced) host device
    "gpu1": dict(data=1, fsdp=1, tensor=1),
    "gpu8": dict(data=1, fsdp=8, tensor=1),  # one 8-GPU host
    "tpu_v4_32": dict(data=1, fsdp=16, tensor=1),  # 16 chips, 32 GiB HBM each
    "tpu_v5e_256": dict(data=16, fsdp=16, tensor=1),  # 256 chips, 16 GiB HBM each
}


def default_config() -> ConfigDict:
    """The embedded tiny default: a 2-layer GLM-4-shaped model on CPU, every stage's settings.
    Its fields and their types are the schema every config is validated against."""
    config = ConfigDict()
    # Every training section: a NaN/Inf loss or gradient skips that update (counted in the
    # metric skipped_nonfinite); more than max_nonfinite_steps in a row stop the run. It keeps
    # the last keep_checkpoints checkpoints, and with best_metric (an eval metric such as
    # "eval_accuracy" or "eval_loss") also the best one, highest or lowest by best_mode.
    config.seed = 0
    # A latest checkpoint that cannot be read (files missing or damaged): "refuse" stops,
    # naming the damaged step and the newest intact one; "previous" resumes from that one.
    config.on_damaged_checkpoint = "refuse"
    # Mesh axis sizes; one may be -1 (the remaining devices).
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # init_checkpoint: a Hugging Face / ChatGLM directory; empty means a fresh random tiny model
    # whose fields `tiny` may override (glm_jax.models.tiny.tiny_config).
    # Precision: dtype is the compute dtype, param_dtype the trained models' master weights;
    # frozen_dtype the frozen models' weights (PPO / DPO reference, reward model in PPO, DPO
    # and rejection sampling; "" = param_dtype); moment_dtype the optimizer's Adam moments.
    # How the programs run at scale: remat is the layer body's rematerialisation ("none",
    # "full", "save_dots"); scan_layers runs the layers under lax.scan (compile time
    # independent of depth); attention is "auto" (cuDNN flash attention on GPU in bf16, else
    # plain for short sequences and blockwise beyond), "dense", "blockwise", "cudnn" or "xla";
    # vocab_chunk is how many positions' float32 logits exist at once in training programs.
    # lora: low-rank adapters (rank 0: none). With a rank, the models of `roles` ("sft",
    # "reward", "policy": DPO's / PPO's / GRPO's, "critic") train only adapters of that rank
    # on `targets` (comma-separated among q, k, v, o, gate, up, down), scaled by alpha / rank,
    # and a reward model's or critic's scalar head; their base stays frozen. dropout: on the
    # adapters' input in training steps (PEFT's lora_dropout).
    config.model = ConfigDict(dict(
        init_checkpoint="", dtype="float32", param_dtype="float32", frozen_dtype="",
        moment_dtype="float32", remat="none", scan_layers=True, attention="auto",
        vocab_chunk=512, tiny=ConfigDict(),
        lora=ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                             targets="q,k,v,o,gate,up,down",
                             roles="sft,reward,policy,critic"))))
    # tokenizer: a directory with tokenizer.json / tokenizer.model (and the checkpoint's
    # tokenizer_config.json / generation_config.json beside it); empty means the init
    # checkpoint's, or the bundled tiny tokenizer.
    # template: "auto" renders with the tokenizer's own chat_template (tokenizer_config.json)
    # when it ships one, else glm_jax's GLM-4 format; "checkpoint" requires the tokenizer's
    # own; "glm4" / "chatglm3" are glm_jax's built-in formats.
    # special_tokens: what becomes of a chat template's special token (an EOS, a role token)
    # written inside a record's text: "plain" encodes it as ordinary text, "refuse" drops the
    # record (both counted in the tokenization report).
    config.data = ConfigDict(dict(tokenizer="", template="auto", max_prompt_tokens=64,
                                  max_response_tokens=64, truncation="truncate",
                                  on_error="raise", special_tokens="plain"))
    # Supervised fine-tuning: loss on response tokens only; the result is exported to
    # WORKDIR/hf for the later stages' model.init_checkpoint.
    config.sft = ConfigDict(dict(
        train_file="", eval_file="", packing=False, batch_size=16, num_steps=200,
        learning_rate=1e-3, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0,
        max_grad_norm=1.0, eval_every=100, checkpoint_every=100, keep_checkpoints=2,
        log_every=10, max_nonfinite_steps=10, best_metric="", best_mode="max"))
    # Reward model (paper eq. 1-2): l2_coef is the lambda of eq. 2.
    config.rm = ConfigDict(dict(
        train_file="", eval_file="", batch_size=16, num_steps=200, learning_rate=1e-3,
        warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, l2_coef=0.0,
        eval_every=100, checkpoint_every=100, keep_checkpoints=2, log_every=10,
        max_nonfinite_steps=10, best_metric="", best_mode="max"))
    # DPO (paper eq. 7); the reference is the initial model. mode: "offline" trains on the
    # annotated pairs of train_file; "reward_pairs" first samples num_samples responses to each
    # prompt of prompt_file with the initial policy, scores them with reward_model (an RM
    # workdir) and pairs each prompt's best and worst when their reward gap exceeds
    # pair_margin (written to WORKDIR/reward_pairs.jsonl), then trains offline on those;
    # "online" does the same with the current policy at every step (batch_size prompts).
    # eval_file (annotated pairs) gives implicit-reward accuracy in every mode; sft_coef
    # weighs an optional next-token loss on the chosen responses.
    config.dpo = ConfigDict(dict(
        mode="offline", train_file="", eval_file="", prompt_file="", reward_model="",
        num_samples=4, pair_margin=0.5,
        # Sampling of the reward-built pairs' responses.
        temperature=1.0, top_k=0, top_p=1.0,
        beta=0.1, sft_coef=0.0, batch_size=16, num_steps=200,
        learning_rate=1e-4, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0,
        max_grad_norm=1.0, eval_every=100, checkpoint_every=100, keep_checkpoints=2,
        log_every=10, max_nonfinite_steps=10, best_metric="", best_mode="max"))
    # Rejection-sampling fine-tuning (best-of-N, the paper's comparison point): sample
    # num_samples responses (temperature, top_k, top_p; batch_size rows per compiled call) to
    # each prompt of prompt_file from the policy (model.init_checkpoint), score them with
    # reward_model (an RM workdir), keep each prompt's best, then run SFT with config.sft's
    # optimiser and steps on the winners. min_reward: "" keeps every best, a number drops the
    # prompts whose best reward is below it. require_eos: responses cut off at
    # data.max_response_tokens without EOS never win.
    config.rsft = ConfigDict(dict(
        prompt_file="", reward_model="", num_samples=4, temperature=1.0, top_k=0, top_p=1.0,
        min_reward="", require_eos=True, batch_size=16))
    # The RL stage: PPO (paper eq. 3-6) or a critic-free algorithm. algorithm: "ppo" (four
    # models: the policy (model.init_checkpoint, trained), the frozen reference (the same
    # initial weights), the frozen reward model (reward_model: an RM workdir) and the critic
    # (initialised from the reward model or the policy, trained)); "grpo", "rloo" or
    # "reinforce_pp" (no critic; see glm_jax/train/rl.py). Each iteration samples
    # num_generations responses to each of batch_size prompts, scores them, and runs
    # ppo_epochs passes of minibatch updates (minibatch_size sequences), all in one compiled
    # program.
    config.ppo = ConfigDict(dict(
        algorithm="ppo", prompt_file="", reward_model="", critic_init="reward",
        # reward_rule: a rule reward (glm_jax.rewards: a registered name such as
        # "world_gold", or "module.path:function") computed on the host between the rollout
        # and the update programs, instead of the reward model (then reward_model is unused).
        reward_rule="",
        # num_steps counts iterations; fused=False runs rollout, scoring and updates as
        # separate programs with host transfers in between (for debugging).
        num_steps=50, fused=True, batch_size=16, num_generations=1, minibatch_size=8,
        ppo_epochs=2,
        # Sampling of the rollouts.
        temperature=1.0, top_k=0, top_p=1.0,
        # Optimisers (AdamW, warmup + cosine over all minibatch updates).
        learning_rate=1e-4, critic_learning_rate=1e-4, warmup_steps=0, end_lr_ratio=1.0,
        weight_decay=0.0, max_grad_norm=1.0,
        # The clipped surrogate keeps the ratio in [1 - clip_low, 1 + clip_high]
        # (clip_high > clip_low: DAPO's clip-higher); loss_aggregation: "token_mean" (every
        # token of the minibatch weighs the same, DAPO), "seq_mean_token_mean" (every
        # sequence, GRPO) or "seq_mean_token_sum_norm" (token sums over the max response
        # length, Dr. GRPO). PPO's clipped value loss and GAE.
        clip_low=0.2, clip_high=0.2, loss_aggregation="token_mean", clip_value=0.2,
        value_coef=1.0, gamma=1.0, lam=0.95,
        # GRPO divides by its group's reward std unless scale_by_std=False (Dr. GRPO).
        # mask_equal_groups: responses of a prompt whose num_generations rewards are all
        # equal (no signal; their fraction is logged as equal_reward_groups) leave the loss.
        scale_by_std=True, mask_equal_groups=False,
        # KL against the reference policy: in the reward (eq. 4) or as a loss term (GRPO's
        # k3); kl_in "" is the algorithm's own (loss for grpo, reward for the others).
        # kl_target > 0 makes the coefficient adaptive (Ziegler et al.), moving towards
        # kl_target over kl_horizon; kl_coef 0 with kl_target 0 runs no reference at all.
        kl_coef=0.05, kl_kind="k1", kl_in="", kl_target=0.0, kl_horizon=10000,
        # Eq. 5: subtract the reward of the reference policy's response to the same prompt,
        # generated once (greedy, or sampled with the settings above) and cached in
        # reference_cache (empty: WORKDIR/reference_responses.jsonl).
        reference_reward=True, reference_greedy=True, reference_cache="",
        # PPO's reward and advantage whitening.
        whiten_rewards=False, whiten_advantages=True,
        # Eq. 6: next-token loss on sft_file (an SFT JSONL) weighted by sft_coef.
        sft_file="", sft_coef=0.0, sft_batch_size=8,
        # Responses that reach the length limit without EOS get no_eos_penalty subtracted;
        # overlong_buffer > 0 adds DAPO's soft length penalty: overlong_coef times a ramp
        # from 0 to -1 over the last overlong_buffer tokens before data.max_response_tokens.
        no_eos_penalty=0.0, overlong_buffer=0, overlong_coef=1.0,
        # Prompt filter (paper 3.4): sample filter_samples responses per prompt and drop the
        # prompt when their reward variance is below filter_min_variance (0 samples: off).
        filter_samples=0, filter_min_variance=1e-3,
        checkpoint_every=10, keep_checkpoints=2, log_every=1,
        max_nonfinite_steps=10))
    # The embedded pipeline (scripts/run_pipeline.py). The synthetic world
    # (glm_jax.pipeline.world.WorldConfig, whose defaults these are; its seed is config.seed):
    # its sizes; p_correct, a demonstration's content is right; p_verbose, it carries filler;
    # annotators prefer A over B with probability sigmoid(quality_scale * (q_A - q_B) +
    # length_bias * (words_A - words_B)); pairs whose gold qualities differ by less than
    # tie_margin are marked ties with p_tie; p_cycle of the prompts get three responses judged
    # in a cycle. bucket_edges: the length-balancing buckets of |len(chosen) - len(rejected)|
    # tokens. The stages use the sections above. The annotators judge the SFT model's
    # responses, annotate_samples sampled per preference prompt; the policies are evaluated on
    # eval_samples responses per held-out prompt and on their greedy ones. Both sample with
    # config.ppo's temperature / top_k / top_p. ablation_steps: steps of the unbalanced reward
    # model and iterations of the PPO ablations (0: as many as the main runs).
    config.pipeline = ConfigDict(dict(
        num_sft=2000, num_capability_sft=240, num_preference_prompts=5000,
        num_test_preference_prompts=300, num_rl_prompts=512, num_eval_prompts_per_task=48,
        p_correct=0.55, p_verbose=0.35, quality_scale=8.0, length_bias=1.5, tie_margin=0.05,
        p_tie=0.5, p_cycle=0.04,
        bucket_edges="1,2,4,8", annotate_samples=4, eval_samples=4, ablation_steps=0))
    # Several processes (hosts) through JAX's multi-controller runtime. Empty
    # coordinator_address: detected on TPU pods, SLURM and Open MPI, or read from
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; a plain run is one process.
    config.distributed = ConfigDict(dict(coordinator_address="", num_processes=0,
                                         process_id=-1))
    # Metrics of every stage: stdout, WORKDIR/metrics.jsonl and TensorBoard event files
    # (WORKDIR/tensorboard). peak_tflops: one device's peak, for the MFU metric (0: known
    # GPUs / TPUs from a table; CPUs report no MFU). wandb_project: also log to Weights &
    # Biases (needs `pip install wandb`).
    config.metrics = ConfigDict(dict(peak_tflops=0.0, wandb_project="", wandb_entity=""))
    return config


def mesh_preset(name: str) -> ConfigDict:
    """`config.mesh` for one of MESH_PRESETS."""
    if name not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {name!r}; choose one of {sorted(MESH_PRESETS)}")
    return ConfigDict(MESH_PRESETS[name])



def paper_recipe(config: ConfigDict) -> ConfigDict:
    """The paper's settings for a 6B-9B policy on a pod (section 3.4): bfloat16 compute with
    float32 master weights and moments (the frozen reference and reward model in bfloat16,
    layers rematerialised), 1024-token prompts and responses, policy and critic learning
    rate 1e-6, no reward or advantage whitening (the reference reward keeps PPO stable),
    ~700 PPO iterations, the SFT loss on for capability retention. Changes `config` in place
    and returns it."""
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.frozen_dtype = "bfloat16"
    config.model.remat = "full"
    config.data.max_prompt_tokens = 1024
    config.data.max_response_tokens = 1024
    config.sft.update(dict(batch_size=64, num_steps=2000, learning_rate=1e-5,
                           warmup_steps=100, packing=True, eval_every=500,
                           checkpoint_every=500, keep_checkpoints=3))
    config.rm.update(dict(batch_size=64, num_steps=3000, learning_rate=5e-6, warmup_steps=100,
                          l2_coef=1e-3, eval_every=500, checkpoint_every=500))
    config.dpo.update(dict(batch_size=64, num_steps=1500, learning_rate=1e-6,
                           warmup_steps=50, beta=0.1, eval_every=500, checkpoint_every=500))
    config.ppo.update(dict(
        num_steps=700, batch_size=128, minibatch_size=32, ppo_epochs=1,
        learning_rate=1e-6, critic_learning_rate=1e-6, warmup_steps=10,
        kl_coef=0.05, reference_reward=True, whiten_rewards=False, whiten_advantages=False,
        sft_coef=0.1, sft_batch_size=16, checkpoint_every=20, keep_checkpoints=3))
    return config

# Fields that take more than one type: rsft.min_reward is "" (off) or a number.
_UNION_FIELDS = {"rsft.min_reward": (str, int, float)}


def closest_fields(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    return (f"did you mean {', '.join(close)}?" if close
            else f"valid fields: {', '.join(sorted(valid))}")


def _check_type(path: str, value: Any, default: Any) -> None:
    allowed = _UNION_FIELDS.get(path)
    if allowed is None:
        if isinstance(default, bool):
            allowed = (bool,)
        elif isinstance(default, float):
            allowed = (int, float)
        elif isinstance(default, int):
            allowed = (int,)
        else:
            allowed = (type(default),)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join(t.__name__ for t in allowed)
        raise TypeError(f"config.{path} = {value!r} is a {type(value).__name__}; expected "
                        f"{names} (as its default {default!r})")


def _check_model_overrides(path: str, overrides: ConfigDict) -> None:
    from glm_jax.models.glm import GlmConfig

    fields = {f.name: f for f in dataclasses.fields(GlmConfig)}
    for key in overrides:
        if key not in fields:
            raise ValueError(f"config.{path}.{key} is not a model config field; "
                             f"{closest_fields(key, list(fields))}")


def validate_config(config: ConfigDict, schema: ConfigDict | None = None) -> None:
    """Raises ValueError for a field `default_config()` does not have (naming the closest
    valid names), TypeError for a value whose type differs from the default's, and then
    ValueError for a size or choice outside its valid values (`_RULES`, `_choices`), each
    naming the field, the value and what is valid."""
    _validate(config, default_config() if schema is None else schema, "")
    _check_values(config, "")


def _validate(config: ConfigDict, schema: ConfigDict, prefix: str) -> None:
    for key in config:
        path = f"{prefix}{key}"
        if key not in schema:
            where = f"config.{prefix[:-1]}" if prefix else "config"
            raise ValueError(f"config.{path} is not a field of {where}; "
                             f"{closest_fields(key, list(schema))}")
        value, default = config[key], schema[key]
        if path == "model.tiny":
            _check_model_overrides(path, value)
        elif isinstance(default, ConfigDict):
            if not isinstance(value, ConfigDict):
                raise TypeError(f"config.{path} must be a section (ConfigDict), "
                                f"got {type(value).__name__}")
            _validate(value, default, f"{path}.")
        else:
            _check_type(path, value, default)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """A valid value of a numeric or string field: `ok(value)`, described by `text`; checked
    only where `applies(section)` (the section holding the field) is true."""

    ok: Callable[[Any], bool]
    text: str
    applies: Callable[[ConfigDict], bool] = lambda section: True


def _at_least(low: int, why: str = "") -> _Rule:
    return _Rule(lambda v: v >= low, f"must be >= {low}{why}")


# NaN fails every comparison, so these refuse it too.
_POSITIVE = _Rule(lambda v: math.isfinite(v) and v > 0, "must be finite and > 0")
_NON_NEGATIVE = _Rule(lambda v: math.isfinite(v) and v >= 0, "must be finite and >= 0")
_UNIT = _Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
_COUNT = _at_least(1)


# The models low-rank adapters can be put on (config.model.lora.roles).
LORA_ROLES = ("sft", "reward", "policy", "critic")


def _names_among(text: str, valid: tuple[str, ...]) -> bool:
    names = [n.strip() for n in text.split(",")]
    return all(names) and set(names) <= set(valid)


def _bucket_edges(text: str) -> bool:
    try:
        edges = [int(x) for x in text.split(",")]
    except ValueError:
        return False
    return edges[0] >= 0 and all(a < b for a, b in zip(edges, edges[1:], strict=False))


# The valid values of every size field: "section.field", or "*.field" for that field in every
# section that has it (a "section.field" entry takes precedence).
_RULES: dict[str, _Rule | tuple[_Rule, ...]] = {
    "mesh.*": _Rule(lambda v: v >= 1 or v == -1,
                    "must be >= 1, or -1 for the devices the other axes leave"),
    "model.vocab_chunk": _COUNT,
    "model.lora.rank": _at_least(0, " (0: no adapters)"),
    "model.lora.alpha": _POSITIVE,
    "model.lora.dropout": _Rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model.lora.targets": _Rule(lambda v: _names_among(v, LORA_TARGETS),
                                f"must be comma-separated names among {', '.join(LORA_TARGETS)}"),
    "model.lora.roles": _Rule(lambda v: _names_among(v, LORA_ROLES),
                              f"must be comma-separated names among {', '.join(LORA_ROLES)}"),
    "data.max_prompt_tokens": _COUNT,
    "data.max_response_tokens": _COUNT,
    # Every stage's optimiser and loop.
    "*.batch_size": _COUNT,
    "*.num_steps": _COUNT,
    "*.learning_rate": _NON_NEGATIVE,
    "*.warmup_steps": _at_least(0),
    "*.end_lr_ratio": _NON_NEGATIVE,
    "*.weight_decay": _NON_NEGATIVE,
    "*.max_grad_norm": _Rule(lambda v: math.isfinite(v) and v >= 0,
                             "must be finite and >= 0 (0 turns gradient clipping off)"),
    "*.eval_every": _at_least(0, " (0: at the end only)"),
    "*.checkpoint_every": _at_least(0, " (0: at the end only)"),
    "*.keep_checkpoints": _at_least(1, ": 0 would keep no checkpoint, so a restart would "
                                       "begin again at step 1"),
    "*.log_every": _COUNT,
    "*.max_nonfinite_steps": _at_least(0),
    "*.sft_coef": _NON_NEGATIVE,
    # Sampling (dpo, rsft, ppo).
    "*.temperature": _POSITIVE,
    "*.top_k": _at_least(0, " (0: no top-k cut)"),
    "*.top_p": _Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "*.num_samples": _COUNT,
    "rm.l2_coef": _NON_NEGATIVE,
    "dpo.num_samples": _Rule(lambda v: v >= 2, "must be >= 2 in modes reward_pairs and "
                             "online: a pair needs two samples per prompt",
                             applies=lambda dpo: dpo.mode != "offline"),
    "dpo.pair_margin": _NON_NEGATIVE,
    "dpo.beta": _POSITIVE,
    "ppo.minibatch_size": _COUNT,
    "ppo.ppo_epochs": _COUNT,
    "ppo.critic_learning_rate": _NON_NEGATIVE,
    "ppo.clip_low": _Rule(lambda v: math.isfinite(v) and 0 < v < 1,
                          "must be in (0, 1): the ratio's floor is 1 - clip_low"),
    "ppo.clip_high": _POSITIVE,
    "ppo.num_generations": (_COUNT, _Rule(
        lambda v: v >= 2, "must be >= 2 with algorithm 'grpo' or 'rloo': their baseline is "
        "the other responses to the same prompt (e.g. --config.ppo.num_generations=4)",
        lambda section: section.algorithm in ("grpo", "rloo"))),
    "ppo.overlong_buffer": _Rule(
        lambda v: v >= 0, "must be >= 0 tokens (0: no overlong penalty)"),
    "ppo.overlong_coef": _NON_NEGATIVE,
    "ppo.clip_value": _POSITIVE,
    "ppo.value_coef": _NON_NEGATIVE,
    "ppo.gamma": _UNIT,
    "ppo.lam": _UNIT,
    "ppo.kl_coef": _NON_NEGATIVE,
    "ppo.kl_target": _Rule(lambda v: math.isfinite(v) and v >= 0,
                           "must be finite and >= 0 (0: a fixed kl_coef)"),
    "ppo.kl_horizon": _POSITIVE,
    "ppo.sft_batch_size": _COUNT,
    "ppo.no_eos_penalty": _NON_NEGATIVE,
    "ppo.filter_samples": _Rule(lambda v: v == 0 or v >= 2, "must be 0 (no prompt filter) "
                                "or >= 2 (a reward variance needs two samples)"),
    "ppo.filter_min_variance": _NON_NEGATIVE,
    "pipeline.num_sft": _COUNT,
    "pipeline.num_capability_sft": _COUNT,
    "pipeline.num_preference_prompts": _COUNT,
    "pipeline.num_test_preference_prompts": _COUNT,
    "pipeline.num_rl_prompts": _COUNT,
    "pipeline.num_eval_prompts_per_task": _COUNT,
    "pipeline.p_correct": _UNIT,
    "pipeline.p_verbose": _UNIT,
    "pipeline.p_tie": _UNIT,
    "pipeline.p_cycle": _UNIT,
    "pipeline.quality_scale": _NON_NEGATIVE,
    "pipeline.length_bias": _Rule(math.isfinite, "must be finite"),
    "pipeline.tie_margin": _NON_NEGATIVE,
    "pipeline.bucket_edges": _Rule(_bucket_edges, "must be comma-separated integers >= 0 in "
                                   "increasing order, e.g. '1,2,4,8'"),
    "pipeline.annotate_samples": _at_least(2, ": the annotators compare two responses"),
    "pipeline.eval_samples": _COUNT,
    "pipeline.ablation_steps": _at_least(0, " (0: as many as the main runs)"),
    "distributed.num_processes": _at_least(0, " (0: detected)"),
    "distributed.process_id": _at_least(-1, " (-1: detected)"),
    "metrics.peak_tflops": _NON_NEGATIVE,
}


def _choices() -> dict[str, tuple[str, ...]]:
    """The valid values of every choice field ("*.field" as in `_RULES`), read from the code
    that uses them (imported here: those modules import this one)."""
    from glm_jax.data.chat_template import TEMPLATE_NAMES
    from glm_jax.data.tokenizer import SPECIAL_TOKEN_MODES
    from glm_jax.losses import AGGREGATIONS, KLKind
    from glm_jax.models.attention import IMPLEMENTATIONS
    from glm_jax.models.glm import DTYPES, REMAT_POLICIES
    from glm_jax.train.dpo import MODES
    from glm_jax.train.rl import ALGORITHMS
    from glm_jax.train.roles import CRITIC_INITS

    dtypes = tuple(DTYPES)
    return {
        "on_damaged_checkpoint": ("refuse", "previous"),
        "model.dtype": dtypes, "model.param_dtype": dtypes, "model.moment_dtype": dtypes,
        "model.frozen_dtype": ("", *dtypes),
        "model.remat": tuple(REMAT_POLICIES), "model.attention": IMPLEMENTATIONS,
        "data.template": TEMPLATE_NAMES, "data.truncation": ("truncate", "drop"),
        "data.on_error": ("raise", "skip"), "data.special_tokens": SPECIAL_TOKEN_MODES,
        "*.best_mode": ("max", "min"),
        "dpo.mode": MODES,
        "ppo.kl_kind": get_args(KLKind), "ppo.critic_init": CRITIC_INITS,
        "ppo.algorithm": ALGORITHMS, "ppo.kl_in": ("", "reward", "loss"),
        "ppo.loss_aggregation": AGGREGATIONS,
    }


def _lookup(table: dict[str, Any], path: str) -> Any:
    section, _, field = path.rpartition(".")
    for key in (path, f"*.{field}", f"{section}.*"):
        if key in table:
            return table[key]
    return None


def _check_values(config: ConfigDict, prefix: str, choices: dict | None = None) -> None:
    choices = _choices() if choices is None else choices
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path == "model.tiny":
            continue  # GlmConfig checks its own fields
        if isinstance(value, ConfigDict):
            _check_values(value, f"{path}.", choices)
            continue
        valid = _lookup(choices, path)
        if valid is not None and value not in valid:
            shown = ", ".join(v if v else "'' (unset)" for v in valid)
            raise ValueError(f"config.{path} = {value!r}; valid values: {shown}")
        rules = _lookup(_RULES, path) or ()
        for rule in rules if isinstance(rules, tuple) else (rules,):
            if rule.applies(config) and not rule.ok(value):
                raise ValueError(f"config.{path} = {value!r}: {rule.text}")
