"""Two processes with 4 CPU devices each (JAX's multi-controller runtime on localhost) train
the reward model and PPO to the same losses as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ppo_config, tiny_rm_config

from glm_jax.data import PromptExample, write_jsonl
from glm_jax.train.ppo import train_ppo
from glm_jax.train.reward import train_reward_model

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")
from ml_collections import ConfigDict
from glm_jax.train.ppo import train_ppo
from glm_jax.train.reward import train_reward_model

rm_config, ppo_config, workdir, address, process_id = sys.argv[1:]
for path in (rm_config, ppo_config):
    config = ConfigDict(json.load(open(path)))
    config.distributed.update(coordinator_address=address, num_processes=2,
                              process_id=int(process_id))
    if path == rm_config:
        train_reward_model(config, workdir + "/rm")
    else:  # with the single process's reward model, so PPO alone is compared
        train_ppo(config, workdir + "/ppo")
assert jax.process_count() == 2 and jax.device_count() == 8
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multihost")
    rm = tiny_rm_config(tmp_path, num_steps=3, eval_every=0, checkpoint_every=3,
                        log_every=1000, eval_file="")
    write_jsonl(tmp_path / "prompts.jsonl", [PromptExample(f"question {i}") for i in range(16)])
    ppo = ppo_config(prompt_file=str(tmp_path / "prompts.jsonl"), num_steps=2,
                     checkpoint_every=2, log_every=1000, filter_samples=2,
                     filter_min_variance=0.0)
    ppo.data.max_prompt_tokens, ppo.data.max_response_tokens = 16, 8
    return tmp_path, rm, ppo


def test_two_processes_match_one(configs):
    tmp_path, rm, ppo = configs
    # One process, 8 devices (the mesh fsdp=-1 spans them all in both runs).
    train_reward_model(rm, tmp_path / "single" / "rm")
    ppo.ppo.reward_model = str(tmp_path / "single" / "rm")
    train_ppo(ppo, tmp_path / "single" / "ppo")

    (tmp_path / "rm.json").write_text(rm.to_json())
    (tmp_path / "ppo.json").write_text(ppo.to_json())
    address = f"localhost:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 4 devices each
    workers = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "rm.json"), str(tmp_path / "ppo.json"),
         str(tmp_path / "multi"), address, str(i)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-5000:]

    for stage, keys in (("rm", ("loss", "accuracy", "grad_norm")),
                        ("ppo", ("loss", "reward", "kl", "value_loss", "reference_reward"))):
        single, multi = metrics(tmp_path / "single" / stage), metrics(tmp_path / "multi" / stage)
        assert [m["step"] for m in multi] == [m["step"] for m in single]
        for key in keys:
            np.testing.assert_allclose([m[key] for m in multi], [m[key] for m in single],
                                       rtol=2e-5, atol=2e-6, err_msg=f"{stage} {key}")
    # Only process 0 wrote metrics and caches; both wrote the checkpoint collectively.
    assert "step 3" not in outputs[1] and (tmp_path / "multi" / "ppo" / "hf").exists()
    assert sorted(p.name for p in (tmp_path / "multi" / "rm" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["3"]
