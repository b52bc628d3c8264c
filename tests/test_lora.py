"""Low-rank adapters on the model: zero-initialised adapters leave the base unchanged, the
adapted model matches PEFT's on transformers' model both ways, and merging folds them in."""

import json

import jax
import numpy as np
import pytest
from conftest import hf_logits
from flax import nnx

import glm_jax
from glm_jax.models.glm import LORA_TARGETS, LoRAParam
from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel
from glm_jax.models.lora import (
    AdapterError,
    base_graphdef,
    base_state,
    join,
    load_adapter,
    merged_model,
    save_adapter,
    split_trained,
)

ALL = tuple(LORA_TARGETS)


def random_ids(batch, length, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(2, vocab, (batch, length))


def with_adapters(base, targets=ALL, rank=4, alpha=8.0, seed=1):
    """`base` with adapters of random (nonzero) A and B on `targets`: the model differs."""
    config = base.config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(base)(config,
                                                                     rngs=nnx.Rngs(0))))
    adapters = nnx.split_state(abstract, LoRAParam, ...)[0]
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    adapters = jax.tree.map(lambda v: v.replace(0.2 * jax.random.normal(next(keys), v.shape)),
                            adapters, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, nnx.state(base), adapters)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_zero_adapters_give_the_base_model_exactly(scan_layers):
    config = glm_jax.GlmConfig(scan_layers=scan_layers)
    base = GlmForCausalLM(config, rngs=nnx.Rngs(3))
    lora = GlmForCausalLM(config.replace(lora_rank=4, lora_targets=ALL), rngs=nnx.Rngs(3))
    ids = random_ids(2, 9)
    np.testing.assert_array_equal(np.asarray(lora(ids)), np.asarray(base(ids)))
    # The same seed gives the same base weights with or without adapters, and A is random.
    trained, frozen = split_trained(nnx.state(lora))
    for (key, a), (_, b) in zip(nnx.to_flat_state(frozen), nnx.to_flat_state(nnx.state(base)),
                                strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(key))
    flat = dict(nnx.to_flat_state(trained))
    assert all(np.any(v[...] != 0) for k, v in flat.items() if k[-1].endswith("_lora_a"))
    assert all(np.all(v[...] == 0) for k, v in flat.items() if k[-1].endswith("_lora_b"))
    assert dict(nnx.to_flat_state(join(trained, frozen))).keys() == \
        dict(nnx.to_flat_state(nnx.state(lora))).keys()


def test_only_adapters_and_a_scalar_head_are_trained():
    config = glm_jax.GlmConfig(lora_rank=2, lora_targets=("q", "v"))
    trained, _ = split_trained(nnx.state(GlmRewardModel(config, rngs=nnx.Rngs(0))))
    names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(trained)}
    assert names == {"head_kernel", "head_bias", "model/layers/self_attn/q_lora_a",
                     "model/layers/self_attn/q_lora_b", "model/layers/self_attn/v_lora_a",
                     "model/layers/self_attn/v_lora_b"}


@pytest.mark.parametrize("model_type,targets", [
    ("glm", ALL), ("glm4", ALL), ("glm", ("q", "v", "gate")), ("glm", ("o", "up", "down"))])
def test_adapter_written_by_glm_jax_loads_in_peft(hf_checkpoint, tmp_path, model_type,
                                                  targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = hf_checkpoint(model_type)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()  # PEFT changes it in place
    model = with_adapters(glm_jax.from_pretrained(path), targets)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    ids = random_ids(3, 13)
    ours = np.asarray(model(ids))
    assert np.abs(ours - np.asarray(glm_jax.from_pretrained(path)(ids))).max() > 1e-2
    diff = np.abs(ours - hf_logits(peft_model, ids)).max()
    assert diff <= 1e-4, diff
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["peft_type"]) == (4, 8.0, "LORA")


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_adapter_made_by_peft_loads_in_glm_jax(hf_checkpoint, tmp_path, model_type):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, path = hf_checkpoint(model_type)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()  # PEFT changes it in place
    torch.manual_seed(0)
    peft_config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "o_proj", "gate_up_proj",
                                             "down_proj"])
    peft_model = get_peft_model(reference, peft_config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ids = random_ids(2, 11, seed=4)
    expected = hf_logits(peft_model, ids)
    model = load_adapter(tmp_path / "peft", glm_jax.from_pretrained(path))
    assert model.config.lora_targets == ("q", "k", "o", "gate", "up", "down")
    assert model.config.lora_scale == 4.0
    diff = np.abs(np.asarray(model(ids)) - expected).max()
    assert diff <= 1e-4, diff


def test_merged_model_computes_what_the_adapters_do(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path = hf_checkpoint("glm4")
    model = with_adapters(glm_jax.from_pretrained(path))
    merged = merged_model(model)
    assert merged.config.lora_rank == 0 and not nnx.state(merged, LoRAParam)
    ids = random_ids(2, 10, seed=5)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=1e-4)
    out = glm_jax.save_pretrained(merged, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(hf_logits(reloaded, ids) - np.asarray(model(ids))).max() <= 1e-4


def test_base_graph_runs_the_base_state_with_adapters_off():
    config = glm_jax.GlmConfig(lora_rank=4, lora_targets=ALL)
    base = GlmForCausalLM(config.without_lora(), rngs=nnx.Rngs(0))
    model = with_adapters(base)
    off = nnx.merge(base_graphdef(GlmForCausalLM, model.config), base_state(nnx.state(model)))
    ids = random_ids(2, 7)
    np.testing.assert_array_equal(np.asarray(off(ids)), np.asarray(base(ids)))
    assert np.abs(np.asarray(model(ids)) - np.asarray(base(ids))).max() > 1e-2


def test_lora_config_errors():
    with pytest.raises(ValueError, match=r"unknown: gate_up, qkv"):
        glm_jax.GlmConfig(lora_rank=4, lora_targets=("q", "qkv", "gate_up"))
    with pytest.raises(ValueError, match=r"lora_rank = 4, lora_targets = \[\]"):
        glm_jax.GlmConfig(lora_rank=4)


def write_adapter(tmp_path, **changes):
    base = GlmForCausalLM(glm_jax.GlmConfig(), rngs=nnx.Rngs(0))
    out = save_adapter(with_adapters(base, ("q", "v")), tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | changes))
    return base, out


@pytest.mark.parametrize("changes,message", [
    ({"target_modules": ["q_proj", "lm_head"]}, r"target_modules = .*lm_head is not a module"),
    ({"target_modules": "all-linear"}, r"target_modules = 'all-linear': expected a list"),
    ({"use_rslora": True}, r"use_rslora = True: glm_jax's adapters are plain LoRA"),
    ({"rank_pattern": {"q_proj": 8}}, r"rank_pattern = .*one rank and alpha"),
    ({"peft_type": "IA3"}, r"peft_type = 'IA3'"),
    ({"r": 8}, r"q_proj.lora_B.weight has shape \[64, 4\], expected \[64, 8\]"),
    ({"target_modules": ["q_proj", "v_proj", "down_proj"]},
     r"tensor base_model.model.model.layers.0.mlp.down_proj.lora_B.weight is missing"),
])
def test_adapters_that_do_not_fit_name_the_file_and_field(tmp_path, changes, message):
    base, out = write_adapter(tmp_path, **changes)
    with pytest.raises(AdapterError, match=message) as raised:
        load_adapter(out, base)
    assert str(out) in str(raised.value)


def test_lora_dropout_only_in_a_training_step_and_unbiased():
    """Outside `lora_dropout_key` the adapters read their input whole (evaluation,
    generation); inside, each key drops a different part; an adapter's output averaged over
    keys is its undropped output (inverted dropout)."""
    from glm_jax.models.glm import _LAYER_KEY, _holding, lora_dropout_key

    config = glm_jax.GlmConfig(scan_layers=True)
    model = with_adapters(GlmForCausalLM(config, rngs=nnx.Rngs(0)), ("q", "gate", "down"))
    dropping = nnx.merge(nnx.split(GlmForCausalLM(model.config.replace(lora_dropout=0.5),
                                                  rngs=nnx.Rngs(0)))[0], nnx.state(model))
    ids = random_ids(2, 6)
    whole = np.asarray(model(ids))
    np.testing.assert_array_equal(np.asarray(dropping(ids)), whole)

    @jax.jit
    def dropped(state, key):
        with lora_dropout_key(key):
            return nnx.merge(nnx.split(dropping)[0], state)(ids)

    first, second = (np.asarray(dropped(nnx.state(dropping), jax.random.key(i)))
                     for i in range(2))
    assert np.abs(first - second).max() > 1e-2 and np.abs(first - whole).max() > 1e-2
    # One adapter (layer 0's q): linear in its input, so the mean over masks is unbiased.
    layer_graph, stacked = nnx.split(dropping.model.layers)
    attention = nnx.merge(layer_graph, jax.tree.map(lambda p: p[0], stacked)).self_attn
    x = jax.random.normal(jax.random.key(7), (2, 6, config.hidden_size))

    @jax.jit
    def q_projection(key):
        with _holding(_LAYER_KEY, key):
            return attention._project_qkv(x)[0]

    outs = np.stack([np.asarray(q_projection(jax.random.key(i))) for i in range(256)])
    undropped = np.asarray(attention._project_qkv(x)[0])
    error = np.abs(outs.mean(0) - undropped) / (outs.std(0) / 16 + 1e-6)
    assert np.median(error) < 1.5 and np.abs(outs[0] - undropped).max() > 1e-3
