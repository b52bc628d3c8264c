"""Prompts in, scored samples out: what PPO's reference responses, the prompt filter, DPO's
reward-built pairs and rejection sampling all need.

Prompts are left-padded to `max_prompt_tokens`, so position `P - 1` is every row's last prompt
token and the response starts at `P` in all rows: the sequence `[prompt | response]` needs no
re-alignment, and the model derives positions from the mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glm_jax.data.chat_template import Template
from glm_jax.data.datasets import tokenize_prompts
from glm_jax.data.records import PromptExample
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.generation import GenerationOutput, decode_responses, sample
from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel
from glm_jax.train.batched import map_batches
from glm_jax.train.loop import Preemption


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; `eos_token_ids` / `pad_token_id` from the tokenizer."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, section: ConfigDict, tokenizer: Tokenizer, max_new_tokens: int,
                    *, greedy: bool = False) -> SamplingSettings:
        """From a config section with `temperature`, `top_k`, `top_p`."""
        return cls(max_new_tokens=max_new_tokens, eos_token_ids=tuple(tokenizer.eos_token_ids),
                   pad_token_id=tokenizer.pad_token_id,
                   temperature=0.0 if greedy else float(section.temperature),
                   top_k=int(section.top_k), top_p=float(section.top_p))

    def sample(self, model: GlmForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array,
               rng: jax.Array) -> GenerationOutput:
        return sample(model, prompt_ids, prompt_mask, rng, max_new_tokens=self.max_new_tokens,
                      temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                      eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id)


def encode_prompts(prompts: Sequence[PromptExample], tokenizer: Tokenizer,
                   template: Template, max_prompt_tokens: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Chat-rendered prompts left-padded to `max_prompt_tokens`: ids `[n, P]` int32 and mask
    `[n, P]` bool. An over-long prompt loses its oldest tokens after the template prefix, as
    in training; special-token strings in a prompt are encoded as plain text."""
    tokens, _ = tokenize_prompts(prompts, tokenizer, template,
                                 max_prompt_tokens=max_prompt_tokens)
    return _left_pad(tokens, max_prompt_tokens, tokenizer.pad_token_id)


def encode_prompt_file(prompts: Sequence[PromptExample], tokenizer: Tokenizer,
                       template: Template, data: ConfigDict, field: str
                       ) -> tuple[list[PromptExample], np.ndarray, np.ndarray]:
    """The prompts of the file in config `field` (e.g. "config.ppo.prompt_file") that
    `data.truncation` and `data.special_tokens` keep, and their ids and mask as in
    `encode_prompts` (`[kept, P]`). Prints how many prompts were truncated or dropped; raises
    ValueError naming `field` when none is left."""
    tokens, report = tokenize_prompts(prompts, tokenizer, template,
                                      max_prompt_tokens=data.max_prompt_tokens,
                                      truncation=data.truncation,
                                      special_tokens=data.special_tokens)
    print(f"{field}: {report}")
    if not report.num_kept:
        raise ValueError(f"{field}: no prompts left ({report}): raise "
                         "config.data.max_prompt_tokens, or set config.data.truncation="
                         "'truncate' / config.data.special_tokens='plain'")
    kept = [i for i, ids in enumerate(tokens) if ids is not None]
    ids, mask = _left_pad([tokens[i] for i in kept], data.max_prompt_tokens,
                          tokenizer.pad_token_id)
    return [prompts[i] for i in kept], ids, mask


def _left_pad(tokens: Sequence[Sequence[int]], length: int, pad_token_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(tokens), length), pad_token_id, np.int32)
    mask = np.zeros((len(tokens), length), bool)
    for row, row_tokens in enumerate(tokens):
        ids[row, length - len(row_tokens):] = row_tokens
        mask[row, length - len(row_tokens):] = True
    return ids, mask


def sequence(prompt_ids: jax.Array, prompt_mask: jax.Array, out: GenerationOutput
             ) -> tuple[jax.Array, jax.Array]:
    """`[prompt | response]` ids and mask `[batch, P + R]`: the mask covers the real prompt
    tokens and the response up to and including its EOS, never padding."""
    return (jnp.concatenate([prompt_ids, out.tokens], axis=1),
            jnp.concatenate([prompt_mask, out.response_mask], axis=1))


def sample_and_score(policy: GlmForCausalLM, reward_model: GlmRewardModel | None,
                     prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
                     settings: SamplingSettings) -> tuple[GenerationOutput, jax.Array]:
    """Traceable: responses to `[batch, P]` prompts and their rewards `[batch]` float32, read
    on each response's last token (its EOS, or the length limit's last token); zeros without
    a reward model (the caller scores the texts: rule rewards)."""
    out = settings.sample(policy, prompt_ids, prompt_mask, rng)
    if reward_model is None:
        return out, jnp.zeros(prompt_ids.shape[:1], jnp.float32)
    return out, reward_model(*sequence(prompt_ids, prompt_mask, out))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_and_score_jit(policy_graphdef, reward_graphdef, settings, policy_params,
                          reward_params, prompt_ids, prompt_mask, rng):
    reward_model = None if reward_graphdef is None else nnx.merge(reward_graphdef,
                                                                   reward_params)
    return sample_and_score(nnx.merge(policy_graphdef, policy_params), reward_model,
                            prompt_ids, prompt_mask, rng, settings)


def response_texts(tokens: np.ndarray, response_mask: np.ndarray, tokenizer: Tokenizer,
                   template: Template) -> list[str]:
    """Each response `[N, R]` decoded, without its EOS and the template's lead text (what a
    rule reward judges, what a cache file shows, and a record's response text)."""
    return decode_responses(tokens, response_mask, tokenizer, template, tokenizer.eos_token_ids)


@dataclass
class ScoredSamples:
    """`num_samples` responses per prompt.

    tokens: `[n, num_samples, R]` int32 (pad after EOS); response_mask: `[n, num_samples, R]`
    bool; ended_with_eos: `[n, num_samples]` bool; rewards: `[n, num_samples]` float32.
    """

    tokens: np.ndarray
    response_mask: np.ndarray
    ended_with_eos: np.ndarray
    rewards: np.ndarray

    def response_ids(self, tokenizer: Tokenizer) -> list[list[list[int]]]:
        """Each response's token ids without its EOS: `[n][num_samples]` lists."""
        eos = np.asarray(tokenizer.eos_token_ids)
        return [[row[keep & ~np.isin(row, eos)].tolist()
                 for row, keep in zip(rows, masks, strict=True)]
                for rows, masks in zip(self.tokens, self.response_mask, strict=True)]

    def texts(self, tokenizer: Tokenizer, template: Template) -> list[list[str]]:
        """Each response decoded as in `response_texts`: `[n][num_samples]`."""
        n, k, length = self.tokens.shape
        flat = response_texts(self.tokens.reshape(n * k, length),
                              self.response_mask.reshape(n * k, length), tokenizer, template)
        return [flat[i * k:(i + 1) * k] for i in range(n)]


def sample_prompts(policy: GlmForCausalLM, reward_model: GlmRewardModel | None,
                   prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, num_samples: int,
                   batch_size: int, settings: SamplingSettings, seed: int, mesh: Mesh,
                   desc: str = "sampling") -> ScoredSamples:
    """`num_samples` scored responses for each of the `[n, P]` prompts, `batch_size` rows per
    compiled call (a short last batch is padded, so one program serves every call). The
    result depends only on (params, prompts, settings, seed, batch_size). Without a reward
    model the rewards are zeros (rule rewards score the texts afterwards).

    SIGTERM / SIGINT abandon the sampling (the callers write their caches and outputs only
    from a complete result) and exit 0 as the training loop does; a rerun samples again."""
    n = len(prompt_ids)
    rows = np.repeat(np.arange(n), num_samples)  # prompt of each (prompt, sample) row
    policy_graphdef, policy_params = nnx.split(policy)
    reward_graphdef, reward_params = (nnx.split(reward_model) if reward_model is not None
                                      else (None, None))
    key = jax.random.key(seed)
    numbers = itertools.count()  # map_batches calls once per batch, in order

    def sample_batch(batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
        out, rewards = _sample_and_score_jit(
            policy_graphdef, reward_graphdef, settings, policy_params, reward_params,
            batch["ids"], batch["mask"], jax.random.fold_in(key, next(numbers)))
        return out.tokens, out.response_mask, out.ended_with_eos, rewards

    starts = range(0, len(rows), batch_size)
    batches = ({"ids": prompt_ids[rows[i:i + batch_size]],
                "mask": prompt_mask[rows[i:i + batch_size]]} for i in starts)
    with Preemption(abandon=f"sampling for the {desc}"):
        tokens, response_mask, ended, rewards = map_batches(
            sample_batch, batches, batch_size=batch_size, mesh=mesh, desc=desc,
            total=len(starts))
    shape = (n, num_samples)
    return ScoredSamples(tokens=tokens.reshape(*shape, -1),
                         response_mask=response_mask.reshape(*shape, -1),
                         ended_with_eos=ended.reshape(shape), rewards=rewards.reshape(shape))
