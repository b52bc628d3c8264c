"""Stopping and resuming: bit-identical losses for RM, DPO and PPO, a different mesh on
resume, SIGTERM / SIGINT saving at a step boundary, and interrupted saves never taken as the
latest checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import (
    Batches,
    dpo_config,
    initial_state,
    loss_fn,
    ppo_config,
    recorded_losses,
    separable_pairs,
    straight_and_resumed,
    tiny_rm_config,
)
from ml_collections import ConfigDict

from glm_jax.data import GLM4_TEMPLATE, PromptExample, write_jsonl
from glm_jax.sharding import make_mesh
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.dpo import train_dpo
from glm_jax.train.loop import make_train_step, train_loop
from glm_jax.train.ppo import train_ppo
from glm_jax.train.reward import train_reward_model
from glm_jax.train.state import make_optimizer

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm_resume")
    config = tiny_rm_config(tmp_path, eval_every=0, log_every=1000, eval_file="")
    half = straight_and_resumed(train_reward_model, config, "rm", tmp_path)
    return config, tmp_path, half


def test_reward_model_resume_is_bit_identical(reward_runs):
    _, tmp_path, _ = reward_runs
    assert len(recorded_losses(tmp_path / "straight")) == 4


def test_resume_onto_a_different_mesh(reward_runs):
    config, tmp_path, half = reward_runs
    assert dict(config.mesh) == dict(data=1, fsdp=-1, tensor=1)  # saved on fsdp=8
    config = ConfigDict(config.to_dict())
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.rm.num_steps = 4
    train_reward_model(config, half)
    resumed, straight = recorded_losses(half), recorded_losses(tmp_path / "straight")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    # Another mesh reduces in another order: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], rtol=1e-5)
    assert json.loads((half / "config.json").read_text())["mesh"]["tensor"] == 2


def test_dpo_resume_is_bit_identical(tmp_path):
    config = dpo_config(tmp_path, eval_every=0, log_every=1000, learning_rate=1e-3)
    config.dpo.eval_file = ""
    straight_and_resumed(train_dpo, config, "dpo", tmp_path)


def test_ppo_resume_is_bit_identical(reward_runs, tmp_path):
    _, rm_runs, _ = reward_runs
    write_jsonl(tmp_path / "prompts.jsonl",
                [PromptExample(f"question {i}") for i in range(16)])
    config = ppo_config(prompt_file=str(tmp_path / "prompts.jsonl"),
                        reward_model=str(rm_runs / "straight"), log_every=1000)
    config.data.max_prompt_tokens, config.data.max_response_tokens = 16, 8
    straight_and_resumed(train_ppo, config, "ppo", tmp_path)


def test_sigint_saves_at_the_step_boundary_and_exits_0(tmp_path, capsys):
    class Interrupting(Batches):
        def __next__(self):
            if self.position == 3:  # during step 4: the signal arrives mid-run
                os.kill(os.getpid(), signal.SIGINT)
            return super().__next__()

    tx, schedule = make_optimizer(learning_rate=0.1, num_steps=20)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        train_loop(initial_state(tx), lambda _: make_train_step(loss_fn, tx, schedule, None,
                                                                None),
                   Interrupting(good=100), mesh=make_mesh((1, 1, 1), jax.devices()[:1]),
                   num_steps=20, checkpointer=checkpointer, writer=None, desc="test",
                   checkpoint_every=100)
    assert exit_info.value.code == 0
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert "test: SIGINT asked to stop; saved the checkpoint of step 4" in capsys.readouterr().out
    assert checkpointer.latest_step() == 4
    _, extra = checkpointer.restore(initial_state(tx))
    checkpointer.close()
    assert extra["data"] == {"position": 4}


def test_sigterm_to_a_training_script_saves_and_exits_0(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", separable_pairs(256, seed=0))
    workdir = tmp_path / "rm"
    command = [sys.executable, str(ROOT / "scripts" / "train_rm.py"), "--workdir",
               str(workdir), f"--config.rm.train_file={tmp_path / 'train.jsonl'}",
               "--config.rm.num_steps=100000", "--config.rm.checkpoint_every=100000",
               "--config.data.max_prompt_tokens=16", "--config.data.max_response_tokens=24"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert "reward model: SIGTERM asked to stop; saved the checkpoint of step" in output
    saved = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= saved < 100000
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [saved]


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from glm_jax.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, {"w": np.zeros(4, np.float32)}, {"data": {"position": 1}})
    checkpointer.wait()
    # A save big enough to still be writing when the parent kills this process.
    checkpointer.save(2, {"w": np.ones(4, np.float32),
                          "big": np.ones((256, 1024, 1024), np.float32)})
    print("saving", flush=True)
    time.sleep(60)
""")


def test_a_save_killed_midway_is_never_the_latest(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ckpt")],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "saving"
    process.kill()  # SIGKILL: no cleanup runs
    process.wait()
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir()]
    checkpointer = Checkpointer(tmp_path / "ckpt")
    assert checkpointer.latest_step() == 1, leftovers
    state, extra = checkpointer.restore({"w": np.full(4, 7.0, np.float32)})
    checkpointer.close()
    np.testing.assert_array_equal(state["w"], np.zeros(4))
    assert extra == {"data": {"position": 1}}


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
    config = tiny_rm_config(tmp_path, num_steps=6, eval_every=1, checkpoint_every=1,
                            keep_checkpoints=1, log_every=1000, best_metric="eval_margin",
                            best_mode="min")
    train_reward_model(config, tmp_path / "rm")
    lines = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text()
             .splitlines()]
    margins = {m["step"]: m["eval_margin"] for m in lines if "eval_margin" in m}
    best = min(margins, key=margins.get)
    kept = sorted(int(p.name) for p in (tmp_path / "rm" / "checkpoints").iterdir()
                  if p.name.isdigit())
    assert kept == sorted({best, 6})
    checkpointer = Checkpointer(tmp_path / "rm" / "checkpoints", best_metric="eval_margin",
                                best_mode="min")
    assert checkpointer.best_step() == best and checkpointer.latest_step() == 6
    checkpointer.close()


def test_best_metric_errors(tmp_path):
    config = tiny_rm_config(tmp_path, num_steps=2, eval_every=1, best_metric="eval_acc")
    with pytest.raises(ValueError, match=r"best_metric 'eval_acc' is not among the metrics "
                                         r"\[.*'eval_accuracy'"):
        train_reward_model(config, tmp_path / "a")
    config.rm.update(best_metric="eval_accuracy")
    config.rm.eval_file = ""
    with pytest.raises(ValueError, match=r"best_metric = 'eval_accuracy' ranks checkpoints by an "
                                         r"eval metric, but this reward model run has no "
                                         r"evaluation"):
        train_reward_model(config, tmp_path / "b")


def test_sigterm_while_sampling_reference_responses_exits_0_writing_nothing(
        tmp_path, monkeypatch, capsys):
    from flax import nnx

    from glm_jax.data import Tokenizer
    from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel
    from glm_jax.models.tiny import tiny_config
    from glm_jax.train import ppo, rollout

    def interrupted_sampling(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-sampling
        time.sleep(5)  # the handler stops the sampling before this ends
        raise AssertionError("the sampling was not abandoned")

    # The signal arrives inside rollout.sample_prompts' loop, which every sampler shares
    # (PPO's reference responses and prompt filter, DPO's reward pairs, best-of-n).
    monkeypatch.setattr(rollout, "_sample_and_score_jit", interrupted_sampling)
    config = ppo_config(prompt_file=str(tmp_path / "prompts.jsonl"),
                        reward_model=str(tmp_path / "rm"), filter_samples=0,
                        reference_reward=True)
    previous = signal.getsignal(signal.SIGTERM)
    ids = np.ones((4, 8), np.int32)
    policy = GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    reward_model = GlmRewardModel(tiny_config(), rngs=nnx.Rngs(1))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(SystemExit) as exit_info:
        ppo.prepare_prompts(config, tmp_path, policy, reward_model, ids, ids > 0,
                            [PromptExample(f"q{i}") for i in range(4)], Tokenizer.tiny(),
                            GLM4_TEMPLATE, mesh)
    assert exit_info.value.code == 0
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert ("SIGTERM asked to stop: abandoned sampling for the reference responses; nothing "
            "of it was written. Run the same command again to resume"
            in capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []  # no cache, no key, no temporary file
