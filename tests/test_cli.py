"""The scripts' command line: user errors as one `error:` line (the traceback with --debug),
--help, and finding the config file. Each subprocess fails before any model is built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glm_jax import cli
from glm_jax.config import MESH_PRESETS, mesh_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
HINT = "(run with --debug, or GLM_JAX_DEBUG=1, to see the traceback)"


def script(name, *args, cwd=ROOT, debug_env=False):
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    if debug_env:
        env[cli.DEBUG_ENV] = "1"
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_error(result, *expected):
    """Exit 1, stderr holds `error: ...` with each expected text, the hint, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], result.stderr


def test_malformed_jsonl_is_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    args = ("--workdir", tmp_path / "rm", f"--config.rm.train_file={bad}")
    result = script("train_rm.py", *args)
    assert_one_error(result, f"{bad}:2")
    assert HINT in result.stderr
    for debug in (script("train_rm.py", *args, "--debug"),
                  script("train_rm.py", *args, debug_env=True)):
        assert debug.returncode == 1
        assert "Traceback" in debug.stderr and f"DataError: {bad}:2" in debug.stderr
    assert not (tmp_path / "rm").exists()


def test_missing_train_file_is_one_line(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = script("train_rm.py", "--workdir", tmp_path / "rm",
                    f"--config.rm.train_file={missing}")
    assert_one_error(result, "config.rm.train_file", str(missing))
    assert not (tmp_path / "rm").exists()


def test_argparse_script_error_is_one_line(tmp_path):
    result = script("prepare_preferences.py", "--input", tmp_path / "raw.jsonl",
                    "--output", tmp_path / "clean.jsonl")
    assert_one_error(result, str(tmp_path / "raw.jsonl"))
    assert not (tmp_path / "clean.jsonl").exists()


@pytest.mark.parametrize("name,flags", [
    ("train_sft.py", ["--workdir"]), ("train_rm.py", ["--workdir"]),
    ("train_dpo.py", ["--workdir"]), ("train_ppo.py", ["--workdir"]),
    ("train_rsft.py", ["--workdir"]), ("run_pipeline.py", ["--workdir", "--[no]force"]),
    ("eval_rm.py", ["--workdir", "--pairs", "--responses", "--scores_output"])])
def test_help_lists_the_flags(name, flags):
    result = script(name, "--help")
    assert result.returncode == 0, result.stderr
    for text in ("--config:", "--config.section.field=value", "glm_jax/config.py",
                 "--[no]debug", *flags):
        assert text in result.stdout, (text, result.stdout)


def test_argparse_help_lists_debug():
    for name in ("generate.py", "prepare_preferences.py", "make_tiny_tokenizer.py"):
        result = script(name, "--help")
        assert result.returncode == 0 and "--debug" in result.stdout, result.stdout


def test_missing_config_file_names_it_and_the_fix(tmp_path):
    result = script("train_rm.py", "--workdir", tmp_path / "rm", "--config",
                    "configs/tiny.py:gpu1", cwd=tmp_path)
    assert_one_error(result, f"there is no file {tmp_path / 'configs' / 'tiny.py'}",
                     f"current directory, {tmp_path}",
                     f"--config {ROOT / 'configs' / 'tiny.py'}:gpu1")
    result = script("train_rm.py", "--workdir", tmp_path / "rm", "--config=nope.py")
    assert_one_error(result, f"there is no file {ROOT / 'nope.py'}")
    assert not (tmp_path / "rm").exists()


def test_default_config_is_found_from_another_directory(tmp_path):
    # The override and its range check prove that configs/tiny.py was loaded.
    result = script("train_rm.py", "--workdir", tmp_path / "rm", "--config.rm.num_steps=0",
                    cwd=tmp_path)
    assert_one_error(result, "config.rm.num_steps = 0: must be >= 1")


def test_config_file_that_raises_is_one_line(tmp_path):
    result = script("train_rm.py", "--workdir", tmp_path / "rm", "--config",
                    f"{ROOT / 'configs' / 'tiny.py'}:tpu9")
    assert_one_error(result, "ValueError: unknown mesh preset 'tpu9'")


# In-process: what `run` does with each kind of exception.

def run_raising(monkeypatch, error_or_fn, *argv):
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def main(args):
        if callable(error_or_fn):
            error_or_fn()
        raise error_or_fn

    cli.run(main, absl=False)


def test_user_error_from_our_code_exits_1_with_one_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_raising(monkeypatch, lambda: mesh_preset("tpu9"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    presets = sorted(MESH_PRESETS)
    assert err == f"error: unknown mesh preset 'tpu9'; choose one of {presets}\n{HINT}\n"


@pytest.mark.parametrize("error", [FloatingPointError("loss is NaN"),
                                   MemoryError("needs 90 GiB"),
                                   FileNotFoundError(2, "No such file", "x.jsonl")])
def test_named_user_errors_exit_1(monkeypatch, capsys, error):
    with pytest.raises(SystemExit) as exit_:
        run_raising(monkeypatch, error)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines()[0] == f"error: {error}"


def test_debug_and_bugs_keep_the_exception(monkeypatch):
    with pytest.raises(ValueError, match="unknown mesh preset"):
        run_raising(monkeypatch, lambda: mesh_preset("tpu9"), "--debug")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown mesh preset"):
        cli.run(lambda argv: mesh_preset("tpu9"), absl=False)
    # A ValueError raised outside glm_jax (here int()) is most likely a bug: traceback.
    with pytest.raises(ValueError, match="invalid literal"):
        run_raising(monkeypatch, lambda: int("x"))
    with pytest.raises(RuntimeError, match="bug"):
        run_raising(monkeypatch, RuntimeError("bug"))


def test_preemption_exit_and_interrupt_pass_through(monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        run_raising(monkeypatch, SystemExit(0))
    assert exit_.value.code == 0
    with pytest.raises(KeyboardInterrupt):
        run_raising(monkeypatch, KeyboardInterrupt())
