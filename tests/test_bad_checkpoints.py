"""A workdir's files after bad restarts: damaged checkpoints (refused, or resumed from the
newest intact one), metrics of an earlier run moved aside, a rerun with nothing to train, a
full disk at restart, and one file mode for everything a run writes."""

import errno
import json
import os
import shutil
import stat

import numpy as np
import pytest
from conftest import recorded_losses, tiny_rm_config
from flax import nnx

from glm_jax.data import Tokenizer
from glm_jax.models.heads import GlmForCausalLM
from glm_jax.models.tiny import tiny_config
from glm_jax.train.cache import cached_jsonl
from glm_jax.train.checkpoint import CheckpointDamaged
from glm_jax.train.loop import export
from glm_jax.train.reward import train_reward_model
from glm_jax.train.state import TrainState
from glm_jax.train.workdir import write_file


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, workdir) of a tiny reward-model run of 4 steps, checkpoints at 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("bad_checkpoints")
    config = tiny_rm_config(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2,
                            eval_file="", eval_every=0, log_every=1000)
    train_reward_model(config, tmp_path / "run")
    return config, tmp_path / "run"


@pytest.fixture
def run(finished, tmp_path):
    """A fresh copy of the finished run, and its config (to change)."""
    config, workdir = finished
    shutil.copytree(workdir, tmp_path / "run")
    config = type(config)(config.to_dict())
    return config, tmp_path / "run"


def snapshot(workdir):
    """Every file's bytes and mtime: what a refused or idle run must leave alone."""
    return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def data_files(step_dir):
    return [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]


def test_a_damaged_latest_checkpoint_is_refused_naming_it_and_the_intact_one(run):
    config, workdir = run
    for path in data_files(workdir / "checkpoints" / "4"):
        path.unlink()
    before = snapshot(workdir)
    config.rm.num_steps = 6
    with pytest.raises(CheckpointDamaged) as error:
        train_reward_model(config, workdir)
    message = str(error.value)
    assert f"{workdir / 'checkpoints' / '4'} is damaged" in message
    assert "The newest intact checkpoint is step 2" in message
    assert "on_damaged_checkpoint='previous'" in message
    assert "different model or optimizer config" not in message  # not a config mismatch
    assert error.value.step == 4
    assert snapshot(workdir) == before  # nothing moved, nothing written


def test_on_damaged_previous_resumes_from_the_intact_step_and_keeps_the_damaged_one(
        run, finished, capsys):
    config, workdir = run
    shutil.rmtree(workdir / "checkpoints" / "4" / "extra")
    truncated = max(data_files(workdir / "checkpoints" / "4"), key=lambda p: p.stat().st_size)
    truncated.write_bytes(truncated.read_bytes()[:10])
    config.on_damaged_checkpoint = "previous"
    train_reward_model(config, workdir)
    out = capsys.readouterr().out
    assert "checkpoints/4 is damaged" in out and "moved it aside to" in out
    assert "resumed from step 2" in out
    assert (workdir / "checkpoints" / "4.damaged" / "state").is_dir()  # kept, not deleted
    assert not (workdir / "checkpoints" / "4.damaged" / "extra").exists()
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert steps == ["2", "4", "4.damaged"]
    # Steps 3-4 were trained again from step 2, exactly as the first time.
    assert recorded_losses(workdir) == recorded_losses(finished[1])


def test_num_steps_already_reached_says_so_and_rewrites_nothing(run, capsys):
    config, workdir = run
    before = snapshot(workdir)
    config.rm.num_steps = 2
    last = train_reward_model(config, workdir)
    out = capsys.readouterr().out
    assert (f"reward model: {workdir / 'checkpoints'} already has step 4 >= num_steps=2: "
            f"nothing to train, nothing in {workdir} rewritten; raise num_steps to train "
            f"further") in out
    assert snapshot(workdir) == before
    recorded = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == recorded["loss"] and recorded["step"] == 4


def test_a_fresh_start_moves_the_earlier_metrics_aside(run, capsys):
    config, workdir = run
    first = (workdir / "metrics.jsonl").read_text()
    shutil.rmtree(workdir / "checkpoints")  # e.g. deleted by hand, or keep_checkpoints=0
    config.rm.num_steps = 2
    train_reward_model(config, workdir)
    assert "moved it aside to metrics.1.jsonl and tensorboard.1/" in capsys.readouterr().out
    assert (workdir / "metrics.1.jsonl").read_text() == first
    assert [s for s, _ in recorded_losses(workdir)] == [1, 2]
    assert any((workdir / "tensorboard.1").iterdir())
    second = (workdir / "metrics.jsonl").read_text()
    shutil.rmtree(workdir / "checkpoints")
    train_reward_model(config, workdir)  # never over the older copy
    assert (workdir / "metrics.1.jsonl").read_text() == first
    assert (workdir / "metrics.2.jsonl").read_text() == second


def test_a_torn_last_metrics_line_is_dropped_on_resume(run, capsys):
    config, workdir = run
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    config.rm.num_steps = 5
    train_reward_model(config, workdir)
    assert "dropped the last line, cut short" in capsys.readouterr().out
    assert [s for s, _ in recorded_losses(workdir)] == [1, 2, 3, 4, 5]


def test_a_full_disk_at_restart_names_the_file_and_truncates_nothing(run, monkeypatch):
    config, workdir = run
    before = snapshot(workdir)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    config.rm.num_steps = 6
    with pytest.raises(OSError, match=rf"could not write {workdir / 'config.json'}: No space "
                                      rf"left on device\. Free disk space"):
        train_reward_model(config, workdir)
    assert snapshot(workdir) == before  # no truncated file, no temporary left behind


def test_write_file_keeps_the_old_content_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "model_config.json"
    write_file(path, "old\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=f"could not write {path}.*left as it was") as error:
        write_file(path, "new\n")
    assert error.value.errno == errno.ENOSPC
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_config.json"]


def test_every_file_of_a_workdir_has_the_usual_mode(run):
    _, workdir = run
    graphdef, params = nnx.split(GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))
    export(graphdef, TrainState(step=np.int32(4), params=params, opt_state=None),
           workdir / "hf", Tokenizer.tiny(), "test")
    cached_jsonl(workdir / "reference_responses.jsonl", "key", lambda: [{"reward": 1.0}],
                 "reference responses")
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {str(p.relative_to(workdir)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in workdir.rglob("*") if p.is_file()}
    assert {"hf/model.safetensors", "reference_responses.jsonl", "config.json",
            "metrics.jsonl", "tokenizer.json"} <= set(modes)
    assert {name: mode for name, mode in modes.items()
            if mode != oct(0o666 & ~umask)} == {}


def test_nan_parameters_are_never_exported(tmp_path):
    graphdef, params = nnx.split(GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))
    leaf = next(iter(nnx.to_flat_state(params)))[1]
    leaf.value = leaf.value.at[0].set(np.nan)
    with pytest.raises(FloatingPointError, match=rf"the parameters of step 7 hold NaN/Inf; "
                                                 rf"not exported to {tmp_path / 'hf'}"):
        export(graphdef, TrainState(step=np.int32(7), params=params, opt_state=None),
               tmp_path / "hf", Tokenizer.tiny(), "test")
    assert not (tmp_path / "hf").exists()
