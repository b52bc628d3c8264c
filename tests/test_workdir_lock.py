"""One run per workdir: a second run is refused naming the holder and touches nothing; a lock
whose holder is gone is taken over; the lock goes when the run ends, however it ends."""

import json
import socket
import subprocess
import sys
import time

import pytest

from glm_jax.train.workdir import LOCK_NAME, WorkdirBusy, hold_workdir

HOLDER = """
import sys, time
from glm_jax.train.workdir import hold_workdir
with hold_workdir(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_holder_and_writes_nothing(tmp_path):
    from conftest import tiny_rm_config

    from glm_jax.train.reward import train_reward_model

    workdir = tmp_path / "rm"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = sorted(p.name for p in workdir.iterdir())
        config = tiny_rm_config(tmp_path, num_steps=2, eval_every=0, eval_file="")
        with pytest.raises(WorkdirBusy, match=rf"{workdir} is in use by another glm_jax run "
                                              rf"\(pid {holder.pid} on {socket.gethostname()}"):
            train_reward_model(config, workdir)
        assert sorted(p.name for p in workdir.iterdir()) == before == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_run_that_is_gone_is_taken_over_and_released(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "started": "earlier"}))
    with hold_workdir(tmp_path):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] != gone.pid
    assert "taking over the lock of a run that is gone" in capsys.readouterr().out
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(ValueError, match="boom"), hold_workdir(tmp_path):
        raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with hold_workdir(tmp_path):  # free again
        pass
    # A workdir the run created and left empty (refused before writing) is removed again.
    with pytest.raises(ValueError, match="bad config"), hold_workdir(tmp_path / "new"):
        raise ValueError("bad config")
    assert not (tmp_path / "new").exists()


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 1, "host": "some-other-host", "started": time.strftime("%H:%M")}))
    with pytest.raises(WorkdirBusy, match=r"pid 1 on some-other-host.*If that run is gone, "
                                          rf"delete {tmp_path / LOCK_NAME}"), \
            hold_workdir(tmp_path):
        pass
    assert (tmp_path / LOCK_NAME).exists()
