"""The generate CLI end to end, against transformers on the same checkpoint and tokenizer."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glm_jax.data import GLM4_TEMPLATE, Tokenizer, encode_chat
from glm_jax.models.tiny import write_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import generate as generate_script  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


def test_generate_script_matches_transformers_greedy(tiny_checkpoint, capsys):
    from transformers import AutoModelForCausalLM

    prompts = ["Who are you?", "Add 12 and 30."]
    texts = generate_script.main(["--checkpoint", str(tiny_checkpoint), "--prompt", prompts[0],
                                  "--prompt", prompts[1], "--max-new-tokens", "12"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    eos = tokenizer.eos_token_ids
    for prompt, text in zip(prompts, texts, strict=True):
        ids = torch.tensor([encode_chat(tokenizer, GLM4_TEMPLATE, prompt)])
        out = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].numpy()
        expected = tokenizer.decode(out[~np.isin(out, eos)].tolist())
        assert text == expected
    printed = capsys.readouterr().out
    assert f">>> {prompts[1]}\n{texts[1]}" in printed


def test_demo_writes_a_loadable_checkpoint(tmp_path):
    texts = generate_script.main(["--demo", "--workdir", str(tmp_path), "--max-new-tokens", "4",
                                  "--temperature", "0.7", "--top-k", "20"])
    checkpoint = tmp_path / "tiny_checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in checkpoint.iterdir()}
    assert len(texts) == 2


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        generate_script.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
