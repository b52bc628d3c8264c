"""Models and workdirs handed from one stage to another: a directory of the wrong kind, a
model with fewer embedding rows than its tokenizer has ids, and a reward model of another
tokenizer are refused before any weights load, each with what to give instead."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import tiny_rm_config, tiny_sft_config
from tokenizers import Tokenizer as HFTokenizer

import glm_jax
from glm_jax import CheckpointError
from glm_jax.data import Tokenizer, write_jsonl
from glm_jax.data.tokenizer import TINY_TOKENIZER_PATH
from glm_jax.models.convert import directory_kind
from glm_jax.models.heads import GlmRewardModel
from glm_jax.models.tiny import write_tiny_checkpoint
from glm_jax.train.common import check_tokenizer_fits, load_reward_model, mesh_from_config
from glm_jax.train.dpo import train_dpo
from glm_jax.train.ppo import train_ppo
from glm_jax.train.rejection import rejection_sample, train_rsft
from glm_jax.train.reward import run_eval_cli, train_reward_model
from glm_jax.train.sft import train_sft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import generate as generate_script  # noqa: E402

TINY_IDS = 448  # the bundled tokenizer's ids: 8 special tokens, 256 bytes, 184 merges


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One directory of each kind: a reward-model and an SFT workdir (trained 2 steps), the
    SFT export, a pipeline workdir (its layout only) and an unfinished training workdir."""
    tmp = tmp_path_factory.mktemp("handoff")
    rm = tiny_rm_config(tmp, num_steps=2, eval_every=0, checkpoint_every=2, log_every=1000,
                        eval_file="")
    train_reward_model(rm, tmp / "rm")
    sft = tiny_sft_config(tmp, num_steps=2, eval_every=0, checkpoint_every=2, log_every=1000)
    sft.sft.eval_file = ""
    train_sft(sft, tmp / "sft")
    pipeline = tmp / "pipeline"
    for stage in ("world", "sft"):
        (pipeline / stage).mkdir(parents=True)
        (pipeline / stage / "stage.json").write_text("{}")
    (pipeline / "data").mkdir()
    (pipeline / "config.json").write_text(json.dumps(rm.to_dict()))
    unfinished = tmp / "unfinished"
    unfinished.mkdir()
    shutil.copyfile(tmp / "sft" / "model_config.json", unfinished / "model_config.json")
    (tmp / "plain").mkdir()
    return {"rm": tmp / "rm", "sft": tmp / "sft", "hf": tmp / "sft" / "hf",
            "pipeline": pipeline, "unfinished": unfinished, "plain": tmp / "plain",
            "missing": tmp / "missing", "rm_config": rm, "sft_config": sft}


@pytest.mark.parametrize("name, kind", [
    ("rm", "reward"), ("sft", "policy"), ("hf", "hf"), ("pipeline", "pipeline"),
    ("unfinished", "workdir"), ("plain", "other"), ("missing", "missing")])
def test_directory_kind(dirs, name, kind):
    assert directory_kind(dirs[name]) == kind


def test_a_policy_workdir_with_its_checkpoints_gone_is_still_a_policy(dirs, tmp_path):
    copy = tmp_path / "sft"
    shutil.copytree(dirs["sft"], copy, ignore=shutil.ignore_patterns("checkpoints"))
    assert directory_kind(copy) == "policy"  # by its export


@pytest.mark.parametrize("name, match", [
    ("rm", r"config.model.init_checkpoint = '.*/rm' is a reward-model workdir \(scripts/"
           r"train_rm.py: its checkpoints hold a reward head\), not a Hugging Face model "
           r"directory such as runs/sft/hf .*: a reward model cannot start a policy: give the "
           r"SFT export here .*and the reward-model workdir as ppo.reward_model, "
           r"dpo.reward_model or rsft.reward_model"),
    ("sft", r"config.model.init_checkpoint = '.*/sft' is a policy training workdir .*not a "
            r"Hugging Face model directory .*: use its export .*/sft/hf$"),
    ("pipeline", r"config.model.init_checkpoint = '.*/pipeline' is a pipeline workdir .*: use "
                 r"its SFT export .*/pipeline/sft/hf$"),
    ("unfinished", r"'.*/unfinished' is a glm_jax training workdir without a readable "
                   r"checkpoint, not a Hugging Face .*: its run has written no checkpoint "
                   r"yet: let it finish, then use .*/unfinished/hf"),
])
def test_a_workdir_as_init_checkpoint_is_refused_before_anything_is_written(dirs, tmp_path,
                                                                            name, match):
    config = dirs["sft_config"].copy_and_resolve_references()
    config.model.init_checkpoint = str(dirs[name])
    with pytest.raises(CheckpointError, match=match):
        train_sft(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_from_pretrained_of_a_workdir_names_its_export(dirs):
    with pytest.raises(CheckpointError, match=r"^.*/sft is a policy training workdir .*: use "
                                              r"its export .*/sft/hf$"):
        glm_jax.from_pretrained(dirs["sft"])
    with pytest.raises(CheckpointError, match=r"/sft is a policy training workdir"):
        generate_script.main(["--checkpoint", str(dirs["sft"]), "--prompt", "hi"])


@pytest.mark.parametrize("name, match", [
    ("sft", r"config.dpo.reward_model = '.*/sft' is a policy training workdir \(SFT, DPO, PPO "
            r"or RSFT: its checkpoints hold a language model, no reward head\), not a "
            r"reward-model workdir written by scripts/train_rm.py .*: train a reward model "
            r"with scripts/train_rm.py and give its workdir"),
    ("hf", r"config.dpo.reward_model = '.*/sft/hf' is a Hugging Face model directory .*not a "
           r"reward-model workdir .*: an export holds a language model, not a reward model: "
           r"train one with scripts/train_rm.py \(model.init_checkpoint = this directory\)"),
    ("pipeline", r"config.dpo.reward_model = '.*/pipeline' is a pipeline workdir .*: use its "
                 r"reward model .*/pipeline/rm$"),
])
def test_not_a_reward_model_workdir_as_reward_model(dirs, name, match):
    mesh = mesh_from_config(dirs["rm_config"])
    with pytest.raises(CheckpointError, match=match):
        load_reward_model(str(dirs[name]), "config.dpo.reward_model", Tokenizer.tiny(), mesh)


def test_eval_rm_of_a_policy_workdir(dirs, tmp_path):
    with pytest.raises(CheckpointError, match=r"--workdir = '.*/sft' is a policy training "
                                              r"workdir .*not a reward-model workdir"):
        run_eval_cli(dirs["rm_config"], dirs["sft"], pairs=dirs["rm_config"].rm.train_file)


# ------------------------------------------------------------------ vocabulary vs tokenizer


def stage_config(tmp_path):
    """The tiny config of `stage` with every field it checks before the tokenizer set."""
    config = tiny_sft_config(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    prompts = str(tmp_path / "prompts.jsonl")
    config.rm.train_file = config.dpo.train_file = config.sft.train_file
    config.ppo.update(prompt_file=prompts, reward_model=str(tmp_path / "rm"))
    config.rsft.update(prompt_file=prompts, reward_model=str(tmp_path / "rm"))
    return config


STAGES = {"sft": train_sft, "rm": train_reward_model, "dpo": train_dpo, "ppo": train_ppo,
          "rsft": train_rsft}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_model_smaller_than_its_tokenizer_is_refused_in_every_stage(tmp_path, stage):
    config = stage_config(tmp_path)
    config.model.tiny.vocab_size = 256
    with pytest.raises(ValueError, match=(
            r"the model's vocab_size 256 \(config.model.tiny.vocab_size\) is smaller than the "
            rf"tokenizer's {TINY_IDS} ids \(max id \+ 1, special tokens included; the bundled "
            r"tiny tokenizer .*tiny_tokenizer.json, as config.data.tokenizer is empty\): ids "
            r"from 256 on have no embedding \(training gives loss=nan")):
        STAGES[stage](config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_sources_of_vocab_and_tokenizer_are_named(tmp_path):
    small = write_tiny_checkpoint(tmp_path / "small", vocab_size=256)
    config = stage_config(tmp_path)
    config.model.init_checkpoint = str(small)
    source = rf"config.model.init_checkpoint = '{small}'"
    with pytest.raises(ValueError, match=rf"vocab_size 256 \({source}\) is smaller than the "
                                         rf"tokenizer's {TINY_IDS} ids .*the tokenizer of "
                                         rf"config.model.init_checkpoint, {small}/tokenizer"):
        train_sft(config, tmp_path / "run")
    config.data.tokenizer = str(small)
    with pytest.raises(ValueError, match=rf"\({source}\) .*; config.data.tokenizer = "
                                         rf"'{small}'\)"):
        train_sft(config, tmp_path / "run")
    config.model.init_checkpoint = config.data.tokenizer = ""
    config.model.tiny.vocab_size = TINY_IDS  # as many rows as ids: fits
    assert check_tokenizer_fits(config, Tokenizer.tiny()) is None
    with pytest.raises(ValueError, match=rf"vocab_size 256 \({small}/config.json\) .*{TINY_IDS} "
                                         rf"ids .*{small}/tokenizer.json\)"):
        generate_script.main(["--checkpoint", str(small), "--prompt", "hi"])


# ------------------------------------------------------------------ reward model's tokenizer


def renamed_special_token(directory: Path) -> Path:
    """The tiny tokenizer with id 7 renamed: the same size, another vocabulary."""
    data = json.loads(TINY_TOKENIZER_PATH.read_text())
    data["added_tokens"][7]["content"] = "<|obs|>"
    vocab = data["model"]["vocab"]
    vocab["<|obs|>"] = vocab.pop("<|observation|>")
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def test_a_reward_model_of_another_tokenizer_is_refused(dirs, tmp_path):
    mesh = mesh_from_config(dirs["rm_config"])
    other = Tokenizer.from_dir(renamed_special_token(tmp_path / "other"))
    assert other.vocab_size == TINY_IDS  # the same size: the old vocab_size check passed it
    with pytest.raises(ValueError, match=(
            r"config.ppo.reward_model = '.*/rm' was trained with another tokenizer than the "
            r"policy's: id 7 is '<\|observation\|>' \(special\) in .*/rm/tokenizer.json and "
            r"'<\|obs\|>' \(special\) in .*/other/tokenizer.json. It would score the policy's "
            r"ids as other tokens, and re-tokenizing between two tokenizers is not "
            r"implemented: train the reward model with the policy's tokenizer")):
        load_reward_model(str(dirs["rm"]), "config.ppo.reward_model", other, mesh)


def test_a_resaved_copy_of_the_same_tokenizer_is_accepted(dirs, tmp_path):
    (tmp_path / "resaved").mkdir()
    HFTokenizer.from_file(str(TINY_TOKENIZER_PATH)).save(
        str(tmp_path / "resaved" / "tokenizer.json"), pretty=False)
    resaved = Tokenizer.from_dir(tmp_path / "resaved")
    assert resaved.path.read_bytes() != TINY_TOKENIZER_PATH.read_bytes()
    model = load_reward_model(str(dirs["rm"]), "config.ppo.reward_model", resaved,
                              mesh_from_config(dirs["rm_config"]))
    assert isinstance(model, GlmRewardModel)


def test_rejection_sampling_checks_the_reward_models_tokenizer(dirs, tmp_path):
    config = stage_config(tmp_path)
    config.rsft.reward_model = str(dirs["rm"])
    config.data.tokenizer = str(renamed_special_token(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"config.rsft.reward_model = .* was trained with "
                                         r"another tokenizer than the policy's: id 7"):
        rejection_sample(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_reward_model_smaller_than_the_tokenizer_is_refused(dirs, tmp_path):
    workdir = tmp_path / "rm"
    shutil.copytree(dirs["rm"], workdir)
    fields = json.loads((workdir / "model_config.json").read_text())
    (workdir / "model_config.json").write_text(json.dumps({**fields, "vocab_size": 256}))
    with pytest.raises(ValueError, match=rf"the model's vocab_size 256 \(config.ppo.reward_model"
                                         rf" = '{workdir}'\) is smaller than the tokenizer's "
                                         rf"{TINY_IDS} ids"):
        load_reward_model(str(workdir), "config.ppo.reward_model", Tokenizer.tiny(),
                          mesh_from_config(dirs["rm_config"]))
