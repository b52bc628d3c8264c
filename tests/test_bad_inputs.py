"""Bad inputs that the README's table lists and that no other test file covers, plus the check
that every row of that table names a test that exists."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_rm_config
from tokenizers import Tokenizer as HFTokenizer

from glm_jax.data.records import DataError
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.sharding import initialize_distributed
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.common import (
    load_reward_model,
    mesh_from_config,
    model_from_config,
    read_prompts,
)
from glm_jax.train.reward import train_reward_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad_rm")
    config = tiny_rm_config(tmp_path, num_steps=2, eval_every=0, checkpoint_every=2,
                            log_every=1000, eval_file="")
    train_reward_model(config, tmp_path / "rm")
    return config, tmp_path / "rm"


def test_resuming_with_another_model_is_refused_and_keeps_the_checkpoint(rm_workdir):
    config, workdir = rm_workdir
    saved = {p.relative_to(workdir): p.read_bytes()
             for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
    other = tiny_rm_config(workdir.parent, num_steps=4, eval_every=0, log_every=1000,
                           eval_file="")
    other.model.tiny.intermediate_size = 96
    with pytest.raises(ValueError, match=r"checkpoints/2 was written by a run with a different "
                                         r"model or optimizer config.*: params\.model\.layers\."
                                         r"mlp\.down_kernel\.value is float32\[2, 64, 128\] "
                                         r"there and float32\[2, 64, 96\] here"):
        train_reward_model(other, workdir)
    assert saved == {p.relative_to(workdir): p.read_bytes()
                     for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
    assert Checkpointer(workdir / "checkpoints").latest_step() == 2


@pytest.mark.parametrize("target, difference", [
    ({"params": {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}},
     r"params\.w is float32\[4, 3\] there and float32\[3, 4\] here"),
    ({"params": {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float16)}},
     r"params\.b is float32\[3\] there and float16\[3\] here"),
    ({"params": {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32),
                 "c": np.zeros(3, np.float32)}},
     r"params\.c is not in the checkpoint"),
    ({"params": {"w": np.zeros((4, 3), np.float32)}},
     r"params\.b is in the checkpoint but not in this config"),
])
def test_restoring_onto_another_structure_names_the_first_difference(tmp_path, target,
                                                                      difference):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, {"params": {"w": np.ones((4, 3), np.float32),
                                     "b": np.ones(3, np.float32)}})
    checkpointer.wait()
    with pytest.raises(ValueError, match=r"checkpoint .*/1 was written by a run with a "
                                         r"different model or optimizer config.*: " + difference):
        checkpointer.restore(target)
    restored, _ = checkpointer.restore({"params": {"w": np.zeros((4, 3), np.float32),
                                                   "b": np.zeros(3, np.float32)}})
    checkpointer.close()
    np.testing.assert_array_equal(restored["params"]["w"], np.ones((4, 3)))


def test_reward_model_with_another_vocabulary(rm_workdir):
    config, workdir = rm_workdir
    mesh = mesh_from_config(config)
    bigger = HFTokenizer.from_file(str(Tokenizer.tiny().path))
    bigger.add_special_tokens(["<extra>"])
    (workdir.parent / "bigger").mkdir()
    bigger.save(str(workdir.parent / "bigger" / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"config.ppo.reward_model = .* was trained with another "
                                         r"tokenizer than the policy's: id 448 is absent in "
                                         r".*/rm/tokenizer.json and '<extra>' \(special\) in "
                                         r".*/bigger/tokenizer.json"):
        load_reward_model(str(workdir), "config.ppo.reward_model",
                          Tokenizer.from_dir(workdir.parent / "bigger"), mesh)
    with pytest.raises(FileNotFoundError, match=r"config.ppo.reward_model = '.*nowhere' is not "
                                                r"a directory"):
        load_reward_model(str(workdir.parent / "nowhere"), "config.ppo.reward_model",
                          Tokenizer.tiny(), mesh)
    (workdir.parent / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.ppo.reward_model = .*empty.*"
                                                r"model_config.json is missing"):
        load_reward_model(str(workdir.parent / "empty"), "config.ppo.reward_model",
                          Tokenizer.tiny(), mesh)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.ppo.prompt_file = '.*gone.jsonl' does "
                                                r"not exist"):
        read_prompts(str(tmp_path / "gone.jsonl"), "config.ppo.prompt_file")
    (tmp_path / "p.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: prompt: expected a string, got number"):
        read_prompts(str(tmp_path / "p.jsonl"), "config.ppo.prompt_file")
    with pytest.raises(ValueError, match=r"config.ppo.prompt_file = .*p.jsonl' has no prompts"):
        read_prompts(str(tmp_path / "p.jsonl"), "config.ppo.prompt_file", on_error="skip")


def test_missing_init_checkpoint(rm_workdir, tmp_path):
    config, _ = rm_workdir
    config = config.copy_and_resolve_references()
    config.model.init_checkpoint = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        model_from_config(config, "lm", mesh_from_config(config))


def test_distributed_settings_must_be_complete():
    with pytest.raises(ValueError, match=r"config.distributed: coordinator_address="
                                         r"'host:1234' needs num_processes >= 1"):
        initialize_distributed("host:1234", num_processes=0)
    with pytest.raises(ValueError, match=r"process_id=2"):
        initialize_distributed("host:1234", num_processes=2, process_id=2)


def readme_bad_input_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Bad input"):]
    section = section[:section.index("\n## ")]
    rows = re.findall(r"^\| (.+?) \| (.+?) \| `(tests/[\w/]+\.py::\w+)` \|$", section, re.M)
    return rows


def test_every_bad_input_in_the_readme_has_a_test():
    rows = readme_bad_input_rows()
    assert len(rows) >= 20
    for _, _, node in rows:
        path, name = node.split("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"README bad-input table names {node}, which does not exist"
