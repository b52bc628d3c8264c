"""Compiled sampling: prefill, then a `lax.while_loop` decode over a static KV cache.

`generate` compiles once per (model structure, shapes, sampling settings) and exits early
when every row has produced an EOS. `sample` is the same computation as a traceable function,
for callers (PPO) that put generation inside a larger jitted program.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from glm_jax.data.chat_template import Template, encode_chat, response_text, template_for
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.models.glm import KVCache
from glm_jax.models.heads import GlmForCausalLM, last_token_index


@struct.dataclass
class GenerationOutput:
    """tokens: `[batch, max_new_tokens]` int32, `pad_token_id` after the first EOS.
    response_mask: `[batch, max_new_tokens]` bool, the tokens up to and including the first
      EOS (all of them if there is none); never padding.
    logprobs: `[batch, max_new_tokens]` float32, log_softmax of the untempered, unfiltered
      logits at each sampled token (what the PPO ratio compares against); 0 outside the mask.
    ended_with_eos: `[batch]` bool, whether the row stopped on an EOS token.
    """

    tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    ended_with_eos: jax.Array


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits: `[batch, vocab]`."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the smallest set of
        # most likely tokens whose total reaches top_p (always at least one token).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        cutoff = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def greedy_token(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` (the first of equal maxima) as int32 `[batch]`: a max,
    then the lowest index holding it (or the first NaN, as argmax). Two vectorised
    reductions; XLA:CPU's argmax is one reduce over (value, index) pairs and takes several
    times as long over a 32k vocabulary."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    hit = (logits == best) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, vocab, logits.shape[-1]), axis=-1)


# Tokens per block of the two-level draw in `categorical_token`.
SAMPLING_BLOCK = 256


def categorical_token(logits: jax.Array, rng: jax.Array) -> jax.Array:
    """One token per row with probability softmax(logits), as int32 `[batch]`.

    logits: `[batch, vocab]` float32; -inf entries are never drawn. Inverse-CDF sampling in
    two levels from two uniform numbers per row: a block of `SAMPLING_BLOCK` tokens with
    probability its mass, then a token of the block with probability its share of it.
    `jax.random.categorical` draws a Gumbel number per vocabulary entry instead: at GLM-4's
    151552 tokens and batch 64 that is 139 ms per decode step on a 2-core CPU, against 4.8 ms
    here. The running sums stay short (vocab / 256 blocks, then 256 tokens), so each token's
    share of the unit interval is its probability up to float32 rounding of its block's mass.
    """
    batch, vocab = logits.shape
    blocks = -(-vocab // SAMPLING_BLOCK)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, blocks * SAMPLING_BLOCK - vocab)))
    weights = weights.reshape(batch, blocks, SAMPLING_BLOCK)
    block_u, token_u = jax.random.uniform(rng, (2, batch))
    block = _inverse_cdf(weights.sum(-1), block_u)
    within = _inverse_cdf(jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0],
                          token_u)
    return block * SAMPLING_BLOCK + within


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index i of `weights` `[batch, n]` (>= 0, not all 0) with u `[batch]` in [0, 1) in its
    interval [sum(w[:i]), sum(w[:i + 1])) of the total: weight 0 is never picked (the
    rounding of u * total up to the total falls back to the last positive weight)."""
    cumulative = jnp.cumsum(weights, axis=-1)
    point = u * cumulative[:, -1]
    index = jnp.sum(cumulative <= point[:, None], axis=-1, dtype=jnp.int32)
    positions = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(weights > 0, positions, 0), axis=-1)
    return jnp.minimum(index, last_positive)


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                 top_p: float) -> jax.Array:
    """One token per row from float32 logits `[batch, vocab]`; temperature 0 is greedy."""
    if temperature == 0.0:
        return greedy_token(logits)
    return categorical_token(filter_logits(logits / temperature, top_k, top_p), rng)


def sample(model: GlmForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_token_ids: Sequence[int], pad_token_id: int) -> GenerationOutput:
    """Traceable generation (see `generate`); call it inside your own `jax.jit`."""
    batch, prompt_length = prompt_ids.shape
    eos = jnp.asarray(tuple(eos_token_ids), jnp.int32)
    cache = KVCache.init(model.config, batch, prompt_length + max_new_tokens)
    # Unrolled layers: their weights sliced from the stacked ones (and the kernels made into
    # the decode loop's layout) once, outside the loop.
    layers = None if model.config.scan_layers else model.model.decode_layers()
    lm_head = model.decode_lm_head()
    hidden, cache = model.model(prompt_ids, prompt_mask, cache, layers=layers)
    last = last_token_index(prompt_mask)
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0],
                          lm_head)

    def cond(carry):
        step, *_, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, rng, tokens, logprobs, mask, done = carry
        # Named scopes label the ops for benchmarks/decode_profile.py.
        with jax.named_scope("sampling"):
            rng, key = jax.random.split(rng)
            token = sample_token(logits, key, temperature, top_k, top_p)
            token = jnp.where(done, pad_token_id, token)
        with jax.named_scope("log_softmax"):
            logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None],
                                          axis=-1)[:, 0]
        active = ~done
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
        mask = mask.at[:, step].set(active)
        done = done | (active & jnp.isin(token, eos))
        hidden, cache = model.model(token[:, None], jnp.ones((batch, 1), bool), cache,
                                    layers=layers)
        with jax.named_scope("lm_head"):
            logits = model.logits(hidden[:, 0], lm_head)
        return step + 1, cache, logits, rng, tokens, logprobs, mask, done

    carry = (
        jnp.zeros((), jnp.int32), cache, logits, rng,
        jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch, max_new_tokens), bool),
        jnp.zeros((batch,), bool),
    )
    _, _, _, _, tokens, logprobs, mask, done = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(tokens=tokens, response_mask=mask, logprobs=logprobs,
                            ended_with_eos=done)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "eos_token_ids", "pad_token_id"))
def _generate_jit(graphdef, state, prompt_ids, prompt_mask, rng, *, max_new_tokens, temperature,
                  top_k, top_p, eos_token_ids, pad_token_id) -> GenerationOutput:
    model = nnx.merge(graphdef, state)
    return sample(model, prompt_ids, prompt_mask, rng, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p,
                  eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)


def generate(model: GlmForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array | None = None,
             *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, rng: jax.Array | int = 0) -> GenerationOutput:
    """Samples `max_new_tokens` tokens after each prompt, as one compiled program.

    Args:
      prompt_ids, prompt_mask: `[batch, prompt_length]`; prompts may be left-padded to
        different lengths.
      temperature: 0 for greedy decoding.
      top_k: keep the k most likely tokens (0: all). top_p: nucleus sampling mass (1: all).
      eos_token_ids, pad_token_id: default to the model config's.
      rng: a JAX key or an int seed.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"invalid sampling settings: temperature={temperature} (>= 0), "
                         f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {prompt_ids.shape}")
    prompt_mask = (jnp.ones(prompt_ids.shape, bool) if prompt_mask is None
                   else jnp.asarray(prompt_mask, bool))
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_ids shape "
                         f"{prompt_ids.shape}")
    config = model.config
    eos = tuple(int(t) for t in (config.eos_token_id if eos_token_ids is None else eos_token_ids))
    pad = config.pad_token_id if pad_token_id is None else int(pad_token_id)
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, prompt_ids, prompt_mask, rng,
                         max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                         top_k=int(top_k), top_p=float(top_p), eos_token_ids=eos,
                         pad_token_id=pad)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> left-padded `[batch, longest]` int32 ids and bool mask."""
    if not rows or not all(len(row) for row in rows):
        raise ValueError("every prompt must have at least one token")
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    return ids, mask


def generate_text(model: GlmForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str], *,
                  template: Template | None = None, max_new_tokens: int = 64,
                  **sampling) -> list[str]:
    """Chat-formats `prompts` with `template` (default: the tokenizer's own chat template when
    its tokenizer_config.json has one, else glm_jax's GLM-4 format), generates, and decodes
    each response up to its EOS.

    Stops on the model config's EOS ids and the tokenizer's (GLM-4 also ends a turn on
    `<|user|>` / `<|observation|>`); `sampling` goes to `generate`.
    """
    template = template_for("auto", tokenizer) if template is None else template
    rows = [encode_chat(tokenizer, template, prompt) for prompt in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    eos = tuple(dict.fromkeys([*model.config.eos_token_id, *tokenizer.eos_token_ids]))
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                   pad_token_id=tokenizer.pad_token_id, **sampling)
    return decode_responses(np.asarray(out.tokens), np.asarray(out.response_mask), tokenizer,
                            template, eos)


def decode_responses(tokens: np.ndarray, response_mask: np.ndarray, tokenizer: Tokenizer,
                     template: Template, eos_token_ids: Sequence[int]) -> list[str]:
    """Each response `[N, R]` (its tokens where `response_mask`) decoded without the
    `eos_token_ids` and the template's lead text: a record's response text."""
    eos = np.asarray(tuple(eos_token_ids))
    return [response_text(template, tokenizer.decode(row[keep & ~np.isin(row, eos)].tolist()))
            for row, keep in zip(tokens, response_mask, strict=True)]
