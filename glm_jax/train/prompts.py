"""The prompt side of PPO: the reward-variance filter and the reference responses (paper
3.4, eq. 5), each computed once and cached on disk (`cache.cached_jsonl`), and the resumable
prompt batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from glm_jax.data.datasets import _BatchedDataset, _check_batching
from glm_jax.data.records import PromptExample
from glm_jax.train.rollout import ScoredSamples


def reward_variance_filter(rewards: np.ndarray, min_variance: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Paper 3.4's prompt filter: a prompt whose sampled responses all get about the same
    reward teaches PPO nothing. rewards: `[n, K]`. Returns (kept `[n]` bool: variance >=
    min_variance, variances `[n]`: the population variance over the K samples)."""
    variances = np.var(np.asarray(rewards, np.float64), axis=1)
    return variances >= min_variance, variances


def reference_records(prompts: Sequence[PromptExample], samples: ScoredSamples,
                      tokenizer, template) -> list[dict[str, Any]]:
    """One record per prompt: the reference response (first sample) as text and as the
    sampled token ids (EOS included; text need not re-tokenize to the same ids), its reward
    and whether it ended with EOS."""
    texts = samples.texts(tokenizer, template)
    return [{**prompt.to_json(), "response": texts[i][0],
             "response_tokens": samples.tokens[i, 0][samples.response_mask[i, 0]].tolist(),
             "reward": float(samples.rewards[i, 0]),
             "ended_with_eos": bool(samples.ended_with_eos[i, 0])}
            for i, prompt in enumerate(prompts)]


class PromptDataset(_BatchedDataset):
    """Batches of left-padded prompts for PPO and online DPO, built on `grain` like the other
    datasets (deterministic by seed, repeated forever, resumable, this process's share of each
    global batch).

    Each element: `prompt_ids`, `prompt_mask` `[batch, P]`, `prompt_index` `[batch]` int32
    (into the prompt file), and with `ref_rewards` given, `ref_reward` `[batch]` float32 (the
    cached reference response's reward). `kept` `[n]` bool selects the prompts to use.
    """

    def __init__(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, batch_size: int,
                 seed: int = 0, ref_rewards: np.ndarray | None = None,
                 kept: np.ndarray | None = None, process_index: int = 0,
                 process_count: int = 1) -> None:
        _check_batching(batch_size, True, process_index, process_count)
        rows = [int(i) for i in np.flatnonzero(np.ones(len(prompt_ids), bool)
                                               if kept is None else kept)]
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} prompts (after filtering): fewer than one batch of "
                             f"{batch_size}; lower the batch size or add prompts")
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.ref_rewards = None if ref_rewards is None else np.asarray(ref_rewards, np.float32)
        self._batch(rows, self._encode, batch_size=batch_size, seed=seed, shuffle=True,
                    num_epochs=None, drop_remainder=True, process_index=process_index,
                    process_count=process_count)

    def _encode(self, index: int) -> dict[str, np.ndarray]:
        out = {"prompt_ids": self.prompt_ids[index], "prompt_mask": self.prompt_mask[index],
               "prompt_index": np.int32(index)}
        if self.ref_rewards is not None:
            out["ref_reward"] = self.ref_rewards[index]
        return out


class ZippedBatches:
    """Two resumable iterators as one: each batch is the first's entries plus the second's
    with `prefix` on their names; `get_state` / `set_state` cover both."""

    def __init__(self, first: Any, second: Any, prefix: str):
        self.first, self.second, self.prefix = iter(first), iter(second), prefix

    def __iter__(self) -> ZippedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {**next(self.first),
                **{self.prefix + k: v for k, v in next(self.second).items()}}

    def get_state(self) -> dict[str, Any]:
        return {"first": self.first.get_state(), "second": self.second.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.first.set_state(state["first"])
        self.second.set_state(state["second"])
