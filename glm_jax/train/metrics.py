"""One metrics writer: a stdout summary line, `metrics.jsonl`, and TensorBoard event files.

The event files are written directly (TFRecord framing around hand-encoded `Event` protos), so
TensorBoard can read them without TensorFlow installed here.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from glm_jax.train.workdir import write_file


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, *, scalars: Mapping[str, float] | None = None,
           file_version: str | None = None) -> bytes:
    """An `tensorflow.Event` proto: wall_time=1 (double), step=2 (int64), file_version=3,
    summary=5 (Summary{value=1: Value{tag=1 (string), simple_value=2 (float)}})."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15"
                              + struct.pack("<f", value))
            for tag, value in scalars.items())
        out += _length_delimited(5, values)
    return out


class TensorBoardWriter:
    """Appends scalar summaries to an `events.out.tfevents.*` file."""

    def __init__(self, logdir: str | Path):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.glm_jax"
        self._file = open(self.path, "ab")  # noqa: SIM115 (kept open for the run)
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + record
                         + struct.pack("<I", _masked_crc32c(record)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write(_event(step, time.time(), scalars=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _to_python(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class MetricsWriter:
    """Writes each step's metrics to `workdir/metrics.jsonl`, TensorBoard, and (every
    `print_every` steps) a one-line stdout summary. Only the writing process should create
    one (process 0 in a multi-host run)."""

    def __init__(self, workdir: str | Path, *, print_every: int = 1, prefix: str = "",
                 resume_step: int | None = None, wandb: dict[str, Any] | None = None):
        """resume_step: for a training run, the step it (re)starts from; lines of later steps
        (written by a run that died after its last checkpoint) are dropped, so replayed steps
        are not logged twice. A run starting at step 0 in a workdir whose metrics.jsonl has
        lines (its checkpoints were deleted, or never kept) moves that file and tensorboard/
        aside to metrics.<n>.jsonl and tensorboard.<n>/, never over an older pair. None
        appends to the file as it is.
        wandb: `wandb.init` arguments (project, name, ...) to also log to Weights & Biases;
        the run id is kept in `workdir/wandb_run_id`, so a resumed run continues it."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if resume_step == 0 and path.exists() and path.read_text().strip():
            print(f"{path} holds the metrics of an earlier run, and this one starts at step 0: "
                  f"moved it aside to {_set_aside_earlier_run(self.workdir)}", flush=True)
        elif resume_step is not None and path.exists():
            write_file(path, "".join(line + "\n" for line in _records_up_to(path, resume_step)))
        self._jsonl = open(path, "a")  # noqa: SIM115
        self._tensorboard = TensorBoardWriter(self.workdir / "tensorboard")
        self.print_every = print_every
        self.prefix = prefix
        self._wandb = _start_wandb(self.workdir, wandb) if wandb else None

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        values = {key: _to_python(value) for key, value in metrics.items()}
        record = {"step": int(step), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {f"{self.prefix}{k}": float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        self._tensorboard.scalars(int(step), scalars)
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        if self.print_every and step % self.print_every == 0:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items()
                              if isinstance(v, int | float))
            print(f"{self.prefix}step {step}: {shown}", flush=True)
        return record

    def close(self) -> None:
        self._jsonl.close()
        self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def recorded_metrics(workdir: str | Path, step: int) -> dict[str, Any]:
    """The metrics `workdir/metrics.jsonl` holds for `step`, its lines merged (empty when
    there are none)."""
    path = Path(workdir) / "metrics.jsonl"
    out: dict[str, Any] = {}
    for line in _records_up_to(path, step) if path.exists() else []:
        record = json.loads(line)
        if record.pop("step", None) == step:
            out.update(record)
    return out


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` whose step is at most `step`. A last line that is not JSON (the
    run died while writing it) is dropped, with a notice; any other is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not JSON ({e}): repair or remove that "
                                 f"line, then run again") from e
            print(f"{path}:{number}: dropped the last line, cut short when a run died "
                  f"writing it", flush=True)
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept


def _set_aside_earlier_run(workdir: Path) -> str:
    """Renames metrics.jsonl (and tensorboard/) to the first free metrics.<n>.jsonl
    (tensorboard.<n>/); returns what was moved where, in words."""
    n = 1
    while (workdir / f"metrics.{n}.jsonl").exists() or (workdir / f"tensorboard.{n}").exists():
        n += 1
    moved = [f"metrics.{n}.jsonl"]
    (workdir / "metrics.jsonl").rename(workdir / moved[0])
    if (workdir / "tensorboard").exists():
        moved.append(f"tensorboard.{n}/")
        (workdir / "tensorboard").rename(workdir / f"tensorboard.{n}")
    return " and ".join(moved)


def _start_wandb(workdir: Path, settings: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ImportError("config.metrics.wandb_project is set but wandb is not installed: "
                          "pip install wandb (or leave wandb_project empty)") from e
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(id=run_id, resume="allow", dir=str(workdir), **settings)


def _short(value: float) -> str:
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"
