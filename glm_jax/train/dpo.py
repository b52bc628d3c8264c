"""Direct preference optimisation (paper 3.4, equation 7), in three modes (`config.dpo.mode`).

- "offline": annotated pairs from `dpo.train_file`.
- "reward_pairs": the paper's recipe. Before training, the initial policy samples `num_samples`
  responses to each prompt of `dpo.prompt_file`, the reward model `dpo.reward_model` scores
  them, and each prompt whose best and worst responses differ by more than `pair_margin` gives
  one (best, worst) pair; the pairs are written to WORKDIR/reward_pairs.jsonl and trained on
  exactly as in "offline".
- "online": the same pair construction at every step, from the current policy: sampling,
  scoring, pairing, the reference's log-probs and the update are one jitted program.

The reference policy is always the initial model, frozen. Offline (and reward_pairs) compute
its sequence log-probs once for every pair before training and look them up by `pair_index`;
online passes its parameters to the step. An optional SFT term on the chosen responses keeps
the policy's capabilities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glm_jax.config import validate_config
from glm_jax.data.chat_template import Template
from glm_jax.data.datasets import PreferenceDataset
from glm_jax.data.records import (
    PreferencePair,
    PromptExample,
    SFTExample,
    parse_records,
    read_jsonl,
)
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.losses import dpo_loss, masked_mean, sequence_logprobs
from glm_jax.models.heads import GlmForCausalLM
from glm_jax.models.lora import base_graphdef, base_state
from glm_jax.sharding import batch_sharding
from glm_jax.train import loop
from glm_jax.train.batched import map_batches
from glm_jax.train.cache import fixed_jsonl
from glm_jax.train.common import (
    check_tokenizer_fits,
    frozen_overrides,
    load_reward_model,
    mesh_from_config,
    read_prompts,
    template_from_config,
    tokenizer_from_config,
)
from glm_jax.train.loop import run_stage
from glm_jax.train.preflight import preflight
from glm_jax.train.programs import BoundStep
from glm_jax.train.prompts import PromptDataset
from glm_jax.train.reward import score_responses
from glm_jax.train.roles import roles_from_config
from glm_jax.train.rollout import (
    SamplingSettings,
    ScoredSamples,
    encode_prompt_file,
    sample_and_score,
    sample_prompts,
    sequence,
)
from glm_jax.train.state import (
    TrainState,
    init_train_state,
    optimizer_from_config,
    shardings_of,
)
from glm_jax.train.workdir import holds_workdir

MODES = ("offline", "reward_pairs", "online")
PAIRS_FILE = "reward_pairs.jsonl"
# What the pairs in PAIRS_FILE were built from; a resumed run reuses them only if it matches.
PAIRS_SETTINGS_FILE = "reward_pairs.settings.json"


# ---------------------------------------------------------------------------------------------
# The objective, shared by every mode.
# ---------------------------------------------------------------------------------------------

def _valid(batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[batch]` bool: the pairs that count (online: reward gap > margin); offline: all."""
    if "valid" in batch:
        return batch["valid"]
    return jnp.ones(batch["chosen_ids"].shape[:1], bool)


def pair_logps(model: GlmForCausalLM, batch: Mapping[str, jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sequence log-probs of the chosen and rejected responses `[batch]` each (one forward
    pass over both), and the mean token NLL of the valid pairs' chosen responses (the
    optional SFT term).

    batch: `{chosen,rejected}_{ids,mask,response_mask}` `[batch, length]` (token t is
    predicted from position t - 1, so a response mask never covers position 0); optional
    `valid` `[batch]` bool.
    """
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    response = jnp.concatenate([batch["chosen_response_mask"],
                                batch["rejected_response_mask"]])[:, 1:]
    hidden, _ = model.model(ids, mask)
    token_logps = model.token_logprobs(hidden[:, :-1], ids[:, 1:])  # token t+1 from t
    logps = sequence_logprobs(token_logps, response)
    size = batch["chosen_ids"].shape[0]
    chosen_tokens = response[:size] & _valid(batch)[:, None]
    chosen_nll = masked_mean(-token_logps[:size], chosen_tokens)
    return logps[:size], logps[size:], chosen_nll


def make_loss_fn(graphdef: nnx.GraphDef, beta: float, sft_coef: float) -> loop.LossFn:
    """`(params, batch) -> (loss, metrics)`: DPO (+ `sft_coef` * chosen NLL) on a pair batch
    carrying the reference's `ref_chosen_logps` / `ref_rejected_logps` `[batch]`; metrics are
    over the valid pairs."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array]):
        chosen, rejected, chosen_nll = pair_logps(nnx.merge(graphdef, params), batch)
        valid = _valid(batch)
        dpo, chosen_r, rejected_r = dpo_loss(
            chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta,
            valid)
        metrics = {"dpo_loss": dpo, "sft_nll": chosen_nll,
                   "reward_accuracy": masked_mean(chosen_r > rejected_r, valid),
                   "reward_margin": masked_mean(chosen_r - rejected_r, valid),
                   "chosen_reward": masked_mean(chosen_r, valid),
                   "rejected_reward": masked_mean(rejected_r, valid)}
        return dpo + sft_coef * chosen_nll, metrics

    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, beta: float, sft_coef: float,
                    state_sharding: Any, batch_sharding: Any):
    """The jitted offline DPO step `(state, batch) -> (state, metrics)`; the batch carries the
    cached `ref_chosen_logps` / `ref_rejected_logps` `[batch]`."""
    return loop.make_train_step(make_loss_fn(graphdef, beta, sft_coef), tx, schedule,
                                state_sharding, batch_sharding)


# ---------------------------------------------------------------------------------------------
# Offline: reference log-probs computed once per pair.
# ---------------------------------------------------------------------------------------------

@partial(jax.jit, static_argnums=0)
def _pair_logps_jit(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array]):
    chosen, rejected, _ = pair_logps(nnx.merge(graphdef, params), batch)
    return chosen, rejected


def reference_logps(graphdef: nnx.GraphDef, params: Any, dataset: PreferenceDataset, mesh,
                    num_pairs: int, batch_size: int) -> np.ndarray:
    """`[num_pairs, 2]` float32 (chosen, rejected) sequence log-probs under `params`, from one
    in-order pass over `dataset` (shuffle=False, num_epochs=1; a short last batch is padded
    to `batch_size` so every batch runs the same compiled program)."""

    def logps(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        return *_pair_logps_jit(graphdef, params, batch), batch["pair_index"]

    chosen, rejected, index = map_batches(logps, dataset, batch_size=batch_size, mesh=mesh,
                                          desc="reference log-probs")
    out = np.full((num_pairs, 2), np.nan, np.float32)
    out[index, 0], out[index, 1] = chosen, rejected
    return out


class WithReference:
    """Adds each pair's cached reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`
    `[batch]`) to the batches of a resumable iterator; keeps its get_state / set_state."""

    def __init__(self, batches: Iterator, reference: np.ndarray):
        self.batches, self.reference = batches, reference

    def __iter__(self) -> WithReference:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.batches))
        index = batch["pair_index"]
        batch["ref_chosen_logps"] = self.reference[index, 0]
        batch["ref_rejected_logps"] = self.reference[index, 1]
        return batch

    def get_state(self) -> Any:
        return self.batches.get_state()

    def set_state(self, state: Any) -> None:
        self.batches.set_state(state)


def _dataset(pairs: list[PreferencePair], tokenizer, template, config: ConfigDict,
             **kwargs: Any) -> PreferenceDataset:
    data = config.data
    return PreferenceDataset(pairs, tokenizer, template, batch_size=config.dpo.batch_size,
                             max_prompt_tokens=data.max_prompt_tokens,
                             max_response_tokens=data.max_response_tokens,
                             truncation=data.truncation, special_tokens=data.special_tokens,
                             **kwargs)


def implicit_reward_accuracy(graphdef: nnx.GraphDef, params: Any, dataset: PreferenceDataset,
                             reference: np.ndarray, beta: float, mesh) -> dict[str, float]:
    """Accuracy and mean margin of the implicit rewards beta * (log pi - log pi_ref)."""
    policy = reference_logps(graphdef, params, dataset, mesh, len(reference),
                             dataset.batch_size)
    rewards = beta * (policy - reference)
    return {"reward_accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1])),
            "reward_margin": float(np.mean(rewards[:, 0] - rewards[:, 1]))}


# ---------------------------------------------------------------------------------------------
# Pairs built by the reward model (paper 3.4).
# ---------------------------------------------------------------------------------------------

def select_pairs(rewards: jax.Array, margin: float, candidates: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best and worst response of each prompt, and whether they make a pair.

    rewards: `[n, num_samples]` float. candidates: `[n, num_samples]` bool, the responses
    allowed in a pair (default: all). Traceable; numpy inputs work too.
    Returns best, worst: `[n]` int32, the indices of the highest / lowest reward among the
    candidates (the first on ties); valid: `[n]` bool, true where best and worst are two
    different candidates whose rewards differ by more than `margin`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    candidates = (jnp.ones(rewards.shape, bool) if candidates is None
                  else jnp.asarray(candidates, bool))
    best = jnp.argmax(jnp.where(candidates, rewards, -jnp.inf), axis=-1).astype(jnp.int32)
    worst = jnp.argmin(jnp.where(candidates, rewards, jnp.inf), axis=-1).astype(jnp.int32)
    gap = (jnp.take_along_axis(rewards, best[:, None], axis=-1)
           - jnp.take_along_axis(rewards, worst[:, None], axis=-1))[:, 0]
    # With fewer than two candidates argmax and argmin can land on the same (or a non-
    # candidate) response; such a prompt has no pair whatever the margin.
    valid = (jnp.sum(candidates, axis=-1) >= 2) & (best != worst) & (gap > margin)
    return best, worst, valid


@dataclasses.dataclass(frozen=True)
class ScoredPair:
    """A reward-built pair and the rewards of its two responses (kept in the JSONL file as
    `chosen_reward` / `rejected_reward`, which `read_jsonl` ignores)."""

    pair: PreferencePair
    chosen_reward: float
    rejected_reward: float

    def to_json(self) -> dict[str, Any]:
        return {**self.pair.to_json(), "chosen_reward": self.chosen_reward,
                "rejected_reward": self.rejected_reward}


def pairs_from_samples(prompts: Sequence[PromptExample], samples: ScoredSamples,
                       texts: Sequence[Sequence[str]], margin: float) -> list[ScoredPair]:
    """One (best, worst) pair per prompt whose reward gap exceeds `margin`, in prompt order.

    samples: `num_samples` scored responses per prompt (`rewards` `[n, num_samples]`);
    texts: `[n][num_samples]` their decoded texts. A response whose text is empty (only EOS
    or special tokens) cannot be part of a pair: a preference file has no empty responses.
    The pair's `id` is the prompt's index in `prompts`.
    """
    candidates = np.array([[bool(text.strip()) for text in row] for row in texts],
                          bool).reshape(samples.rewards.shape)
    best, worst, valid = (np.asarray(x) for x in
                          select_pairs(samples.rewards, margin, candidates))
    out = []
    for index in np.nonzero(valid)[0]:
        prompt, b, w = prompts[index], best[index], worst[index]
        out.append(ScoredPair(
            PreferencePair(prompt=prompt.prompt, chosen=texts[index][b],
                           rejected=texts[index][w], history=prompt.history,
                           system=prompt.system,
                           task=prompt.task, id=str(index)),
            chosen_reward=float(samples.rewards[index, b]),
            rejected_reward=float(samples.rewards[index, w])))
    return out


def _pair_settings(config: ConfigDict) -> dict[str, Any]:
    """Everything the reward-built pairs depend on."""
    dpo, data = config.dpo, config.data
    return {"prompt_file": str(Path(dpo.prompt_file).absolute()),
            "reward_model": str(Path(dpo.reward_model).absolute()),
            "model": config.model.to_dict(), "seed": config.seed,
            "tokenizer": data.tokenizer, "template": data.template,
            "max_prompt_tokens": data.max_prompt_tokens,
            "max_response_tokens": data.max_response_tokens,
            "truncation": data.truncation, "special_tokens": data.special_tokens,
            **{name: dpo[name] for name in ("num_samples", "pair_margin", "temperature",
                                            "top_k", "top_p", "batch_size")}}


def reward_pairs(config: ConfigDict, workdir: Path, policy: GlmForCausalLM,
                 tokenizer: Tokenizer, template: Template, mesh: Mesh
                 ) -> list[PreferencePair]:
    """The pairs of mode "reward_pairs": built with `policy` (the initial model) and written to
    `workdir/reward_pairs.jsonl`, or read back from there when an earlier run with the same
    settings wrote it (a resumed run must train on the same pairs, not on new samples).

    The rewards that decide the pairs are those of the responses' texts as DPO will tokenize
    them (`reward.score_responses`), not of the sampled tokens: decode -> encode is not the
    identity (special tokens are dropped, BPE can merge differently) and a response cut at the
    length limit gets an EOS, so only the re-read rewards are those of what DPO trains on.
    """
    path = workdir / PAIRS_FILE
    records = fixed_jsonl(
        path, _pair_settings(config),
        lambda: ([scored.to_json() for scored in
                  _build_pairs(config, path, policy, tokenizer, template, mesh)], {}),
        settings_path=workdir / PAIRS_SETTINGS_FILE, what="reward-built pairs",
        remedy="use a fresh workdir, or delete the file to rebuild the pairs")
    return parse_records(records, "preference")


def _build_pairs(config: ConfigDict, path: Path, policy: GlmForCausalLM,
                 tokenizer: Tokenizer, template: Template, mesh: Mesh
                 ) -> list[ScoredPair]:
    """`reward_pairs`' pairs, sampled and scored afresh (`path` names them in messages)."""
    dpo, data = config.dpo, config.data
    prompts = read_prompts(dpo.prompt_file, "config.dpo.prompt_file", data.on_error)
    reward_model = load_reward_model(dpo.reward_model, "config.dpo.reward_model",
                                     tokenizer, mesh, frozen_overrides(config))
    prompts, ids, mask = encode_prompt_file(prompts, tokenizer, template, data,
                                            "config.dpo.prompt_file")
    # One token short of the limit: a response cut there still fits with the EOS that
    # tokenization appends.
    sampling = SamplingSettings.from_config(dpo, tokenizer, data.max_response_tokens - 1)
    samples = sample_prompts(policy, reward_model, ids, mask, num_samples=dpo.num_samples,
                             batch_size=dpo.batch_size * dpo.num_samples, settings=sampling,
                             seed=config.seed, mesh=mesh, desc="sampling pairs")
    texts = samples.texts(tokenizer, template)
    examples = [SFTExample(prompt=p.prompt, response=text, history=p.history, task=p.task,
                           system=p.system)
                for p, row in zip(prompts, texts, strict=True) for text in row]
    rewards = score_responses(reward_model, tokenizer, template, examples, config)["score"]
    rescored = dataclasses.replace(samples, rewards=rewards.reshape(samples.rewards.shape))
    scored = pairs_from_samples(prompts, rescored, texts, dpo.pair_margin)
    moved = float(np.mean(np.abs(rescored.rewards - samples.rewards) > 1e-3))
    print(f"{path}: {len(scored)} of {len(prompts)} prompts gave a pair (reward gap > "
          f"{dpo.pair_margin} among {dpo.num_samples} samples); mean sample reward "
          f"{float(np.mean(rescored.rewards)):.4f}; {moved:.0%} of the responses score "
          "differently as re-tokenized text")
    if not scored:
        raise ValueError(f"no prompt of {dpo.prompt_file} gave a pair: lower "
                         f"config.dpo.pair_margin (now {dpo.pair_margin}) or raise "
                         f"config.dpo.num_samples (now {dpo.num_samples})")
    return scored


# ---------------------------------------------------------------------------------------------
# Online: sample, score, pair and update in one jitted step.
# ---------------------------------------------------------------------------------------------

def sample_pairs(policy: GlmForCausalLM, reference: GlmForCausalLM, reward_model: nnx.Module,
                 prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
                 settings: SamplingSettings, num_samples: int, margin: float
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Traceable: `num_samples` responses from `policy` to each of the `[batch, P]` prompts,
    scored by `reward_model`, and each prompt's best and worst as a pair batch.

    Returns (pairs, stats). pairs: `{chosen,rejected}_{ids,mask,response_mask}` `[batch, P + R]`
    (sequence `[prompt | response]`, the response mask covering the response up to and
    including EOS, as in PPO), `valid` `[batch]` bool (reward gap > margin) and the
    reference's sequence log-probs `ref_chosen_logps` / `ref_rejected_logps` `[batch]`.
    stats: float32 scalars about the samples.
    """
    batch = prompt_ids.shape[0]
    # Row b * num_samples + s is sample s of prompt b: each device keeps its own prompts'
    # samples, and a reshape gives `[batch, num_samples, ...]`.
    ids = jnp.repeat(prompt_ids, num_samples, axis=0)
    mask = jnp.repeat(prompt_mask, num_samples, axis=0)
    out, rewards = sample_and_score(policy, reward_model, ids, mask, rng, settings)
    seq_ids, seq_mask = sequence(ids, mask, out)
    response_mask = jnp.concatenate([jnp.zeros_like(mask), out.response_mask], axis=1)
    rewards = rewards.reshape(batch, num_samples)
    best, worst, valid = select_pairs(rewards, margin)

    def pick(x: jax.Array, index: jax.Array) -> jax.Array:
        x = x.reshape(batch, num_samples, *x.shape[1:])
        return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]

    pairs = {"valid": valid}
    for name, index in (("chosen", best), ("rejected", worst)):
        pairs[f"{name}_ids"] = pick(seq_ids, index)
        pairs[f"{name}_mask"] = pick(seq_mask, index)
        pairs[f"{name}_response_mask"] = pick(response_mask, index)
    ref_chosen, ref_rejected, _ = pair_logps(reference, pairs)
    pairs["ref_chosen_logps"] = jax.lax.stop_gradient(ref_chosen)
    pairs["ref_rejected_logps"] = jax.lax.stop_gradient(ref_rejected)

    def score_of(index: jax.Array) -> jax.Array:
        return jnp.take_along_axis(rewards, index[:, None], axis=1)[:, 0]

    stats = {"pair_fraction": jnp.mean(valid.astype(jnp.float32)),
             "score_mean": jnp.mean(rewards),
             "score_chosen": masked_mean(score_of(best), valid),
             "score_rejected": masked_mean(score_of(worst), valid),
             "response_length": jnp.mean(jnp.sum(out.response_mask, axis=1,
                                                 dtype=jnp.float32)),
             "eos_fraction": jnp.mean(out.ended_with_eos.astype(jnp.float32))}
    return pairs, stats


def make_online_step(graphdef: nnx.GraphDef, reward_graphdef: nnx.GraphDef,
                     settings: SamplingSettings, tx: optax.GradientTransformation,
                     schedule: optax.Schedule, *, beta: float, sft_coef: float,
                     num_samples: int, margin: float, seed: int, mesh: Mesh,
                     state_sharding: Any, reward_sharding: Any, prompt_sharding: Any,
                     reference_base: nnx.GraphDef | None = None):
    """The jitted online DPO step
    `(state, reference_params, reward_params, prompts) -> (state, metrics)`.

    prompts: `prompt_ids` / `prompt_mask` `[batch, P]` (left-padded). reference_params: the
    frozen initial policy's parameters (same structure and shardings as `state.params`);
    with low-rank adapters on the policy, None: the reference is the policy's base, adapters
    off, run by `reference_base` (no copy). reward_params: those of the reward model
    `reward_graphdef`. Neither is differentiated.
    The sampling key of step k is `fold_in(key(seed), k)`: a resumed run samples the same.
    The update is `loop.make_train_step`'s on the `sample_pairs` batch; metrics add the
    sampling stats to the loss function's. The state's buffers are donated.
    """
    loss_fn = make_loss_fn(graphdef, beta, sft_coef)

    def step(state: TrainState, reference_params: Any, reward_params: Any,
             prompts: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        reference = (nnx.merge(graphdef, reference_params) if reference_base is None
                     else nnx.merge(reference_base, base_state(state.params)))
        pairs, stats = sample_pairs(
            nnx.merge(graphdef, state.params), reference,
            nnx.merge(reward_graphdef, reward_params), prompts["prompt_ids"],
            prompts["prompt_mask"], rng, settings, num_samples, margin)
        # Nested in this jit, the shared update compiles into the same program; its batch
        # shardings split the pairs over the data-parallel axes like the prompts.
        update = loop.make_train_step(loss_fn, tx, schedule, state_sharding,
                                      batch_sharding(mesh, pairs))
        state, metrics = update(state, pairs)
        return state, {**metrics, **stats}

    reference_sharding = state_sharding.params if reference_base is None else None
    return jax.jit(step, in_shardings=(state_sharding, reference_sharding, reward_sharding,
                                       prompt_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------

def _check_config(dpo: ConfigDict) -> str:
    """The files each mode needs (validate_config has checked the values: mode, num_samples,
    pair_margin)."""
    mode = dpo.mode
    if mode == "offline" and not dpo.train_file:
        raise ValueError("config.dpo.train_file is empty: set it to a preference JSONL file "
                         "(e.g. --config.dpo.train_file=data/pairs.jsonl)")
    if mode != "offline":
        if not dpo.prompt_file:
            raise ValueError(f"config.dpo.prompt_file is empty: mode {mode!r} samples "
                             "responses to a prompt JSONL file (e.g. "
                             "--config.dpo.prompt_file=data/prompts.jsonl)")
        if not dpo.reward_model:
            raise ValueError(f"config.dpo.reward_model is empty: mode {mode!r} scores the "
                             "samples with a trained reward model; set it to a reward-model "
                             "workdir (e.g. --config.dpo.reward_model=runs/rm)")
    return mode


def _eval_data(config: ConfigDict, tokenizer, template) -> PreferenceDataset | None:
    """The pairs of `dpo.eval_file`, each once and in order, or None without the file."""
    dpo = config.dpo
    if not dpo.eval_file:
        return None
    eval_pairs, _ = read_jsonl(dpo.eval_file, "preference", on_error=config.data.on_error,
                               field="config.dpo.eval_file")
    # Not shuffled, one epoch, no remainder dropped: every usable pair is evaluated once.
    eval_data = _dataset(eval_pairs, tokenizer, template, config, shuffle=False, num_epochs=1,
                         drop_remainder=False,
                         source=f"config.dpo.eval_file = {dpo.eval_file!r}")
    print(f"{dpo.eval_file}: {eval_data.report}")
    return eval_data


def _eval_fn(config: ConfigDict, graphdef: nnx.GraphDef, initial_params: Any,
             eval_data: PreferenceDataset | None, mesh: Mesh):
    """Implicit-reward accuracy on `eval_data` (`_eval_data`), or None without it."""
    dpo = config.dpo
    if eval_data is None:
        return None
    eval_reference = reference_logps(graphdef, initial_params, eval_data, mesh,
                                     eval_data.report.num_kept, dpo.batch_size)

    def eval_fn(state: TrainState) -> dict[str, Any]:
        return implicit_reward_accuracy(graphdef, state.params, eval_data, eval_reference,
                                        dpo.beta, mesh)

    return eval_fn


@holds_workdir
def train_dpo(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """DPO of the policy in `config` (reference: the initial model) in mode `dpo.mode`, in
    `workdir`, resuming from its latest checkpoint; exports the policy to `workdir/hf`."""
    validate_config(config)
    dpo, data = config.dpo, config.data
    mode = _check_config(dpo)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config)
    tokenizer = tokenizer_from_config(config)
    template = template_from_config(config, tokenizer)
    check_tokenizer_fits(config, tokenizer)  # before the pre-flight and any weights
    eval_data = _eval_data(config, tokenizer, template)  # a bad eval file fails fast
    # Before any weights load: the offline step (online DPO samples inside its step, a
    # program of its own, compiled at the first step).
    checked = preflight(config, "dpo", mesh, "DPO") if mode != "online" else None
    online = mode == "online"
    roles = roles_from_config(config, mesh, tokenizer=tokenizer, section="dpo",
                              reference=online, reward=online)
    model, model_config = roles.policy.module(), roles.policy.config
    graphdef, initial_params = roles.policy.graphdef, roles.policy.params
    eval_fn = _eval_fn(config, graphdef, initial_params, eval_data, mesh)
    tx, schedule = optimizer_from_config(dpo, config.model.moment_dtype)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())

    if online:
        reward_graphdef, reward_params = roles.reward.graphdef, roles.reward.params
        prompts = read_prompts(dpo.prompt_file, "config.dpo.prompt_file", data.on_error)
        prompts, ids, mask = encode_prompt_file(prompts, tokenizer, template, data,
                                                "config.dpo.prompt_file")
        print(f"{dpo.prompt_file}: {len(prompts)} prompts; each step samples "
              f"{dpo.num_samples} responses to each of {dpo.batch_size}")
        batches = iter(PromptDataset(ids, mask, batch_size=dpo.batch_size, seed=config.seed,
                                     **process))
        # With adapters on the policy there is no reference copy: its base is the reference.
        reference_params = roles.reference.params if roles.reference else None
        reference_base = (None if roles.reference
                          else base_graphdef(GlmForCausalLM, roles.policy.config))
        sampling = SamplingSettings.from_config(dpo, tokenizer, data.max_response_tokens)

        def make_step(shardings):
            step = make_online_step(
                graphdef, reward_graphdef, sampling, tx, schedule, beta=dpo.beta,
                sft_coef=dpo.sft_coef, num_samples=dpo.num_samples, margin=dpo.pair_margin,
                seed=config.seed, mesh=mesh, state_sharding=shardings_of(state),
                reward_sharding=shardings_of(reward_params), prompt_sharding=shardings,
                reference_base=reference_base)
            return BoundStep(step, (reference_params, reward_params))
    else:
        if mode == "offline":
            pairs, read_report = read_jsonl(dpo.train_file, "preference",
                                            on_error=data.on_error, field="config.dpo.train_file")
            read_report.print_skipped(dpo.train_file)
            path, source = dpo.train_file, f"config.dpo.train_file = {dpo.train_file!r}"
        else:
            pairs = reward_pairs(config, workdir, model, tokenizer, template, mesh)
            path = source = str(workdir / PAIRS_FILE)
        train_data = _dataset(pairs, tokenizer, template, config, seed=config.seed,
                              source=source, **process)
        print(f"{path}: {train_data.report}")
        in_order = _dataset(pairs, tokenizer, template, config, shuffle=False, num_epochs=1,
                            drop_remainder=False, source=source)
        reference = reference_logps(graphdef, initial_params, in_order, mesh,
                                    train_data.report.num_kept, dpo.batch_size)
        batches = WithReference(iter(train_data), reference)

        def make_step(shardings):
            return make_train_step(graphdef, tx, schedule, dpo.beta, dpo.sft_coef,
                                   shardings_of(state), shardings)

    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, tx)
    del model, initial_params, roles
    return run_stage(config, dpo, workdir, graphdef=graphdef, state=state, make_step=make_step,
                     batches=batches, mesh=mesh, model_config=model_config, tokenizer=tokenizer,
                     desc=f"DPO ({mode})", eval_fn=eval_fn, export_hf=True,
                     precompiled=checked)
