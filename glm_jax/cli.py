"""What every script in scripts/ shares on the command line.

`run(main)` runs a script's `main` so that a user error (a bad config field, a missing or
malformed input file, a busy or damaged work directory, a model that does not fit, a
diverged run) ends as one `error: <message>` on stderr and exit status 1, not a traceback;
`--debug` (or GLM_JAX_DEBUG=1) shows the traceback. Anything else (most likely a bug) keeps
its traceback. `define_flags()` gives the absl scripts `--config` (a config file, by default
the repository's configs/tiny.py wherever the script is run from, with
`--config.section.field=value` overrides) and `--debug`; `parse_flags` turns the flag errors
into one line too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from glm_jax.config import closest_fields, default_config

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
DEFAULT_CONFIG = REPO / "configs" / "tiny.py"
DEBUG_ENV = "GLM_JAX_DEBUG"
DEBUG_HELP = f"on an error, show its traceback (also: {DEBUG_ENV}=1)"
CONFIG_HELP = ("path/to/config.py, or path/to/config.py:preset (default: the repository's "
               "configs/tiny.py). Override any field with "
               "--config.section.field=value, e.g. --config.rm.num_steps=50; every field, its "
               "default and meaning: glm_jax/config.py (default_config)")
# The code whose ValueError / TypeError is a message to the user; raised inside a library
# they are most likely a bug here, and keep their traceback.
_OURS = (PACKAGE, REPO / "scripts", REPO / "configs")


def debug_requested() -> bool:
    """--debug on the command line, or GLM_JAX_DEBUG set to anything but "" / "0"."""
    from absl import flags

    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    if "debug" in flags.FLAGS and flags.FLAGS.is_parsed():
        return flags.FLAGS.debug
    return "--debug" in sys.argv[1:]


def _raised_by_us(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    where = Path(frames[-1].filename).resolve()
    return any(where.is_relative_to(ours) for ours in _OURS)


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is a message for the user (shown as one line) rather than a bug."""
    from glm_jax.train.checkpoint import CheckpointDamaged
    from glm_jax.train.workdir import WorkdirBusy

    if isinstance(error, (OSError, MemoryError, FloatingPointError, WorkdirBusy,
                          CheckpointDamaged)):
        return True
    return isinstance(error, (ValueError, TypeError)) and _raised_by_us(error)


def run(main: Callable[[list[str]], Any], *, absl: bool = True) -> None:
    """Runs a script's `main`: with absl flags (`define_flags`, `parse_flags`; `main` gets the
    arguments left after the flags), or with `absl=False` `main(sys.argv[1:])` for a script
    that parses its own arguments (argparse, with `add_debug_argument`). A user error
    (`is_user_error`) prints `error: <message>` and a hint at --debug to stderr and exits 1;
    with --debug, and for any other exception, the traceback shows. SystemExit (a
    preempted run's 0 included) and KeyboardInterrupt pass through untouched."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as e:
            if debug_requested() or not is_user_error(e):
                raise
            print(f"error: {e}\n(run with --debug, or {DEBUG_ENV}=1, to see the traceback)",
                  file=sys.stderr)
            sys.exit(1)

    if absl:
        from absl import app

        app.run(guarded, flags_parser=parse_flags)
    else:
        guarded(sys.argv[1:])


def add_debug_argument(parser: Any) -> None:
    """`--debug` for an argparse script run by `run(main, absl=False)`."""
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def define_flags(what: str = "the config file") -> None:
    """The absl flags every config-driven script has: `--config` (`what`: a file, default
    `DEFAULT_CONFIG`, with `--config.section.field=value` overrides) and `--debug`, listed by
    the script's --help. A misspelled override is one line naming the field and the closest
    valid names, not a traceback from inside ml_collections."""
    from absl import flags
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), f"{what}: {CONFIG_HELP}")
    except (AttributeError, KeyError) as e:
        _exit_on_unknown_override(sys.argv, e)
    flags.DEFINE_bool("debug", False, DEBUG_HELP)
    # --help lists the key flags of the main module (absl names it by sys.argv[0]); these are
    # defined here, so declare them the script's.
    for name in ("config", "debug"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `run`: a missing config file, a config file that fails to load
    and a bad flag value are each one `error:` line (exit 1)."""
    from absl import flags

    _check_config_path(argv)
    try:
        return flags.FLAGS(argv)
    except SystemExit:
        # absl's --help (and --helpfull, --helpshort, --helpxml) print the help, then exit 1.
        if any(_flag_name(arg) in _HELP_FLAGS for arg in _flag_args(argv)):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = str(e)
        if "Traceback" in message and not debug_requested():
            # The config file raised: its last line is the exception and its message.
            message = f"{message.splitlines()[0]} {message.strip().splitlines()[-1]}"
        sys.exit(f"error: {message}")
    except (AttributeError, KeyError) as e:
        _exit_on_unknown_override(argv, e)


_HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")


def _flag_args(argv: list[str]) -> list[str]:
    """The arguments of `argv` absl reads as flags: those before `--` (argv[0] is the
    program)."""
    args = argv[1:]
    return args[:args.index("--")] if "--" in args else args


def _flag_name(arg: str) -> str | None:
    return arg.lstrip("-").partition("=")[0] if arg.startswith("-") else None


def _config_arg(argv: list[str]) -> str | None:
    """The last `--config` value in `argv` (as absl reads it), or None without one."""
    args, value = _flag_args(argv), None
    for i, arg in enumerate(args):
        if _flag_name(arg) == "config":
            _, eq, rest = arg.partition("=")
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _check_config_path(argv: list[str]) -> None:
    """Exits with one line when the config file to load does not exist."""
    value = _config_arg(argv)
    if value is None:
        if not DEFAULT_CONFIG.is_file():
            sys.exit(f"error: no --config given, and the default {DEFAULT_CONFIG} does not "
                     "exist (glm_jax installed without its configs/ directory?): give one, "
                     "e.g. --config path/to/configs/tiny.py")
        return
    file, colon, preset = value.partition(":")
    path = Path(file)
    if path.is_file():
        return
    bundled = REPO / "configs" / path.name
    example = f"{bundled if bundled.is_file() else DEFAULT_CONFIG}{colon}{preset}"
    sys.exit(f"error: --config {value}: there is no file {path.absolute()} (a relative path "
             f"is read from the current directory, {Path.cwd()}); give an existing config "
             f"file, e.g. --config {example}")


def _exit_on_unknown_override(argv: list[str], error: Exception) -> None:
    """Exits with one line for the first `--config.a.b=...` that names no field."""
    schema = default_config()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=")[0].split(".")
        section = schema
        for depth, key in enumerate(path):
            if not isinstance(section, ConfigDict) or key not in section:
                where = ".".join(["config", *path[:depth]])
                valid = list(section) if isinstance(section, ConfigDict) else []
                sys.exit(f"error: {arg}: config.{'.'.join(path[:depth + 1])} is not a field "
                         f"of {where}; {closest_fields(key, valid)}")
            section = section[key]
    raise error
