"""Rejection-sampling fine-tuning (best-of-N): the paper's comparison point for RLHF (section
"RLHF v.s. Rejection Sampling", after Touvron et al. 2023b).

For each prompt of `rsft.prompt_file`, sample `rsft.num_samples` responses from the initial
policy (`model.init_checkpoint`), score them with the reward model `rsft.reward_model` (a
reward-model workdir), keep the best, then fine-tune on the winners with the SFT stage
(`config.sft`'s optimiser and steps). A workdir holds:

    best_of_n.jsonl          the winners as SFT examples, with `reward` (the winner's) and
                             `rewards` (all of its prompt's samples)
    best_of_n_summary.json   prompts, kept, mean best vs mean sample reward, the settings
    sft/                     the SFT run on the winners, exported to sft/hf

Sampling happens once: a rerun reuses best_of_n.jsonl (when made with the same settings) and
the SFT phase resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from glm_jax.config import validate_config
from glm_jax.data.chat_template import Template, encode_response
from glm_jax.data.records import PromptExample, SFTExample, parse_records
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.train.cache import fixed_jsonl
from glm_jax.train.common import (
    check_tokenizer_fits,
    mesh_from_config,
    read_prompts,
    template_from_config,
    tokenizer_from_config,
)
from glm_jax.train.roles import roles_from_config
from glm_jax.train.rollout import (
    SamplingSettings,
    ScoredSamples,
    encode_prompt_file,
    sample_prompts,
)
from glm_jax.train.sft import train_sft
from glm_jax.train.workdir import holds_workdir

WINNERS_FILE = "best_of_n.jsonl"
SUMMARY_FILE = "best_of_n_summary.json"


def best_of_n(samples: ScoredSamples, *, require_eos: bool = True,
              min_reward: float | None = None, eligible: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The highest-reward sample of each prompt.

    samples: its `rewards` and `ended_with_eos`, `[n, num_samples]`, are used.
    require_eos: a response that hit the length limit without EOS is never a winner (SFT
      would teach the policy to stop where the limit happened to cut it).
    min_reward: when given, a prompt whose best reward is below it keeps nothing.
    eligible: optional `[n, num_samples]` bool, further samples that may not win.
    Returns `(index, kept)`: `index` `[n]` int64, each prompt's winning sample (the first of
    equal rewards; meaningless where not kept), and `kept` `[n]` bool, whether the prompt has a
    winner (some sample may win and, with `min_reward`, the best reaches it).
    """
    rewards = np.asarray(samples.rewards, np.float64)
    ok = np.ones(rewards.shape, bool) if eligible is None else np.asarray(eligible, bool)
    if require_eos:
        ok = ok & np.asarray(samples.ended_with_eos, bool)
    masked = np.where(ok, rewards, -np.inf)
    index = masked.argmax(axis=1)
    kept = ok.any(axis=1)
    if min_reward is not None:
        kept &= masked[np.arange(len(index)), index] >= min_reward
    return index, kept


def trainable(samples: ScoredSamples, texts: list[list[str]], prompts: Sequence[PromptExample],
              tokenizer: Tokenizer, template: Template) -> np.ndarray:
    """`[n, num_samples]` bool: the decoded response is not blank and encodes back, as the
    response of an SFT example of its prompt, to exactly the sampled tokens (EOS ids aside).
    The SFT phase trains on the re-encoded text, so a sample that fails this is not what the
    reward model scored (non-canonical BPE splits, special tokens that decoding drops); a
    blank response is not a valid SFT example."""
    eos = set(tokenizer.eos_token_ids)

    def round_trips(text: str, ids: list[int], prompt: PromptExample) -> bool:
        again = encode_response(tokenizer, template, text, prompt.prompt, prompt.history,
                                prompt.system)
        return [i for i in again if i not in eos] == ids

    return np.array([[bool(text.strip()) and round_trips(text, ids, prompt)
                       for text, ids in zip(text_row, id_row, strict=True)]
                      for text_row, id_row, prompt in zip(texts, samples.response_ids(tokenizer),
                                                          prompts, strict=True)], bool
                     ).reshape(samples.rewards.shape)


def parse_min_reward(value: Any) -> float | None:
    """`rsft.min_reward`: None or "" (off), else a number (the command line gives a string)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"config.rsft.min_reward = {value!r}: expected a number, or '' to "
                         "keep every prompt's best response") from None


def _settings(config: ConfigDict) -> dict[str, Any]:
    """What the winners depend on; a rerun reuses the winners file only if these are equal."""
    data = config.data
    settings = {**{f"rsft.{k}": v for k, v in config.rsft.items()},
                "model.init_checkpoint": config.model.init_checkpoint, "seed": config.seed,
                **{f"data.{k}": data[k] for k in ("tokenizer", "template", "max_prompt_tokens",
                                                  "max_response_tokens", "truncation",
                                                  "special_tokens")}}
    return json.loads(json.dumps(settings))  # the form it takes after a JSON round trip


def _check_config(config: ConfigDict) -> None:
    rsft = config.rsft
    if not rsft.prompt_file:
        raise ValueError("config.rsft.prompt_file is empty: set it to a prompt JSONL file "
                         "(e.g. --config.rsft.prompt_file=data/prompts.jsonl)")
    if not rsft.reward_model:
        raise ValueError("config.rsft.reward_model is empty: set it to a reward-model workdir "
                         "(scripts/train_rm.py --workdir, e.g. --config.rsft.reward_model=runs/rm)")
    if rsft.num_samples < 1 or rsft.batch_size < 1:
        raise ValueError(f"config.rsft.num_samples = {rsft.num_samples} and config.rsft."
                         f"batch_size = {rsft.batch_size} must be positive")
    parse_min_reward(rsft.min_reward)


def load_summary(workdir: str | Path) -> dict[str, Any]:
    """`best_of_n_summary.json` of `workdir`, or {} when there is none."""
    path = Path(workdir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def rejection_sample(config: ConfigDict, workdir: str | Path) -> list[SFTExample]:
    """The best of `rsft.num_samples` responses to each prompt of `rsft.prompt_file`, as SFT
    examples, written to `workdir/best_of_n.jsonl` with `best_of_n_summary.json`.

    Responses are up to `data.max_response_tokens` tokens (EOS included), so a winner fits
    the SFT phase untruncated. A winner must be `trainable`, end with EOS (unless
    `rsft.require_eos` is False) and reach `rsft.min_reward` (when set). When the winners
    file exists it is returned as is, after checking it was sampled with `config`'s settings
    (a stale file would silently train on other data): sampling never runs twice.
    """
    _check_config(config)
    workdir = Path(workdir)
    records = fixed_jsonl(
        workdir / WINNERS_FILE, _settings(config), lambda: _sample_winners(config),
        settings_path=workdir / SUMMARY_FILE, settings_key="settings", what="best-of-n winners",
        remedy="use a new workdir, or delete it (and sft/) to sample again")
    return parse_records(records, "sft")


def _sample_winners(config: ConfigDict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`rejection_sample`'s winners, sampled afresh: their records (SFT examples with the
    winner's `reward` and its prompt's `rewards`) and the summary (without the settings)."""
    rsft, data = config.rsft, config.data
    prompts = read_prompts(rsft.prompt_file, "config.rsft.prompt_file", data.on_error)
    mesh = mesh_from_config(config)
    tokenizer = tokenizer_from_config(config)
    template = template_from_config(config, tokenizer)
    check_tokenizer_fits(config, tokenizer)  # before the pre-flight and any weights
    roles = roles_from_config(config, mesh, tokenizer=tokenizer, section="rsft", reward=True)
    policy, reward_model = roles.policy.module(), roles.reward.module()
    prompts, prompt_ids, prompt_mask = encode_prompt_file(prompts, tokenizer, template, data,
                                                          "config.rsft.prompt_file")
    settings = SamplingSettings.from_config(rsft, tokenizer, data.max_response_tokens)
    samples = sample_prompts(policy, reward_model, prompt_ids, prompt_mask,
                             num_samples=rsft.num_samples, batch_size=rsft.batch_size,
                             settings=settings, seed=config.seed, mesh=mesh, desc="best-of-n")
    del policy, reward_model, roles  # the SFT phase loads its own copy of the policy

    texts = samples.texts(tokenizer, template)
    ok = trainable(samples, texts, prompts, tokenizer, template)
    index, kept = best_of_n(samples, require_eos=rsft.require_eos,
                            min_reward=parse_min_reward(rsft.min_reward), eligible=ok)
    rewards = samples.rewards.astype(float)
    winners = [(i, int(index[i])) for i in np.flatnonzero(kept)]
    examples = [SFTExample(prompt=prompts[i].prompt, response=texts[i][j],
                           history=prompts[i].history, task=prompts[i].task,
                           system=prompts[i].system)
                for i, j in winners]
    best = [rewards[i, j] for i, j in winners]
    summary = {
        "prompts": len(prompts), "kept": len(examples), "num_samples": rsft.num_samples,
        "ended_with_eos": int(samples.ended_with_eos.sum()), "trainable": int(ok.sum()),
        "mean_reward": float(rewards.mean()),
        "mean_best_reward": float(np.mean(best)) if best else None}
    print(f"best-of-{rsft.num_samples}: kept {len(examples)} of {len(prompts)} prompts; mean "
          f"reward {summary['mean_reward']:.4f}, of the winners {summary['mean_best_reward']}")
    return [{**example.to_json(), "reward": rewards[i, j], "rewards": rewards[i].tolist()}
            for example, (i, j) in zip(examples, winners, strict=True)], summary


@holds_workdir
def train_rsft(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """`rejection_sample`, then `train_sft` on the winners in `workdir/sft` (exported to
    `workdir/sft/hf`). Returns the SFT phase's last metrics, with the sampling summary under
    "best_of_n"."""
    validate_config(config)
    workdir = Path(workdir)
    examples = rejection_sample(config, workdir)
    summary = load_summary(workdir)
    if not examples:
        raise ValueError(f"no prompt has a winner (see {workdir / SUMMARY_FILE}): lower "
                         "config.rsft.min_reward, raise config.rsft.num_samples, or allow "
                         "responses without EOS (config.rsft.require_eos=False)")
    sft_config = config.copy_and_resolve_references()
    sft_config.sft.train_file = str(workdir / WINNERS_FILE)
    return {**train_sft(sft_config, workdir / "sft"), "best_of_n": summary}
