"""The three heads on the GLM backbone: language model, scalar reward, per-token value.

The reward model and the critic are the same backbone as the policy with a one-output linear
head (paper 3.3: both are initialised from the SFT model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.losses import chunked_token_logprobs
from glm_jax.models.glm import GlmConfig, GlmModel, KVCache, _param, reads_decode_kernels
from glm_jax.sharding import constrain


class GlmForCausalLM(nnx.Module):
    """Backbone + untied LM head. `model(input_ids, attention_mask)` -> logits."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = GlmModel(config, rngs=rngs)
        self.lm_head = _param(rngs, nnx.initializers.normal(config.initializer_range),
                              (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

    def logits(self, hidden: jax.Array, decode_kernel: jax.Array | None = None) -> jax.Array:
        """hidden `[..., embed]` -> float32 logits `[..., vocab]`; with `decode_kernel`
        (`decode_lm_head`) read from that copy of the LM head."""
        if decode_kernel is not None:
            return jnp.einsum("...e,ev->...v", hidden, decode_kernel,
                              preferred_element_type=jnp.float32)
        kernel = self.lm_head[...].astype(self.config.compute_dtype)
        return jnp.einsum("...e,ve->...v", hidden, kernel, preferred_element_type=jnp.float32)

    def decode_lm_head(self) -> jax.Array | None:
        """The LM head as a decode loop reads it, `[embed, vocab]`, made once before the loop
        where the layers' `DecodeKernels` are (`reads_decode_kernels`); else None."""
        if not reads_decode_kernels(self.config):
            return None
        return self.lm_head[...].astype(self.config.compute_dtype).T

    def token_logprobs(self, hidden: jax.Array, tokens: jax.Array, *, with_entropy: bool = False
                       ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """float32 log pi(tokens) `[batch, length]` (and the per-token entropy) from hidden
        states `[batch, length, embed]` aligned with `tokens` (the caller shifts), computed
        `config.vocab_chunk` positions at a time: what training programs use instead of
        `logits`, whose `[batch, length, vocab]` float32 array would not fit at real sizes."""
        kernel = self.lm_head[...].astype(self.config.compute_dtype)
        return chunked_token_logprobs(hidden, kernel, tokens, chunk_size=self.config.vocab_chunk,
                                      with_entropy=with_entropy)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None, segment_ids: jax.Array | None = None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """input_ids, attention_mask: `[batch, length]`.

        segment_ids: optional `[batch, length]` int for packed rows (0 = padding, 1..k = the
        k-th sequence of the row; not with a cache): each sequence is computed as if alone.
        Returns float32 logits `[batch, length, vocab]`, or `(logits, cache)` when a cache is
        given.
        """
        hidden, new_cache = self.model(input_ids, attention_mask, cache, segment_ids)
        logits = constrain(self.logits(hidden), ("batch", "length", "vocab"))
        return logits if cache is None else (logits, new_cache)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row, for left or right padding: `[batch]`."""
    slots = jnp.arange(attention_mask.shape[-1])
    return jnp.max(jnp.where(attention_mask.astype(bool), slots, -1), axis=-1)


class _ScalarHead(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = GlmModel(config, rngs=rngs)
        self.head_kernel = _param(rngs, nnx.initializers.normal(config.initializer_range),
                                  (config.hidden_size,), ("embed",), config)
        self.head_bias = _param(rngs, nnx.initializers.zeros, (), (), config)

    def token_scores(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        hidden, _ = self.model(input_ids, attention_mask)
        kernel = self.head_kernel[...].astype(self.config.compute_dtype)
        scores = jnp.einsum("bte,e->bt", hidden, kernel, preferred_element_type=jnp.float32)
        return scores + self.head_bias[...].astype(jnp.float32)


class GlmRewardModel(_ScalarHead):
    """Scalar reward read at the last real token: `[batch, length]` -> `[batch]` float32."""

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        scores = self.token_scores(input_ids, attention_mask)
        index = last_token_index(attention_mask)
        return jnp.take_along_axis(scores, index[:, None], axis=1)[:, 0]


class GlmValueModel(_ScalarHead):
    """Critic: a value per token, `[batch, length]` -> `[batch, length]` float32."""

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.token_scores(input_ids, attention_mask)
