"""Record types for preference, SFT and prompt data, and validated JSONL reading/writing.

One JSON object per line. Field names match the dataclass fields; ``history`` is a list of
``[user, assistant]`` string pairs (earlier turns of the dialogue). Unknown fields are ignored, so
files may carry extra metadata. ``system`` is an optional system message, rendered before the
dialogue by the chat template. ``null`` is accepted for the optional ``task``, ``id`` and
``system``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

History = tuple[tuple[str, str], ...]
RecordKind = Literal["preference", "sft", "prompt"]


class DataError(ValueError):
    """A bad input record; the message is ``"{path}:{line}: {field}: {what is wrong}"``."""


def _history_json(history: History) -> list[list[str]]:
    return [[user, assistant] for user, assistant in history]


@dataclass(frozen=True)
class PreferencePair:
    """One human comparison: ``chosen`` was preferred to ``rejected`` (unless ``tie``)."""

    prompt: str
    chosen: str
    rejected: str
    history: History = ()
    task: str | None = None
    tie: bool = False
    id: str | None = None
    system: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; fields at their default are left out."""
        out: dict[str, Any] = {
            "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
        }
        if self.system is not None:
            out["system"] = self.system
        if self.history:
            out["history"] = _history_json(self.history)
        if self.task is not None:
            out["task"] = self.task
        if self.tie:
            out["tie"] = True
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True)
class SFTExample:
    """A supervised (prompt, response) example."""

    prompt: str
    response: str
    history: History = ()
    task: str | None = None
    system: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; fields at their default are left out."""
        out: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        if self.system is not None:
            out["system"] = self.system
        if self.history:
            out["history"] = _history_json(self.history)
        if self.task is not None:
            out["task"] = self.task
        return out


@dataclass(frozen=True)
class PromptExample:
    """A prompt (with optional dialogue history) for policy training or evaluation."""

    prompt: str
    history: History = ()
    task: str | None = None
    system: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; fields at their default are left out."""
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.system is not None:
            out["system"] = self.system
        if self.history:
            out["history"] = _history_json(self.history)
        if self.task is not None:
            out["task"] = self.task
        return out


Record = PreferencePair | SFTExample | PromptExample


@dataclass(frozen=True)
class ReadReport:
    """What ``read_jsonl`` did: records returned, bad lines skipped (1-based line numbers)."""

    num_read: int
    num_skipped: int
    first_skipped_lines: list[int]
    first_error: str | None

    def print_skipped(self, path: str | os.PathLike) -> None:
        """Says how many bad lines of `path` were skipped, if any (with ``on_error="skip"``)."""
        if self.num_skipped:
            print(f"{path}: skipped {self.num_skipped} bad lines "
                  f"(first: {self.first_skipped_lines})")


# kind -> (record class, required text fields, optional text fields, non-empty text fields)
_SCHEMAS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "preference": (PreferencePair, ("prompt", "chosen", "rejected"), ("task", "id", "system"),
                   ("chosen", "rejected")),
    "sft": (SFTExample, ("prompt", "response"), ("task", "system"), ("response",)),
    "prompt": (PromptExample, ("prompt",), ("task", "system"), ()),
}

_JSON_TYPE_NAMES = {
    type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
    list: "array", dict: "object",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


class _FieldError(Exception):
    def __init__(self, field: str | None, what: str) -> None:
        super().__init__(what if field is None else f"{field}: {what}")


def _parse_history(value: Any) -> History:
    if not isinstance(value, list):
        raise _FieldError("history", f"expected an array of [user, assistant] pairs, "
                                     f"got {_json_type(value)}")
    turns = []
    for index, entry in enumerate(value):
        if not (isinstance(entry, list) and len(entry) == 2
                and all(isinstance(x, str) for x in entry)):
            raise _FieldError(f"history[{index}]", "expected a [user, assistant] pair of "
                                                   f"strings, got {json.dumps(entry)[:80]}")
        turns.append((entry[0], entry[1]))
    return tuple(turns)


def _parse_record(obj: Any, kind: str) -> Record:
    if not isinstance(obj, dict):
        raise _FieldError(None, f"expected a JSON object, got {_json_type(obj)}")
    cls, required, optional, non_empty = _SCHEMAS[kind]
    kwargs: dict[str, Any] = {}
    for name in required:
        if name not in obj:
            raise _FieldError(name, "missing required field")
        kwargs[name] = obj[name]
    for name in optional:
        if obj.get(name) is not None:  # null means "not given" for optional strings
            kwargs[name] = obj[name]
    for name, value in kwargs.items():
        if not isinstance(value, str):
            raise _FieldError(name, f"expected a string, got {_json_type(value)}")
    for name in non_empty:
        if not kwargs[name].strip():
            raise _FieldError(name, "empty or whitespace-only")
    if "history" in obj:
        kwargs["history"] = _parse_history(obj["history"])
    if kind == "preference" and "tie" in obj:
        if not isinstance(obj["tie"], bool):
            raise _FieldError("tie", f"expected a boolean, got {_json_type(obj['tie'])}")
        kwargs["tie"] = obj["tie"]
    return cls(**kwargs)


def read_jsonl(
    path: str | os.PathLike,
    kind: RecordKind,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    field: str | None = None,
) -> tuple[list[Record], ReadReport]:
    """Read and validate a JSONL file of ``kind`` records.

    Blank lines are ignored. A bad line (invalid UTF-8, invalid JSON, not an object, a missing
    required field, a field of the wrong type, an empty chosen/rejected/response) raises
    ``DataError`` naming ``path:line: field`` with ``on_error="raise"``, and is counted in the
    report and skipped with ``on_error="skip"``.

    ``field`` names the config field the path came from (e.g. ``"config.rm.train_file"``): with
    it, a missing file raises ``FileNotFoundError`` and a file without a single valid record
    raises ``DataError``, both naming the field and the path.
    """
    if kind not in _SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(_SCHEMAS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if field is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{field} = {str(path)!r} does not exist (or is not a file): "
                                f"set it to a {kind} JSONL file")
    records: list[Record] = []
    skipped: list[int] = []
    first_error: str | None = None
    # Bytes, decoded line by line: a bad byte is then a bad line like any other, with its
    # number, instead of an error for the whole file.
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = _decode_line(raw, path, line_number)
                if not line.strip():
                    continue
                try:
                    # Without the line break, an error at the end of the line reports that
                    # column (json would report line 2, column 1).
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_number}: invalid JSON: {e.msg} "
                                    f"(column {e.colno})") from None
                try:
                    records.append(_parse_record(obj, kind))
                except _FieldError as e:
                    raise DataError(f"{path}:{line_number}: {e}") from None
            except DataError as e:
                if on_error == "raise":
                    raise
                skipped.append(line_number)
                first_error = first_error or str(e)
    report = ReadReport(num_read=len(records), num_skipped=len(skipped),
                        first_skipped_lines=skipped[:5], first_error=first_error)
    if field is not None and not records:
        detail = (f": all {len(skipped)} lines are bad (first: {first_error})" if skipped
                  else " (the file is empty or blank)")
        raise DataError(f"{field} = {str(path)!r} has no records{detail}; point it at a "
                        f"JSONL file with one {kind} record per line")
    return records, report


def parse_records(objects: Iterable[Any], kind: RecordKind) -> list[Record]:
    """``kind`` records from JSON objects already in memory (e.g. a workdir's cached records),
    validated as ``read_jsonl`` validates a line; unknown fields are ignored. A bad object
    raises ``DataError`` naming its index."""
    records = []
    for index, obj in enumerate(objects):
        try:
            records.append(_parse_record(obj, kind))
        except _FieldError as e:
            raise DataError(f"record {index}: {e}") from None
    return records


def _decode_line(raw: bytes, path: str | os.PathLike, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at "
                        f"byte {e.start + 1} of the line): save the file as UTF-8") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[Record | dict[str, Any]]) -> None:
    """Write records (or plain dicts) one JSON object per line, atomically (temp file, then
    ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0o022)  # read it (and put it back): mkstemp's 0600 is not the usual mode
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                obj = record if isinstance(record, dict) else record.to_json()
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
