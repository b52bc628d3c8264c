"""Bad checkpoints get errors that name the file and the tensor; nothing half-written stays."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import glm_jax
from glm_jax import CheckpointError


@pytest.fixture
def checkpoint(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("glm")
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    return copy


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {tmp_path / 'gone'}"):
        glm_jax.from_pretrained(tmp_path / "gone")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        glm_jax.from_pretrained(checkpoint)


def test_config_that_is_not_json(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "glm",\n  oops}')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON \(line 2"):
        glm_jax.from_pretrained(checkpoint)


def test_unsupported_model_type(checkpoint):
    edit_config(checkpoint, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'llama' is not supported"):
        glm_jax.from_pretrained(checkpoint)


def test_missing_config_field(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["num_hidden_layers"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="required field 'num_hidden_layers' is missing"):
        glm_jax.from_pretrained(checkpoint)


def test_tensor_with_the_wrong_shape(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = np.zeros((64, 95), np.float32)
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has shape "
                       r"\(64, 95\), but the config expects \(64, 96\)"):
        glm_jax.from_pretrained(checkpoint)


def test_missing_tensor(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.k_proj.bias' is "
                       r"missing from the checkpoint \(weight files: model.safetensors\)"):
        glm_jax.from_pretrained(checkpoint)


def test_config_that_does_not_match_the_weights(checkpoint):
    edit_config(checkpoint, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"mlp.down_proj.weight' has shape \(64, 96\), but "
                       r"the config expects \(64, 80\)"):
        glm_jax.from_pretrained(checkpoint)


def test_index_naming_a_missing_file(checkpoint):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        glm_jax.from_pretrained(checkpoint)


def test_no_weights_at_all(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        glm_jax.from_pretrained(checkpoint)


def test_unsupported_chatglm_option(checkpoint):
    edit_config(checkpoint, model_type="chatglm", add_bias_linear=True)
    with pytest.raises(CheckpointError, match="add_bias_linear = True is not supported"):
        glm_jax.from_pretrained(checkpoint)


def test_failed_save_keeps_the_previous_checkpoint(checkpoint, monkeypatch):
    model = glm_jax.from_pretrained(checkpoint)
    before = (checkpoint / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        glm_jax.save_pretrained(model, checkpoint)
    assert (checkpoint / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_file(checkpoint, damage):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a tensor" * 9)
    with pytest.raises(CheckpointError, match=rf"{weights}: not a readable safetensors file "
                       r"\(Error while deserializing header: .*\): it is truncated or corrupt, "
                       r"e.g. by an interrupted copy or download. Export it again \(the training "
                       r"stage's WORKDIR/hf, or save_pretrained\) or download it again"):
        glm_jax.from_pretrained(checkpoint)


def test_unreadable_shard_of_an_indexed_checkpoint(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    names = sorted(tensors)
    for i, part in enumerate((names[:5], names[5:])):
        save_file({n: tensors[n] for n in part}, checkpoint / f"model-{i + 1}-of-2.safetensors")
    (checkpoint / "model.safetensors").unlink()
    index = {"weight_map": {n: f"model-{1 + (n not in names[:5])}-of-2.safetensors"
                            for n in names}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = checkpoint / "model-2-of-2.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file"):
        glm_jax.from_pretrained(checkpoint)
