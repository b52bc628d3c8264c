"""Logits against transformers on the same weights, checkpoints in and out, heads, dtypes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits

import glm_jax
from glm_jax.models.heads import last_token_index


def random_ids(batch, length, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(2, vocab, (batch, length))


@pytest.mark.parametrize("model_type,kv_heads", [("glm", 2), ("glm", 1), ("glm", 4),
                                                 ("glm4", 2)])
def test_logits_match_transformers(hf_checkpoint, model_type, kv_heads):
    reference, path = hf_checkpoint(model_type, num_key_value_heads=kv_heads)
    model = glm_jax.from_pretrained(path)
    assert model.config.model_type == model_type
    ids = random_ids(3, 17)
    diff = np.abs(np.asarray(model(ids)) - hf_logits(reference, ids)).max()
    assert diff <= 1e-4, diff


def test_left_padded_rows_match_unpadded(hf_checkpoint):
    reference, path = hf_checkpoint("glm")
    model = glm_jax.from_pretrained(path)
    lengths = [11, 7, 3]
    ids = np.zeros((3, 11), np.int64)
    mask = np.zeros((3, 11), bool)
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    for i, row in enumerate(rows):
        ids[i, 11 - len(row):] = row
        mask[i, 11 - len(row):] = True
    padded = np.asarray(model(ids, mask))
    for i, row in enumerate(rows):
        expected = hf_logits(reference, row[None])[0]
        assert np.abs(padded[i, 11 - len(row):] - expected).max() <= 1e-4


def test_save_pretrained_loads_in_transformers(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path = hf_checkpoint("glm4")
    model = glm_jax.from_pretrained(path)
    out = glm_jax.save_pretrained(model, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Glm4ForCausalLM"
    ids = random_ids(2, 9, seed=3)
    assert np.abs(hf_logits(reloaded, ids) - np.asarray(model(ids))).max() <= 1e-4


def test_sharded_save_round_trip(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("glm")
    model = glm_jax.from_pretrained(path)
    out = glm_jax.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).exists() for f in files)
    again = glm_jax.from_pretrained(out)
    for (key, a), (_, b) in zip(nnx_flat(model), nnx_flat(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))


def nnx_flat(model):
    from flax import nnx

    return [(k, v[...]) for k, v in nnx.to_flat_state(nnx.state(model))]


def chatglm_state_dict(reference):
    """The reference model's weights under ChatGLM2/3 remote-code names and fused layout."""
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.zeros(4)}
    for i in range(reference.config.num_hidden_layers):
        hf, cg = f"model.layers.{i}", f"transformer.encoder.layers.{i}"
        attn = f"{hf}.self_attn"
        for kind in ("weight", "bias"):
            out[f"{cg}.self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[f"{attn}.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{cg}.self_attention.dense.weight"] = sd[f"{attn}.o_proj.weight"]
        out[f"{cg}.mlp.dense_h_to_4h.weight"] = sd[f"{hf}.mlp.gate_up_proj.weight"]
        out[f"{cg}.mlp.dense_4h_to_h.weight"] = sd[f"{hf}.mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{cg}.{norm}.weight"] = sd[f"{hf}.{norm}.weight"]
    return out


def chatglm_config(reference):
    c = reference.config
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "kv_channels": c.head_dim,
            "multi_query_attention": True, "multi_query_group_num": c.num_key_value_heads,
            "ffn_hidden_size": c.intermediate_size, "padded_vocab_size": c.vocab_size,
            "layernorm_epsilon": c.rms_norm_eps, "rope_ratio": 1, "seq_length": 256,
            "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
            "original_rope": True, "eos_token_id": 2, "pad_token_id": 0}


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_chatglm_checkpoint_loads(hf_checkpoint, tmp_path, weights):
    from safetensors.torch import save_file

    reference, _ = hf_checkpoint("glm")
    state = chatglm_state_dict(reference)
    if weights.endswith(".bin"):
        torch.save(state, tmp_path / weights)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / weights)
    (tmp_path / "config.json").write_text(json.dumps(chatglm_config(reference)))
    model = glm_jax.from_pretrained(tmp_path)
    assert model.config.eos_token_id == (2,)
    ids = random_ids(2, 12, seed=5)
    assert np.abs(np.asarray(model(ids)) - hf_logits(reference, ids)).max() <= 1e-4


def test_bfloat16_params_and_compute(hf_checkpoint):
    reference, path = hf_checkpoint("glm")
    model = glm_jax.from_pretrained(path, dtype="bfloat16")
    assert model.model.layers.mlp.up_kernel[...].dtype == jnp.bfloat16
    ids = random_ids(2, 10, seed=7)
    logits = model(ids)
    assert logits.dtype == jnp.float32  # log-probs are always taken in float32
    expected = hf_logits(reference, ids)
    error = np.abs(np.asarray(logits) - expected).max() / np.abs(expected).max()
    assert 0 < error < 0.05  # bfloat16 rounding, but the same function


def test_bfloat16_compute_with_float32_params(hf_checkpoint):
    _, path = hf_checkpoint("glm")
    model = glm_jax.from_pretrained(path, dtype="bfloat16", param_dtype="float32")
    assert model.model.embed_tokens[...].dtype == jnp.float32
    f32 = glm_jax.from_pretrained(path)
    ids = random_ids(2, 10, seed=8)
    a, b = np.asarray(model(ids)), np.asarray(f32(ids))
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(b).max()


@pytest.mark.parametrize("head", ["reward", "value"])
def test_scalar_heads_start_from_lm_checkpoint(hf_checkpoint, head):
    _, path = hf_checkpoint("glm")
    lm = glm_jax.from_pretrained(path)
    model = glm_jax.from_pretrained(path, head=head, seed=3)
    np.testing.assert_array_equal(np.asarray(model.model.embed_tokens[...]),
                                  np.asarray(lm.model.embed_tokens[...]))
    assert float(jnp.abs(model.head_kernel[...]).max()) > 0  # a fresh, non-zero head
    ids = random_ids(2, 8, seed=9)
    hidden, _ = lm.model(ids)
    expected = np.asarray(hidden @ model.head_kernel[...] + model.head_bias[...])
    out = np.asarray(model(ids))
    if head == "value":
        np.testing.assert_allclose(out, expected, atol=1e-5)
    else:
        np.testing.assert_allclose(out, expected[:, -1], atol=1e-5)


def test_reward_reads_last_real_token_left_or_right_padded(hf_checkpoint):
    _, path = hf_checkpoint("glm")
    model = glm_jax.from_pretrained(path, head="reward", seed=1)
    row = random_ids(1, 6, seed=11)[0]
    left = np.zeros((1, 9), np.int64)
    left[0, 3:] = row
    right = np.zeros((1, 9), np.int64)
    right[0, :6] = row
    unpadded = float(model(row[None])[0])
    assert abs(float(model(left, left > 0)[0]) - unpadded) < 1e-5
    assert abs(float(model(right, right > 0)[0]) - unpadded) < 1e-5
    # A reward read anywhere but the last real token would differ.
    assert abs(float(model(row[None, :5])[0]) - unpadded) > 1e-4
    np.testing.assert_array_equal(last_token_index(jnp.asarray([[0, 1, 1, 0], [1, 0, 0, 0]])),
                                  [2, 0])


def test_gradients_flow_to_every_parameter(hf_checkpoint):
    from flax import nnx

    _, path = hf_checkpoint("glm4")
    model = glm_jax.from_pretrained(path)
    ids = random_ids(2, 8, seed=12)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[:, :-1, :].max(-1))

    grads = nnx.grad(loss)(model)
    for key, g in nnx.to_flat_state(grads):
        assert float(jnp.abs(g[...]).max()) > 0, key
