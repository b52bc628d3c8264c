"""Generation against full forward passes and against transformers' generate."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import glm_jax
from glm_jax.generation import (
    SAMPLING_BLOCK,
    _generate_jit,
    _inverse_cdf,
    categorical_token,
    filter_logits,
    greedy_token,
    sample,
)
from glm_jax.models import KVCache

NEVER = 10_000  # an EOS id outside the vocab: generate every step


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    reference, path = hf_checkpoint("glm")
    return reference, glm_jax.from_pretrained(path)


def left_padded(rows, length):
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    return ids, mask


def prompts(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(2, 128, n) for n in (7, 4, 6)]


def full_forward_logprobs(model, ids, mask, out):
    """log_softmax of a full (uncached) forward pass, at the positions that produced each token."""
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([mask, np.ones_like(np.asarray(out.tokens), bool)], axis=1)
    logits = np.asarray(model(seq, seq_mask))[:, ids.shape[1] - 1:-1]
    return logits, np.asarray(jax.nn.log_softmax(logits))


def test_greedy_equals_argmax_of_full_forward_at_every_step(setup):
    _, model = setup
    ids, mask = left_padded(prompts(), 8)
    out = glm_jax.generate(model, ids, mask, max_new_tokens=10, temperature=0.0,
                           eos_token_ids=[NEVER])
    logits, _ = full_forward_logprobs(model, ids, mask, out)
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    assert np.asarray(out.response_mask).all() and not np.asarray(out.ended_with_eos).any()


@pytest.mark.parametrize("settings", [dict(temperature=0.8), dict(temperature=1.3, top_k=5),
                                      dict(temperature=1.0, top_p=0.7)])
def test_logprobs_equal_full_forward_log_softmax(setup, settings):
    _, model = setup
    ids, mask = left_padded(prompts(1), 8)
    out = glm_jax.generate(model, ids, mask, max_new_tokens=12, eos_token_ids=[NEVER], rng=3,
                           **settings)
    _, logp = full_forward_logprobs(model, ids, mask, out)
    tokens = np.asarray(out.tokens)
    expected = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    # Untempered and unfiltered: what the trainer's forward pass will compute.
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-6, rtol=0)


def test_cached_logits_equal_uncached(setup):
    _, model = setup
    ids, mask = left_padded(prompts(2), 8)
    new = np.random.RandomState(4).randint(2, 128, (3, 5)).astype(np.int32)
    seq = np.concatenate([ids, new], axis=1)
    seq_mask = np.concatenate([mask, np.ones_like(new, bool)], axis=1)
    full = np.asarray(model(seq, seq_mask))

    cache = KVCache.init(model.config, 3, seq.shape[1])
    logits, cache = model(ids, mask, cache=cache)  # prefill
    steps = [np.asarray(logits)]
    for t in range(new.shape[1]):  # then one token at a time
        logits, cache = model(new[:, t:t + 1], None, cache=cache)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(cached[mask.nonzero()], full[:, :8][mask.nonzero()], atol=1e-4)
    np.testing.assert_allclose(cached[:, 8:], full[:, 8:], atol=1e-4)


def test_greedy_equals_transformers_generate(setup):
    reference, model = setup
    rows = prompts(5)
    ids, mask = left_padded(rows, 8)
    out = glm_jax.generate(model, ids, mask, max_new_tokens=16, temperature=0.0,
                           eos_token_ids=[NEVER])
    for i, row in enumerate(rows):
        expected = reference.generate(torch.tensor(row[None]), max_new_tokens=16,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), expected[0, len(row):].numpy())


def test_eos_ends_the_response_and_padding_follows(setup):
    _, model = setup
    ids, mask = left_padded(prompts(6), 8)
    free = np.asarray(glm_jax.generate(model, ids, mask, max_new_tokens=12, temperature=0.0,
                                       eos_token_ids=[NEVER]).tokens)
    eos = int(free[0, 3])  # row 0 produces this token at step 3 (first time, or earlier)
    out = glm_jax.generate(model, ids, mask, max_new_tokens=12, temperature=0.0,
                           eos_token_ids=[eos], pad_token_id=0)
    tokens, response = np.asarray(out.tokens), np.asarray(out.response_mask)
    for i in range(3):
        hits = np.nonzero(free[i] == eos)[0]
        end = hits[0] + 1 if len(hits) else 12
        np.testing.assert_array_equal(tokens[i, :end], free[i, :end])
        assert response[i].sum() == end and response[i, :end].all()  # EOS itself included
        assert (tokens[i, end:] == 0).all()
        assert bool(out.ended_with_eos[i]) == bool(len(hits))
        assert (np.asarray(out.logprobs)[i, end:] == 0).all()
    assert out.ended_with_eos[0]


def test_early_exit_when_every_row_is_done(setup):
    _, model = setup
    ids, mask = left_padded(prompts(7), 8)
    first = np.asarray(glm_jax.generate(model, ids, mask, max_new_tokens=1,
                                        temperature=0.0).tokens)[:, 0]
    out = glm_jax.generate(model, ids, mask, max_new_tokens=50, temperature=0.0,
                           eos_token_ids=tuple(int(t) for t in set(first)))
    assert np.asarray(out.response_mask).sum() == 3  # every row stops after its first token
    assert np.asarray(out.ended_with_eos).all()


def np_top_k_top_p_set(logits, top_k, top_p):
    order = np.argsort(-logits)
    keep = order[:top_k] if top_k else order
    probs = np.exp(logits[keep] - logits[keep].max())
    probs /= probs.sum()
    cum = np.cumsum(probs)
    n = int(np.searchsorted(cum, top_p) + 1) if top_p < 1 else len(keep)
    return set(keep[:n].tolist())


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (10, 0.5), (1, 1.0)])
def test_filter_logits_keeps_exactly_the_top_k_top_p_set(top_k, top_p):
    logits = np.random.RandomState(top_k).normal(size=(6, 40)).astype(np.float32) * 2
    filtered = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    for row, out in zip(logits, filtered, strict=True):
        assert set(np.nonzero(np.isfinite(out))[0].tolist()) == np_top_k_top_p_set(row, top_k,
                                                                                  top_p)


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.5)])
def test_sampling_never_leaves_the_top_k_top_p_set(setup, top_k, top_p):
    _, model = setup
    ids, mask = left_padded(prompts(8) * 4, 8)  # 12 rows
    out = glm_jax.generate(model, ids, mask, max_new_tokens=10, temperature=1.0, top_k=top_k,
                           top_p=top_p, eos_token_ids=[NEVER], rng=11)
    logits, _ = full_forward_logprobs(model, ids, mask, out)
    tokens = np.asarray(out.tokens)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            assert tokens[b, t] in np_top_k_top_p_set(logits[b, t], top_k, top_p)
    assert len(set(tokens[:, 0].tolist())) > 1  # it does sample: rows with equal prompts differ


def test_greedy_token_is_argmax_with_ties_and_nan():
    logits = np.random.RandomState(0).normal(size=(5, 700)).astype(np.float32)
    logits[1, [3, 400, 699]] = 9.0  # ties: the first index wins
    logits[2, [10, 20]] = np.nan  # NaN: the first NaN, as argmax
    logits[3, :] = -np.inf
    logits[4, 699] = np.inf
    np.testing.assert_array_equal(np.asarray(greedy_token(jnp.asarray(logits))),
                                  np.argmax(logits, axis=-1))


def test_categorical_token_draws_softmax_probabilities():
    """200k draws over a vocab of 3 blocks (the last one partial) with -inf entries: the
    frequency of every token is its softmax probability within 5 standard errors, and no
    -inf token is ever drawn."""
    vocab, draws = 2 * SAMPLING_BLOCK + 37, 200_000
    rng = np.random.RandomState(1)
    logits = rng.normal(size=vocab).astype(np.float32) * 2.5
    logits[rng.choice(vocab, 60, replace=False)] = -np.inf
    logits[SAMPLING_BLOCK:2 * SAMPLING_BLOCK] = -np.inf  # a whole block of mass 0
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    tokens = jax.jit(jax.vmap(lambda key: categorical_token(jnp.asarray(logits)[None], key)))(
        jax.random.split(jax.random.key(0), draws))
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab)
    assert counts[probs == 0].sum() == 0 and counts.sum() == draws
    standard_error = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(counts / draws - probs) <= 5 * standard_error + 1e-9)


def test_inverse_cdf_never_picks_a_zero_weight():
    weights = jnp.asarray([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    below_one = np.nextafter(np.float32(1), np.float32(0))
    for u, expected in ((0.0, [1, 0, 2]), (below_one, [3, 0, 3]), (0.5, [1, 0, 3])):
        np.testing.assert_array_equal(
            np.asarray(_inverse_cdf(weights, jnp.full((3,), u, jnp.float32))), expected)


def _compiled_generation(config, max_new_tokens: int) -> str:
    """The HLO text of a generation by a random model of `config`, compiled as users'
    programs are: with multi-threaded Eigen (the tests turn it off: tests/conftest.py), which
    decides how XLA:CPU lays out its dots."""
    from flax import nnx

    from glm_jax.models.heads import GlmForCausalLM

    graphdef, state = nnx.split(GlmForCausalLM(config, rngs=nnx.Rngs(0)))
    prompt = jnp.ones((2, 5), jnp.int32)

    def run(state, prompt):
        return sample(nnx.merge(graphdef, state), prompt, jnp.ones_like(prompt, bool),
                      jax.random.key(0), max_new_tokens=max_new_tokens, temperature=1.0,
                      eos_token_ids=(NEVER,), pad_token_id=0).tokens

    compiled = jax.jit(run).lower(state, prompt).compile({"xla_cpu_multi_thread_eigen": True})
    return compiled.as_text()


def test_decode_loop_copies_no_cache_and_no_kernel():
    """No projection's dot copies its kernel (XLA canonicalises a dot with two output dims
    by copying the kernel to [in, out] at every call; the decode loop's [in, out] copies are
    made once, by `decode_layers`) and the decode loop copies no layer's KV cache (decode
    attention reads it in the stored layout)."""
    from glm_jax.models.tiny import tiny_config

    config = tiny_config(scan_layers=False)
    hlo = _compiled_generation(config, max_new_tokens=30)
    e, d = config.hidden_size, config.head_dim
    transposed_kernels = {(e, config.num_attention_heads * d), (e, config.num_key_value_heads * d),
                          (config.num_attention_heads * d, e), (e, config.intermediate_size),
                          (config.intermediate_size, e)}
    cache_elements = 2 * config.num_key_value_heads * 35 * d
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%((?:transpose|copy)[\w.-]*) = \w+\[([\d,]*)\]", line)
        if not match:
            continue
        shape = tuple(int(n) for n in match.group(2).split(",") if n)
        assert shape not in transposed_kernels or "kernel" not in line, line
        if "/while/body" in line:
            assert np.prod(shape) < cache_elements, line


def _decode_loop_ops(hlo: str) -> list[str]:
    """The instructions of a compiled generation's decode loop: its `while` body (the entry
    computation's while with the largest body) and every computation called from it."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
        if header:
            name = "ENTRY" if header.group(1) else header.group(2)
            computations[name] = []
        elif name is not None and line.startswith("  "):
            computations[name].append(line)
    bodies = [re.search(r"body=%([\w.\-]+)", line).group(1)
              for line in computations["ENTRY"] if " while(" in line]
    pending, seen = [max(bodies, key=lambda body: len(computations[body]))], set()
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            for line in computations[name]:
                pending += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
    return [line for name in seen for line in computations[name]]


def _read_stored_kernels(monkeypatch) -> None:
    """Unrolled decoding reads the stored kernels, as without `DecodeKernels` (both modules
    that ask `reads_decode_kernels` are told no)."""
    from glm_jax.models import glm as glm_module
    from glm_jax.models import heads as heads_module

    for module in (glm_module, heads_module):
        monkeypatch.setattr(module, "reads_decode_kernels", lambda config: False)


@pytest.mark.parametrize("fused", [True, False])
def test_unrolled_decode_fuses_projections_before_the_loop(monkeypatch, fused):
    """Decoding with unrolled layers reads `DecodeKernels` (`reads_decode_kernels`): q/k/v as
    one dot and gate/up as another, on kernels concatenated and transposed once, outside the
    decode loop. The loop holds 4 weight dots per layer (7 with separate kernels) and makes
    no kernel-sized array."""
    from glm_jax.models.tiny import tiny_config

    if not fused:
        _read_stored_kernels(monkeypatch)
    config = tiny_config(scan_layers=False, num_hidden_layers=3)
    hlo = _compiled_generation(config, max_new_tokens=8)
    loop = _decode_loop_ops(hlo)
    weight_dots = [line for line in loop if " dot(" in line
                   and re.search(r'op_name="[^"]*/(projections|mlp)/', line)]
    assert len(weight_dots) == (4 if fused else 7) * config.num_hidden_layers
    e, d, m = config.hidden_size, config.head_dim, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    kernels = {f"f32[{a},{b}]" for a, b in ((e, qkv), (qkv, e), (e, 2 * m), (2 * m, e),
                                            (e, config.vocab_size))}
    made = []  # instructions that write a kernel-sized array
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+\[[\d,]*\])\S* (\S+)\(", line)
        if match and match.group(1) in kernels and match.group(2) not in (
                "parameter", "get-tuple-element", "bitcast", "tuple"):
            made.append(line)
    assert not [line for line in made if line in loop]
    assert len([line for line in made if " concatenate(" in line]) >= (
        2 * config.num_hidden_layers if fused else 0)


def test_fused_projections_sample_like_separate_ones(monkeypatch):
    """With attention biases and LoRA adapters on every projection, unrolled decoding's
    `DecodeKernels` (fused, `[in, out]`, and the LM head's copy) sample the same tokens as
    the stored kernels, with log-probs equal to a full forward pass's."""
    from flax import nnx

    from glm_jax.models.heads import GlmForCausalLM
    from glm_jax.models.lora import add_adapters
    from glm_jax.models.tiny import tiny_config

    model = GlmForCausalLM(tiny_config(scan_layers=False, attention_bias=True),
                           rngs=nnx.Rngs(0))
    model = add_adapters(model, lora_rank=4, lora_alpha=8.0,
                         lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    state = jax.tree.map_with_path(  # nonzero biases and adapters' B, so each one counts
        lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape)
        if str(path[-1]).endswith(("_bias", "_lora_b")) else x, state)
    ids, mask = left_padded(prompts(3), 8)

    def generate(fuse):
        if not fuse:
            _read_stored_kernels(monkeypatch)
        return jax.jit(lambda state: sample(
            nnx.merge(graphdef, state), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(5),
            max_new_tokens=10, temperature=1.0, eos_token_ids=(NEVER,), pad_token_id=0))(state)

    fused, separate = generate(True), generate(False)
    np.testing.assert_array_equal(np.asarray(fused.tokens), np.asarray(separate.tokens))
    np.testing.assert_allclose(np.asarray(fused.logprobs), np.asarray(separate.logprobs),
                               atol=1e-6, rtol=0)
    _, logp = full_forward_logprobs(nnx.merge(graphdef, state), ids, mask, fused)
    expected = np.take_along_axis(logp, np.asarray(fused.tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(fused.logprobs), expected, atol=1e-6, rtol=0)


def test_reads_decode_kernels_only_unrolled_and_without_tensor_parallelism():
    from glm_jax.models.glm import reads_decode_kernels
    from glm_jax.models.tiny import tiny_config

    unrolled = tiny_config(scan_layers=False)
    assert reads_decode_kernels(unrolled)
    assert not reads_decode_kernels(unrolled.replace(scan_layers=True))
    for shape, expected in (((2, 4, 1), True), ((2, 2, 2), False)):
        with jax.set_mesh(glm_jax.make_mesh(glm_jax.MeshConfig(*shape))):
            assert reads_decode_kernels(unrolled) == expected


def test_same_shapes_do_not_recompile(setup):
    _, model = setup
    ids, mask = left_padded(prompts(9), 8)
    kwargs = dict(max_new_tokens=6, temperature=0.9, top_k=7, eos_token_ids=[NEVER])
    glm_jax.generate(model, ids, mask, rng=0, **kwargs)
    size = _generate_jit._cache_size()
    other, other_mask = left_padded(prompts(10), 8)
    a = glm_jax.generate(model, other, other_mask, rng=1, **kwargs)
    b = glm_jax.generate(model, other, other_mask, rng=2, **kwargs)
    assert _generate_jit._cache_size() == size
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # the key is used


@pytest.mark.parametrize("mesh_shape, scan_layers", [((2, 2, 2), True), ((2, 4, 1), False)])
def test_generation_on_a_sharded_model_matches(hf_checkpoint, mesh_shape, scan_layers):
    """Sharded decoding gives the unsharded tokens: scanned layers with tensor parallelism,
    and unrolled ones with fsdp-sharded kernels, whose q/k/v and gate/up are fused."""
    _, path = hf_checkpoint("glm", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    ids, mask = left_padded(prompts(12) + prompts(13) + prompts(14)[:2], 8)  # 8 rows
    unsharded = glm_jax.generate(glm_jax.from_pretrained(path), ids, mask, max_new_tokens=8,
                                 temperature=0.0, eos_token_ids=[NEVER])
    mesh = glm_jax.make_mesh(glm_jax.MeshConfig(*mesh_shape))
    model = glm_jax.from_pretrained(path, mesh=mesh, scan_layers=scan_layers)
    with jax.set_mesh(mesh):
        sharded = glm_jax.generate(model, ids, mask, max_new_tokens=8, temperature=0.0,
                                   eos_token_ids=[NEVER])
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(unsharded.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(unsharded.logprobs),
                               atol=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p=0.0"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature=-1.0"),
])
def test_bad_sampling_settings(setup, kwargs, message):
    _, model = setup
    with pytest.raises(ValueError, match=message):
        glm_jax.generate(model, np.ones((1, 3), np.int32), **kwargs)
