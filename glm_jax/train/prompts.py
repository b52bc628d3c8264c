"""The prompt side of PPO: the reward-variance filter and the reference responses (paper
3.4, eq. 5), each computed once and cached on disk, and the resumable prompt batches.

A cache file is a JSONL a user can open, with a `.key` file beside it holding a hash of
everything the records depend on (prompts, checkpoints, sampling settings, seed). The key is
written after the records, so an interrupted write is recomputed, never half-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_jax.data.pipeline import _BatchedDataset, _check_batching
from glm_jax.data.records import PromptExample, read_jsonl, write_jsonl
from glm_jax.train.rollout import ScoredSamples


def fingerprint(path: str | Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under `path` (or of the file itself): it
    changes when a checkpoint is rewritten, and costs no read of the weights."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)) if p != path else p.name, (st := p.stat()).st_size,
             st.st_mtime_ns) for p in files]


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_jsonl(path: str | Path, key: str, compute: Callable[[], list[dict[str, Any]]],
                 what: str) -> list[dict[str, Any]]:
    """The records in `path` if its `.key` file holds `key`; else `compute()`, written to
    `path` (atomically) and then the key."""
    path = Path(path)
    key_path = path.with_name(path.name + ".key")
    if path.exists() and key_path.exists() and key_path.read_text().strip() == key:
        print(f"{what}: reusing {path}")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    records = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)
    write_jsonl(path, records)
    tmp = key_path.with_name(key_path.name + ".tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, key_path)
    print(f"{what}: wrote {path}")
    return records


def reward_variance_filter(rewards: np.ndarray, min_variance: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Paper 3.4's prompt filter: a prompt whose sampled responses all get about the same
    reward teaches PPO nothing. rewards: `[n, K]`. Returns (kept `[n]` bool: variance >=
    min_variance, variances `[n]`: the population variance over the K samples)."""
    variances = np.var(np.asarray(rewards, np.float64), axis=1)
    return variances >= min_variance, variances


def reference_records(prompts: Sequence[PromptExample], samples: ScoredSamples,
                      tokenizer) -> list[dict[str, Any]]:
    """One record per prompt: the reference response (first sample) as text and as the
    sampled token ids (EOS included; text need not re-tokenize to the same ids), its reward
    and whether it ended with EOS."""
    texts = samples.texts(tokenizer)
    return [{**prompt.to_json(), "response": texts[i][0],
             "response_tokens": samples.tokens[i, 0][samples.response_mask[i, 0]].tolist(),
             "reward": float(samples.rewards[i, 0]),
             "ended_with_eos": bool(samples.ended_with_eos[i, 0])}
            for i, prompt in enumerate(prompts)]


class PromptDataset(_BatchedDataset):
    """Batches of left-padded prompts for PPO, built on `grain` like the other datasets
    (deterministic by seed, resumable, this process's share of each global batch).

    Each element: `prompt_ids`, `prompt_mask` `[batch, P]`, `ref_reward` `[batch]` float32
    (the cached reference response's reward, or 0), `prompt_index` `[batch]` int32 (into the
    prompt file).
    """

    def __init__(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                 ref_rewards: np.ndarray, kept: np.ndarray, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> None:
        _check_batching(batch_size, True, process_index, process_count)
        kept = [int(i) for i in np.flatnonzero(kept)]
        if len(kept) < batch_size:
            raise ValueError(f"{len(kept)} prompts left after filtering: fewer than one batch "
                             f"of {batch_size} (lower config.ppo.batch_size or "
                             "config.ppo.filter_min_variance)")
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.ref_rewards = np.asarray(ref_rewards, np.float32)
        self._batch(kept, self._encode, batch_size=batch_size, seed=seed, shuffle=shuffle,
                    num_epochs=num_epochs, drop_remainder=True, process_index=process_index,
                    process_count=process_count)

    def _encode(self, index: int) -> dict[str, np.ndarray]:
        return {"prompt_ids": self.prompt_ids[index], "prompt_mask": self.prompt_mask[index],
                "ref_reward": self.ref_rewards[index], "prompt_index": np.int32(index)}


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


def read_prompts(path: str, on_error: str) -> list[PromptExample]:
    prompts, _ = read_jsonl(path, "prompt", on_error=on_error)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts

