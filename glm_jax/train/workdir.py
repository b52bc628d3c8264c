"""One run per workdir: a lock file naming its holder (pid, host, start time).

Two runs writing one workdir corrupt it (one dies inside orbax, the other's metrics file is
replaced), so every training entry point holds its workdir for the whole run: a second run is
refused with a message naming the holder; a lock whose holder is gone (same host, no such
process) is taken over; the lock is removed when the run ends, however it ends.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax

from glm_jax.sharding import initialize_distributed

LOCK_NAME = ".glm_jax.lock"


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir."""


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_running(holder: dict[str, Any]) -> bool:
    """Whether the holder may still be running: always on another host (it cannot be asked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextmanager
def hold_workdir(workdir: str | Path) -> Iterator[None]:
    """Holds `workdir` (created if missing, and removed again if the block leaves it empty)
    for the duration of the block; raises WorkdirBusy when a live run holds it. With several
    processes, process 0 holds it for all."""
    workdir = Path(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        yield
        return
    path = workdir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    # Written whole under a private name, then hard-linked into place: the link fails if a
    # lock exists, so two runs starting together cannot both take it, and a lock file is
    # never seen half-written.
    mine = workdir / f".glm_jax.lock.{me['host']}.{me['pid']}"
    mine.write_text(json.dumps(me))
    try:
        while True:
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                holder = _holder(path)
                if holder is not None and _is_running(holder):
                    raise WorkdirBusy(
                        f"{workdir} is in use by another glm_jax run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('started')}): wait for it to "
                        f"finish or use another --workdir. If that run is gone, delete "
                        f"{path}") from None
                print(f"{workdir}: taking over the lock of a run that is gone "
                      f"({holder or 'unreadable lock'})", flush=True)
                path.unlink(missing_ok=True)
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _holder(path) == me:
            path.unlink(missing_ok=True)
        if created and not any(workdir.iterdir()):  # a run refused before writing anything
            workdir.rmdir()


def write_file(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to `path` whole or not at all: a temporary sibling, flushed to disk, then
    renamed over `path`, so a full disk or a kill never leaves `path` truncated. The file gets
    the usual permissions (0o666 & ~umask), like every other file of a workdir. An OSError
    (ENOSPC, EACCES) names `path` and says it was left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # OSError(errno, ...) is the matching subclass again (PermissionError, ...).
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}. Free disk space "
                               f"or fix the permissions of {path.parent}, then run again "
                               f"({path} was left as it was)") from e


def set_aside(path: str | Path, name: Callable[[int], str]) -> Path:
    """Renames `path` to the sibling `name(n)` for the first n = 1, 2, ... that does not
    exist, never over anything; returns the new path."""
    path = Path(path)
    n = 1
    while (path.with_name(name(n))).exists():
        n += 1
    new = path.with_name(name(n))
    path.rename(new)
    return new


def holds_workdir(train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for `train(config, workdir, ...)`: the whole call holds `workdir` (after
    starting the multi-process runtime that config.distributed asks for)."""

    @functools.wraps(train)
    def wrapper(config: Any, workdir: str | Path, *args: Any, **kwargs: Any) -> Any:
        # Which process holds the lock is only known once the multi-process runtime is up,
        # and it must start before anything else touches the backend.
        initialize_distributed(**config.get("distributed", {}))
        with hold_workdir(workdir):
            return train(config, workdir, *args, **kwargs)

    return wrapper
