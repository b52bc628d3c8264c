"""Files computed once and kept in the workdir, tied to the settings they were computed with.

Each is a JSONL a user can open, next to a record of what its lines depend on. Two policies,
for two kinds of file:

- `cached_jsonl` (PPO's reference responses and prompt filter): a pure cache. A `.key` file
  beside it holds a hash of everything the records depend on (prompts, checkpoints, sampling
  settings, seed); when the key differs the records are computed again. The key is written
  after the records, so an interrupted write is recomputed, never half-read.
- `fixed_jsonl` (DPO's reward-built pairs, best-of-n's winners): training data. A resumed run
  must train on the data it started on, so once written the file is reused as it is, and a run
  with other settings is refused, naming the settings that differ. The settings are written
  (as JSON) before the records, so a records file never exists without them.

Both are multi-process aware (the workdir on a filesystem the processes share): process 0
decides whether to reuse, all processes compute (sampling is a collective program), and only
process 0 writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from glm_jax.data.records import write_jsonl
from glm_jax.train.workdir import write_file

Records = list[dict[str, Any]]


def fingerprint(path: str | Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under `path` (or of the file itself): it
    changes when a checkpoint is rewritten, and costs no read of the weights."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)) if p != path else p.name, (st := p.stat()).st_size,
             st.st_mtime_ns) for p in files]


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _process_zero_says(flag: bool) -> bool:
    """Process 0's `flag` on every process: they all take the same branch of a collective."""
    if jax.process_count() > 1:
        return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
    return flag


def _wait_for_process_zero(path: Path) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"wrote {path}")


def _read(path: Path, what: str) -> Records:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    print(f"{what}: reusing {len(records)} records of {path}")
    return records


def cached_jsonl(path: str | Path, key: str, compute: Callable[[], Records],
                 what: str) -> Records:
    """The records in `path` if its `.key` file holds `key`; else `compute()`, written to
    `path` (atomically) and then the key."""
    path = Path(path)
    key_path = path.with_name(path.name + ".key")
    if _process_zero_says(path.exists() and key_path.exists()
                          and key_path.read_text().strip() == key):
        return _read(path, what)
    records = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        key_path.unlink(missing_ok=True)
        write_jsonl(path, records)
        write_file(key_path, key + "\n")
        print(f"{what}: wrote {path}")
    _wait_for_process_zero(path)
    return records


def fixed_jsonl(path: str | Path, settings: dict[str, Any],
                compute: Callable[[], tuple[Records, dict[str, Any]]], *,
                settings_path: str | Path, settings_key: str | None = None, what: str,
                remedy: str) -> Records:
    """The records in `path`, computed once: when `path` exists they are read back, after
    checking that the settings recorded in `settings_path` equal `settings`; else
    `records, summary = compute()` and, on process 0, `settings_path` (then `path`) written.

    settings_key: None when `settings_path` holds the settings alone (as `settings`); else the
      key under which it holds them, beside the `summary` that `compute` returns (ignored
      with `settings_key` None). A records file whose settings file is missing is refused;
      one whose settings file lacks `settings_key` is reused as it is.
    settings: JSON-ready and in the form a JSON round trip gives (tuples as lists), so a
      rerun with the same settings compares equal.
    remedy: what the user can do when the settings differ, ends the ValueError raised then.
    """
    path, settings_path = Path(path), Path(settings_path)
    if _process_zero_says(path.exists()):
        saved = json.loads(settings_path.read_text()) if settings_path.exists() else {}
        if settings_key is not None:
            saved = saved.get(settings_key)
        if saved is not None and saved != settings:
            changed = sorted(k for k in settings.keys() | saved.keys()
                             if settings.get(k) != saved.get(k))
            raise ValueError(f"{path} was built with other settings (differing: "
                             f"{', '.join(changed)}; see {settings_path}): {remedy}")
        return _read(path, what)
    records, summary = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(settings_path, json.dumps(
            settings if settings_key is None else {**summary, settings_key: settings},
            indent=2) + "\n")
        write_jsonl(path, records)
        print(f"{what}: wrote {path}")
    _wait_for_process_zero(path)
    return records
