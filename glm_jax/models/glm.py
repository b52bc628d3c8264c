"""The GLM transformer (ChatGLM2/3, GLM-4, GLM-4-0414) in Flax NNX, with a static KV cache.

Architecture: pre-RMSNorm decoder; grouped-query attention with bias on q/k/v only; rotary
embedding on the first `partial_rotary_factor` of each head's dims, rotating interleaved pairs;
SwiGLU MLP; optional post-attention / post-MLP norms (GLM-4-0414, model_type "glm4").
Numerics match transformers' `GlmModel` / `Glm4Model`.

Position ids are derived from the attention mask (count of real tokens before a token), so a
left-padded row gives the same result as the same row unpadded, with or without the cache.
Optional segment ids pack several sequences into one row (SFT packing): each token then sees
only its own sequence, whose positions restart at 0, as if it ran alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from glm_jax.models.attention import IMPLEMENTATIONS, attention, decode_attention
from glm_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The projections a low-rank adapter can be put on (`GlmConfig.lora_targets`): attention's q,
# k, v and o, the MLP's gate, up and down. gate and up share one A factor, as they do in
# transformers' fused `gate_up_proj` (and so in PEFT's adapters for it).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Rematerialisation of the layer body in the backward pass (`GlmConfig.remat`): "none" keeps
# every activation; "full" keeps only each layer's input and recomputes the rest; "save_dots"
# keeps the matmul outputs (no batch dims: the projections and MLP, not attention's scores)
# and recomputes the cheap elementwise work in between.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class GlmConfig:
    """Model hyper-parameters; field names follow transformers' GlmConfig / Glm4Config."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True
    # GLM-4-0414 adds a norm after attention and after the MLP, inside the residual branch.
    use_post_norms: bool = False
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1,)
    dtype: str = "float32"  # compute dtype; softmax, norms and log-probs always run in float32
    param_dtype: str = "float32"
    # How the program runs, not what the model is (never written to a Hugging Face config):
    # scan_layers runs the stacked layers under `lax.scan` (compile time independent of depth)
    # rather than unrolled; remat is the rematerialisation policy of the layer body
    # (REMAT_POLICIES).
    scan_layers: bool = True
    remat: str = "none"
    # The attention kernel (glm_jax.models.attention.attention): "auto", "dense",
    # "blockwise", "cudnn" or "xla".
    attention: str = "auto"
    # Positions per chunk when training programs compute log-probs from hidden states: the
    # float32 logits exist for [batch, vocab_chunk, vocab] at a time, never the whole sequence.
    vocab_chunk: int = 512
    # Low-rank adapters (LoRA): rank 0 is none. With a rank, each projection of `lora_targets`
    # gains `W x + (lora_alpha / lora_rank) B A x` with A `[rank, in]` and B `[out, rank]` as
    # `LoRAParam`s (B starts at zero: the model starts as the base).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    # Dropout on the adapters' input in training steps (`lora_dropout_key`), as PEFT's.
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            raise ValueError(f"dtype / param_dtype must be one of {sorted(DTYPES)}, got "
                             f"dtype={self.dtype!r}, param_dtype={self.param_dtype!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads = {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads = {self.num_key_value_heads}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention = {self.attention!r}; choose one of "
                             f"{', '.join(IMPLEMENTATIONS)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat = {self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor = {self.partial_rotary_factor} with "
                             f"head_dim = {self.head_dim} gives an invalid rotary dim "
                             f"{self.rotary_dim}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout = {self.lora_dropout}: must be in [0, 1)")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if self.lora_rank < 0 or unknown or (self.lora_rank > 0) != bool(self.lora_targets):
            raise ValueError(f"lora_rank = {self.lora_rank}, lora_targets = "
                             f"{list(self.lora_targets)}: the rank is >= 1 with targets among "
                             f"{', '.join(LORA_TARGETS)} (or 0 with none)"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))

    @property
    def model_type(self) -> str:
        return "glm4" if self.use_post_norms else "glm"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def without_lora(self) -> GlmConfig:
        """The base model's config: the same model with no adapters."""
        return self.replace(lora_rank=0, lora_targets=(), lora_dropout=0.0)

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def replace(self, **changes: Any) -> GlmConfig:
        return dataclasses.replace(self, **changes)


# A layer's cached keys and values; the slots' axis of each (see KVCache).
KEY_AXES = ("batch", "kv_heads", "head_dim", "cache_length")
VALUE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")
SLOT_AXIS = {"keys": KEY_AXES.index("cache_length"), "values": VALUE_AXES.index("cache_length")}


@struct.dataclass
class KVCache:
    """Static-size key/value cache.

    keys: per layer `[batch, num_kv_heads, head_dim, max_length]`; values: per layer
    `[batch, num_kv_heads, max_length, head_dim]`. With scanned layers each is one array with
    a leading `layers` axis, stacked like the parameters; unrolled (`scan_layers=False`) a
    tuple of per-layer arrays, each updated in place (XLA:CPU copies a layer's slice of a
    stacked cache at every decode step). Each is stored in the layout in which decode
    attention's two batched dots read it (`decode_attention`): the kv heads ahead of the
    length (XLA would otherwise copy the whole cache at every step), and the contracted axis
    of each dot ahead of its output axis, keys' head_dim before their slots (a dot whose
    right operand is `[slots, head_dim]` packs a transposed copy of it at every call: the
    score dot took 2-3x as long at batch 16).
    mask: `[batch, max_length]` bool, which slots hold a real token.
    index: int32 scalar, the next slot to write.
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: GlmConfig, batch_size: int, max_length: int) -> KVCache:
        b, kvh, d = batch_size, config.num_key_value_heads, config.head_dim

        def zeros(shape: tuple[int, ...], axes: tuple[str, ...]
                  ) -> jax.Array | tuple[jax.Array, ...]:
            if config.scan_layers:
                stacked = (config.num_hidden_layers, *shape)
                return constrain(jnp.zeros(stacked, config.compute_dtype), ("layers", *axes))
            return tuple(constrain(jnp.zeros(shape, config.compute_dtype), axes)
                         for _ in range(config.num_hidden_layers))

        return cls(keys=zeros((b, kvh, d, max_length), KEY_AXES),
                   values=zeros((b, kvh, max_length, d), VALUE_AXES),
                   mask=jnp.zeros((batch_size, max_length), bool),
                   index=jnp.zeros((), jnp.int32))


def _param(rngs: nnx.Rngs, init: Any, shape: Sequence[int], axes: Sequence[str | None],
           config: GlmConfig) -> nnx.Param:
    value = init(rngs.params(), tuple(shape), DTYPES[config.param_dtype])
    return nnx.Param(value, logical_axes=tuple(axes))


class LoRAParam(nnx.Param):
    """A factor of a low-rank adapter: what LoRA training updates, the base `nnx.Param`s
    staying frozen. `nnx.split(model, LoRAParam, ...)` separates them."""


def _lora_pair(rngs: nnx.Rngs, config: GlmConfig, a_shape: Sequence[int],
               a_axes: Sequence[str | None], b_shape: Sequence[int],
               b_axes: Sequence[str | None]) -> tuple[LoRAParam, LoRAParam]:
    """(A, B): A `[rank, *in]` uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform with
    a = sqrt(5)), B `[*out, rank]` zero. Always float32: adapters are trained weights."""
    fan_in = math.prod(a_shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(rngs.params(), tuple(a_shape), jnp.float32, -bound, bound)
    return (LoRAParam(a, logical_axes=("lora_rank", *a_axes)),
            LoRAParam(jnp.zeros(tuple(b_shape), jnp.float32),
                      logical_axes=(*b_axes, "lora_rank")))


# LoRA dropout (PEFT's lora_dropout: on the adapters' input, in training only). A training
# step sets a key for the step (`lora_dropout_key`, traced), GlmModel derives one per layer,
# and each adapter folds in its own number; outside a training step there is none, and the
# adapters see their input whole.
_STEP_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_step_key", default=None)
_LAYER_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_layer_key", default=None)
_ADAPTER_NUMBER = {"q": 0, "k": 1, "v": 2, "o": 3, "gate_up": 4, "down": 5}


@contextlib.contextmanager
def _holding(variable: contextvars.ContextVar, key: jax.Array | None) -> Iterator[None]:
    token = variable.set(key)
    try:
        yield
    finally:
        variable.reset(token)


def lora_dropout_key(key: jax.Array | None) -> contextlib.AbstractContextManager[None]:
    """While tracing a training step's loss: the step's dropout key for every adapter of
    every model with `lora_dropout` > 0 (the step derives it from its step count, so a
    resumed run drops what the uninterrupted one did)."""
    return _holding(_STEP_KEY, key)


def _adapter_input(x: jax.Array, rate: float, adapter: str) -> jax.Array:
    """`x` with inverted dropout of `rate` when a layer key is set (a training step), else
    `x`: what the adapter named `adapter` reads."""
    key = _LAYER_KEY.get()
    if key is None or not rate:
        return x
    keep = 1.0 - rate
    kept = jax.random.bernoulli(jax.random.fold_in(key, _ADAPTER_NUMBER[adapter]), keep,
                                x.shape)
    return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _low_rank(x: jax.Array, a: nnx.Variable, b: nnx.Variable, x_dims: str, out_dims: str,
              config: GlmConfig, adapter: str) -> jax.Array:
    """`scale * B A dropout(x)` for x `[batch, length, *x_dims]` -> `[batch, length,
    *out_dims]`; the rank-sized product first, so it costs 2 x rank x (in + out) FLOPs per
    token."""
    dtype, scale = x.dtype, config.lora_scale
    x = _adapter_input(x, config.lora_dropout, adapter)
    low = jnp.einsum(f"bt{x_dims},r{x_dims}->btr", x, a[...].astype(dtype))
    return jnp.einsum(f"btr,{out_dims}r->bt{out_dims}", low * jnp.asarray(scale, dtype),
                      b[...].astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.weight = _param(rngs, nnx.initializers.ones, (config.hidden_size,), ("norm",), config)

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


@jax.named_scope("rotary")
def apply_rotary(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotary embedding on the first `rotary_dim` dims of each head, rotating interleaved pairs.

    x: `[batch, length, heads, head_dim]`; positions: `[batch, length]` int.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [b, t, 1, rot/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = x_rot.astype(jnp.float32).reshape(*x_rot.shape[:-1], rotary_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return jnp.concatenate([rotated.reshape(x_rot.shape).astype(x.dtype), x_pass], axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs):
        self.config = config
        e, h, k, d = (config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
        init = nnx.initializers.normal(config.initializer_range)
        # Kernels are output-major ([out..., in], PyTorch's Linear layout, as checkpoints
        # store them); unrolled decoding reads [in, out] copies (DecodeKernels).
        self.q_kernel = _param(rngs, init, (h, d, e), ("heads", "head_dim", "embed"), config)
        self.k_kernel = _param(rngs, init, (k, d, e), ("kv_heads", "head_dim", "embed"), config)
        self.v_kernel = _param(rngs, init, (k, d, e), ("kv_heads", "head_dim", "embed"), config)
        self.o_kernel = _param(rngs, init, (e, h, d), ("embed", "heads", "head_dim"), config)
        if config.attention_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, zeros, (h, d), ("heads", "head_dim"), config)
            self.k_bias = _param(rngs, zeros, (k, d), ("kv_heads", "head_dim"), config)
            self.v_bias = _param(rngs, zeros, (k, d), ("kv_heads", "head_dim"), config)
        r, targets = config.lora_rank, config.lora_targets
        for name, heads, axis in (("q", h, "heads"), ("k", k, "kv_heads"), ("v", k, "kv_heads")):
            if name in targets:
                a, b = _lora_pair(lora_rngs, config, (r, e), ("embed",), (heads, d, r),
                                  (axis, "head_dim"))
                setattr(self, f"{name}_lora_a", a)
                setattr(self, f"{name}_lora_b", b)
        if "o" in targets:
            self.o_lora_a, self.o_lora_b = _lora_pair(
                lora_rngs, config, (r, h, d), ("heads", "head_dim"), (e, r), ("embed",))

    @jax.named_scope("projections")
    def _project_qkv(self, x: jax.Array, qkv_kernel: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: `[batch, length, embed]` -> q `[batch, length, heads, head_dim]`, k and v
        `[batch, length, kv_heads, head_dim]`; with `qkv_kernel` (`DecodeKernels.qkv`) one
        dot instead of three."""
        dtype = self.config.compute_dtype
        kernels = [getattr(self, f"{name}_kernel") for name in "qkv"]
        if qkv_kernel is not None:
            q_size, kv_size = (math.prod(kernel.shape[:2]) for kernel in kernels[:2])
            ys = jnp.split(jnp.einsum("bte,en->btn", x, qkv_kernel),
                           [q_size, q_size + kv_size], axis=-1)
        else:
            # 2-D dots on the kernels' [out, in] layout: with two output dims XLA
            # canonicalises the dot by copying the kernel to [in, out] at every call.
            ys = [jnp.einsum("bte,ne->btn", x, kernel[...].astype(dtype).reshape(
                -1, kernel.shape[-1])) for kernel in kernels]
        out = []
        for name, kernel, y in zip("qkv", kernels, ys, strict=True):
            y = y.reshape(*y.shape[:2], *kernel.shape[:2])
            if hasattr(self, f"{name}_lora_a"):
                y = y + _low_rank(x, getattr(self, f"{name}_lora_a"),
                                  getattr(self, f"{name}_lora_b"), "e", "hd", self.config, name)
            if self.config.attention_bias:
                y = y + getattr(self, f"{name}_bias")[...].astype(dtype)
            out.append(y)
        return tuple(out)

    def __call__(self, x: jax.Array, positions: jax.Array, kv_mask: jax.Array,
                 cache_kv: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | None,
                 segment_ids: jax.Array | None = None, kernels: DecodeKernels | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x: `[batch, length, embed]` -> (`[batch, length, embed]`, this layer's cache with
        these tokens written (or, uncached, these tokens' keys and values)).

        cache_kv: this layer's cached keys `[batch, kv_heads, head_dim, max_length]` and values
        `[batch, kv_heads, max_length, head_dim]` (KVCache), or None; the new tokens are
        written at slots `cache_index...` and attended there.
        kv_mask: `[batch, kv_length]` real-token mask over the keys (the cache slots when
        cached); causality is by slot: the query written at slot i sees slots <= i.
        segment_ids: optional `[batch, length]` int (uncached only); a query sees only keys of
        its own segment, making the causal mask block-diagonal.
        kernels: this layer's `DecodeKernels`, for decoding.
        """
        cfg = self.config
        q, k, v = self._project_qkv(x, None if kernels is None else kernels.qkv)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rotary(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rotary(k, positions, cfg.rotary_dim, cfg.rope_theta)
        length = x.shape[1]
        if cache_kv is None:
            layer_kv = (k, v)
            with jax.named_scope("attention"):
                out = attention(q, k, v, q_slots=jnp.arange(length), kv_mask=kv_mask,
                                segment_ids=segment_ids, implementation=cfg.attention)
        else:
            with jax.named_scope("cache_write"):
                cached_k, cached_v = cache_kv
                layer_kv = (
                    jax.lax.dynamic_update_slice(cached_k, k.transpose(0, 2, 3, 1).astype(
                        cached_k.dtype), (0, 0, 0, cache_index)),
                    jax.lax.dynamic_update_slice(cached_v, v.swapaxes(1, 2).astype(
                        cached_v.dtype), (0, 0, cache_index, 0)))
            with jax.named_scope("attention"):
                if length == 1 and cfg.attention == "auto":
                    out = decode_attention(q, *layer_kv, q_slot=cache_index, kv_mask=kv_mask)
                else:  # prefill (or a chosen kernel): it takes [batch, kv_len, kv_heads, head_dim]
                    k, v = layer_kv[0].transpose(0, 3, 1, 2), layer_kv[1].swapaxes(1, 2)
                    out = attention(q, k, v, q_slots=cache_index + jnp.arange(length),
                                    kv_mask=kv_mask, implementation=cfg.attention)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        with jax.named_scope("projections"):
            out_flat = out.reshape(*out.shape[:2], -1)
            if kernels is not None:
                projected = jnp.einsum("btn,ne->bte", out_flat, kernels.o)
            else:
                kernel = self.o_kernel[...].astype(cfg.compute_dtype)
                projected = jnp.einsum("btn,en->bte", out_flat,
                                       kernel.reshape(kernel.shape[0], -1))
        if hasattr(self, "o_lora_a"):
            projected = projected + _low_rank(out, self.o_lora_a, self.o_lora_b, "hd", "e",
                                              cfg, "o")
        return projected, layer_kv


class DecodeKernels(NamedTuple):
    """One layer's weight kernels as a decode loop reads them: `[in, out]`, q/k/v and
    gate/up concatenated. qkv: `[embed, (heads + 2 kv_heads) * head_dim]`; o: `[heads *
    head_dim, embed]`; gate_up: `[embed, 2 * mlp]`; down: `[mlp, embed]`."""

    qkv: jax.Array
    o: jax.Array
    gate_up: jax.Array
    down: jax.Array


def reads_decode_kernels(config: GlmConfig) -> bool:
    """Whether decoding reads `DecodeKernels`, made once before the decode loop: with
    unrolled layers and no tensor-parallel mesh axis.

    At decoding's batch a dot costs about its kernel's read plus a fixed cost per call, so
    one dot of [q; k; v] beats three, and XLA:CPU's dot reads an `[in, out]` kernel faster
    than the stored `[out, in]` one (a hidden-512 model's decode matmuls, batch 8, weights
    streaming from memory: 1.36x). Unrolled, the kernels are made into the copy that slicing
    each layer from the stacked weights makes anyway (`layer_states`); a scanned loop would
    make them at every step. A tensor-parallel axis shards the kernels by head, and a
    concatenation of head-sharded kernels would be gathered.
    """
    if config.scan_layers:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.shape.get("tensor", 1) == 1


class MLP(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs):
        self.config = config
        e, m = config.hidden_size, config.intermediate_size
        init = nnx.initializers.normal(config.initializer_range)
        self.gate_kernel = _param(rngs, init, (m, e), ("mlp", "embed"), config)
        self.up_kernel = _param(rngs, init, (m, e), ("mlp", "embed"), config)
        self.down_kernel = _param(rngs, init, (e, m), ("embed", "mlp"), config)
        r, targets = config.lora_rank, config.lora_targets
        if "gate" in targets or "up" in targets:  # one A for both, as in `gate_up_proj`
            self.gate_up_lora_a, _ = _lora_pair(lora_rngs, config, (r, e), ("embed",),
                                                (m, r), ("mlp",))
            for name in ("gate", "up"):
                if name in targets:
                    setattr(self, f"{name}_lora_b", LoRAParam(
                        jnp.zeros((m, r), jnp.float32), logical_axes=("mlp", "lora_rank")))
        if "down" in targets:
            self.down_lora_a, self.down_lora_b = _lora_pair(lora_rngs, config, (r, m), ("mlp",),
                                                            (e, r), ("embed",))

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array, kernels: DecodeKernels | None = None) -> jax.Array:
        """x: `[batch, length, embed]` -> same; with `kernels` (decoding), gate and up from
        one dot."""
        cfg = self.config
        dtype = cfg.compute_dtype
        if kernels is not None:
            gate, up = jnp.split(jnp.einsum("bte,em->btm", x, kernels.gate_up), 2, axis=-1)
        else:
            gate = jnp.einsum("bte,me->btm", x, self.gate_kernel[...].astype(dtype))
            up = jnp.einsum("bte,me->btm", x, self.up_kernel[...].astype(dtype))
        if hasattr(self, "gate_up_lora_a"):
            low = jnp.einsum("bte,re->btr", _adapter_input(x, cfg.lora_dropout, "gate_up"),
                             self.gate_up_lora_a[...].astype(dtype))
            low = low * jnp.asarray(cfg.lora_scale, dtype)
            if hasattr(self, "gate_lora_b"):
                gate = gate + jnp.einsum("btr,mr->btm", low, self.gate_lora_b[...].astype(dtype))
            if hasattr(self, "up_lora_b"):
                up = up + jnp.einsum("btr,mr->btm", low, self.up_lora_b[...].astype(dtype))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        if kernels is not None:
            out = jnp.einsum("btm,me->bte", hidden, kernels.down)
        else:
            out = jnp.einsum("btm,em->bte", hidden, self.down_kernel[...].astype(dtype))
        if hasattr(self, "down_lora_a"):
            out = out + _low_rank(hidden, self.down_lora_a, self.down_lora_b, "m", "e", cfg,
                                  "down")
        return out


class DecoderLayer(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config, rngs=rngs)
        self.self_attn = Attention(config, rngs=rngs, lora_rngs=lora_rngs)
        self.post_attention_layernorm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs, lora_rngs=lora_rngs)
        self.use_post_norms = config.use_post_norms
        if config.use_post_norms:
            self.post_self_attn_layernorm = RMSNorm(config, rngs=rngs)
            self.post_mlp_layernorm = RMSNorm(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, kv_mask: jax.Array,
                 cache_kv: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | None,
                 segment_ids: jax.Array | None = None, kernels: DecodeKernels | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One pre-norm block: `[batch, length, embed]` -> (same, this layer's keys and values;
        see `Attention`)."""
        attn, layer_kv = self.self_attn(self.input_layernorm(x), positions, kv_mask, cache_kv,
                                        cache_index, segment_ids, kernels)
        if self.use_post_norms:
            attn = self.post_self_attn_layernorm(attn)
        x = x + attn
        mlp = self.mlp(self.post_attention_layernorm(x), kernels)
        if self.use_post_norms:
            mlp = self.post_mlp_layernorm(mlp)
        x = constrain(x + mlp, ("batch", "length", "act_embed"))
        return x, layer_kv


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position of each token: real tokens before it (plus `offset`); padding gets 0.

    attention_mask: `[batch, length]`; offset: scalar or `[batch, 1]`.
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1 + offset, 0) * (mask > 0)


def positions_from_segments(attention_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment: real tokens of the same segment before it;
    padding gets 0. `positions_from_mask` of each segment on its own, for packed rows.

    attention_mask, segment_ids: `[batch, length]`; each segment's tokens are contiguous.
    """
    mask = attention_mask.astype(jnp.int32)
    seen = jnp.cumsum(mask, axis=-1)  # real tokens up to and including t
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    # Real tokens before the start of t's segment: `seen` is non-decreasing, so a running max
    # carries the value taken at the latest segment start.
    before = jax.lax.cummax(jnp.where(starts, seen - mask, 0), axis=1)
    return jnp.maximum(seen - 1 - before, 0) * (mask > 0)


class GlmModel(nnx.Module):
    """The decoder stack up to and including the final norm (shared by every head)."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(rngs, nnx.initializers.normal(config.initializer_range),
                                   (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                   config)
        # The adapters draw from a stream of their own, so a seed gives the same base weights
        # with or without them.
        lora_rngs = nnx.Rngs(jax.random.fold_in(rngs.params.key[...], 0x10A))
        # One DecoderLayer whose parameters carry a leading `layers` axis. Each layer is
        # initialised on its own, in order, so a seed gives the same weights as before stacking.
        self.layers = stack_layers([DecoderLayer(config, rngs=rngs, lora_rngs=lora_rngs)
                                    for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config, rngs=rngs)

    def layer_states(self) -> list[Any]:
        """Each layer's parameters (nnx States sliced from the stacked ones), for the unrolled
        form (`scan_layers=False`). A decode loop takes them once, before the loop
        (`decode_layers`), and passes them as `layers`: sliced inside the loop, XLA:CPU copies
        every layer's weights at every step (generation at hidden 512: 265 tokens/s against
        332 taken once)."""
        stacked = nnx.state(self.layers)
        return [jax.tree.map(lambda p, i=i: p[i], stacked)
                for i in range(self.config.num_hidden_layers)]

    def decode_layers(self) -> list[tuple[Any, DecodeKernels | None]]:
        """What a decode loop takes before the loop, with unrolled layers: each layer's
        parameters (`layer_states`) and, where `reads_decode_kernels`, its `DecodeKernels`."""
        states = self.layer_states()
        if not reads_decode_kernels(self.config):
            return [(state, None) for state in states]
        dtype = self.config.compute_dtype

        def in_out(*kernels: nnx.Variable) -> jax.Array:  # [out..., in] kernels -> [in, out]
            flat = [kernel[...].astype(dtype) for kernel in kernels]
            return jnp.concatenate([k.reshape(-1, k.shape[-1]) for k in flat]).T

        return [(state, DecodeKernels(
            qkv=in_out(*(state["self_attn"][f"{name}_kernel"] for name in "qkv")),
            o=state["self_attn"]["o_kernel"][...].astype(dtype).reshape(
                self.config.hidden_size, -1).T,
            gate_up=in_out(state["mlp"]["gate_kernel"], state["mlp"]["up_kernel"]),
            down=in_out(state["mlp"]["down_kernel"]))) for state in states]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None, segment_ids: jax.Array | None = None,
                 layers: Sequence[Any] | None = None) -> tuple[jax.Array, KVCache | None]:
        """input_ids: `[batch, length]` -> (hidden `[batch, length, embed]`, updated cache).

        With a cache, the tokens are written at slot `cache.index` and attend to every real
        token already in the cache.
        segment_ids: optional `[batch, length]` int, packed rows (no cache): 0 is padding,
        1..k the k-th sequence of the row, each contiguous. A token attends only to earlier or
        same positions of its own segment and positions restart at 0 in each segment.
        layers: with `scan_layers=False`, `decode_layers()` taken earlier (see there).
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        if segment_ids is not None:
            attention_mask = attention_mask & (segment_ids > 0)  # segment 0 is padding
            positions = positions_from_segments(attention_mask, segment_ids)
            kv_mask = attention_mask
        elif cache is None:
            positions = positions_from_mask(attention_mask)
            kv_mask = attention_mask
        else:
            seen = jnp.sum(cache.mask, axis=-1, keepdims=True, dtype=jnp.int32)
            positions = positions_from_mask(attention_mask, seen)
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))

        dtype = self.config.compute_dtype
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        index = None if cache is None else cache.index
        graphdef, stacked = nnx.split(self.layers)

        def layer(x: jax.Array, params: Any, layer_kv: Any, key: Any = None,
                  kernels: DecodeKernels | None = None) -> tuple[jax.Array, Any]:
            with _holding(_LAYER_KEY, key):
                return nnx.merge(graphdef, params)(x, positions, kv_mask, layer_kv, index,
                                                   segment_ids, kernels)

        policy = REMAT_POLICIES[self.config.remat]
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.config.scan_layers)
        if not self.config.scan_layers and layers is None:
            # A single call reads the stored kernels: DecodeKernels pay only when a loop reuses
            # them (`decode_layers`, taken by the caller before its loop).
            layers = [(state, None) for state in self.layer_states()]
        if cache is None:
            # In a training step with LoRA dropout: one dropout key per layer.
            step_key = _STEP_KEY.get() if self.config.lora_dropout else None
            keys = (None if step_key is None
                    else jax.random.split(step_key, self.config.num_hidden_layers))
            if self.config.scan_layers:
                x, _ = jax.lax.scan(lambda x, xs: (layer(x, xs[0], None, xs[1])[0], None), x,
                                    (stacked, keys))
            else:
                for i, (params, kernels) in enumerate(layers):
                    x, _ = layer(x, params, None, None if keys is None else keys[i], kernels)
            return self.norm(x), None

        if not self.config.scan_layers:  # per-layer caches, each updated in place
            keys, values = [], []
            for i, (params, kernels) in enumerate(layers):
                x, (k, v) = layer(x, params, (cache.keys[i], cache.values[i]), None, kernels)
                keys.append(k)
                values.append(v)
            keys, values = tuple(keys), tuple(values)
        else:
            # The stacked cache is carried whole; a layer attends over its slice with the new
            # tokens written, and only those tokens go back into the carry.
            length = input_ids.shape[1]

            def cached_layer(carry, xs):
                x, keys, values = carry
                params, i = xs
                x, (k, v) = layer(x, params, (keys[i], values[i]))

                def write(stacked_kv: jax.Array, layer_kv: jax.Array, slots: int) -> jax.Array:
                    new = jax.lax.dynamic_slice_in_dim(layer_kv, cache.index, length, slots)
                    start = [i, 0, 0, 0, 0]
                    start[1 + slots] = cache.index
                    return jax.lax.dynamic_update_slice(stacked_kv, new[None], start)

                return (x, write(keys, k, SLOT_AXIS["keys"]),
                        write(values, v, SLOT_AXIS["values"])), None

            layer_ids = jnp.arange(self.config.num_hidden_layers)
            (x, keys, values), _ = jax.lax.scan(cached_layer, (x, cache.keys, cache.values),
                                                (stacked, layer_ids))
        cache = KVCache(keys=keys, values=values, mask=kv_mask,
                        index=cache.index + input_ids.shape[1])
        return self.norm(x), cache


def stack_layers(layers: Sequence[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer holding the parameters of `layers`, each stacked on a new leading
    `layers` logical axis (replicated: every device holds every layer's shard)."""
    graphdef, first = nnx.split(layers[0])
    states = [first, *(nnx.state(layer) for layer in layers[1:])]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("logical_axes", (None,) * variables[0].ndim)
        return variables[0].replace(jnp.stack([v[...] for v in variables]),
                                    logical_axes=("layers", *axes))

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)
