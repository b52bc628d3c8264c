r"""Converters from common preference/chat data formats to glm_jax records.

Three source formats, each read from JSONL (``.jsonl``, or gzipped ``.jsonl.gz``) or parquet
(``.parquet``, through ``pyarrow``, imported only then):

``hh``  Anthropic HH-RLHF transcripts -> ``PreferencePair``::

    {"chosen":   "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: Knock knock.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No."}

    Turns start at ``"\n\nHuman:"`` / ``"\n\nAssistant:"`` (one space after the colon is
    dropped); the two transcripts share every turn but the last Assistant turn.

``chosen_rejected``  message lists (UltraFeedback-binarized style) -> ``PreferencePair``::

    {"prompt": "Joke?",   # optional; when given, it must equal the last user turn
     "chosen":   [{"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "..."}],
     "rejected": [{"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "..."}]}

``messages``  OpenAI chat records -> ``SFTExample`` (ending with the assistant's turn) or
``PromptExample`` (ending with the user's turn)::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

In every format the turns alternate user, assistant, ... starting with the user (in message
lists, after an optional leading system message, which becomes the record's ``system``; an
empty one is dropped, and a system message anywhere else is skipped as unsupported).
The last user turn is the record's ``prompt``, the last assistant turn its response, and the
(user, assistant) pairs before them its ``history``. An ``id`` field (string or integer) becomes
a ``PreferencePair``'s id; SFT and prompt records have no id.

A record that cannot be converted is skipped and listed in the ``ConversionReport`` with a
reason and its location (``path:line`` for JSONL, ``path:row N`` for parquet, N counting from
0 as ``pyarrow`` and ``datasets`` index rows); with ``strict=True`` the first one raises
``DataError`` ``"{location}: {field}: {what is wrong}"`` instead.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glm_jax.data.records import (
    DataError,
    History,
    PreferencePair,
    PromptExample,
    Record,
    RecordKind,
    SFTExample,
    _json_type,
)

SourceFormat = Literal["hh", "chosen_rejected", "messages"]


class ConversionError(DataError):
    """A source record that cannot be converted. ``field`` names the part at fault (e.g.
    ``"chosen[3].content"``; None for the whole record), ``reason`` is the short category the
    ``ConversionReport`` counts skips by (e.g. ``"system message"``)."""

    def __init__(self, field: str | None, what: str, reason: str) -> None:
        self.field, self.what, self.reason = field, what, reason
        super().__init__(what if field is None else f"{field}: {what}")


@dataclass(frozen=True)
class Dialogue:
    """Alternating user/assistant turns split as glm_jax records hold them."""

    history: History  # the (user, assistant) pairs before the last user turn
    prompt: str  # the last user turn
    response: str | None  # the assistant turn after it; None when the user's turn is last
    system: str | None = None  # a leading system message


def _dialogue(contents: list[str], system: str | None = None) -> Dialogue:
    """The Dialogue of already-validated alternating turns (user first)."""
    if len(contents) % 2 == 0:
        earlier, prompt, response = contents[:-2], contents[-2], contents[-1]
    else:
        earlier, prompt, response = contents[:-1], contents[-1], None
    return Dialogue(tuple(zip(earlier[0::2], earlier[1::2], strict=True)), prompt, response,
                    system)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: Any, field: str = "transcript") -> Dialogue:
    """Splits an HH-RLHF transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into turns.

    The leading ``"\\n\\n"`` may be missing. Turn text is kept verbatim (only the one space after
    ``Human:``/``Assistant:`` is dropped); ``"Human:"`` inside a turn is only a new turn after a
    blank line, as in the format itself. Raises ``ConversionError`` naming ``field``.
    """
    if not isinstance(text, str):
        raise ConversionError(field, f"expected a string (an HH transcript), got "
                                     f"{_json_type(text)}", "wrong type")
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) == 1:
        raise ConversionError(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns in "
                                     f"{text[:60]!r}", "no turns")
    if parts[0].strip():
        raise ConversionError(field, f"text before the first turn: {text[:60]!r}",
                              "unparsable transcript")
    names, contents = parts[1::2], parts[2::2]
    for index, name in enumerate(names):
        expected = "Human" if index % 2 == 0 else "Assistant"
        if name != expected:
            raise ConversionError(field, f"turn {index + 1} is {name}:, expected {expected}: "
                                         "(turns alternate Human:, Assistant:, ... from the "
                                         "first)", "turns not alternating")
    return _dialogue(contents)


_ROLES = ("user", "assistant", "system")


def parse_messages(messages: Any, field: str = "messages") -> Dialogue:
    """Splits a list of ``{"role": "user"|"assistant"|"system", "content": str}`` messages.

    A leading system message becomes the dialogue's ``system`` (dropped when its content is
    empty); a system message anywhere else raises ``ConversionError`` (reason
    ``"system message"``): chat templates render one system message, before the dialogue.
    Other keys of a message are ignored. Errors name the message, e.g. ``chosen[3].content``.
    """
    if not isinstance(messages, list):
        raise ConversionError(field, f"expected an array of messages, got "
                              f"{_json_type(messages)}", "wrong type")
    contents: list[str] = []
    system: str | None = None
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise ConversionError(where, 'expected a {"role": ..., "content": ...} object, '
                                         f"got {_json_type(message)}", "wrong type")
        for key in ("role", "content"):
            if key not in message:
                raise ConversionError(f"{where}.{key}", "missing required field",
                                      "missing field")
            if not isinstance(message[key], str):
                raise ConversionError(f"{where}.{key}", f"expected a string, got "
                                      f"{_json_type(message[key])}", "wrong type")
        role, content = message["role"], message["content"]
        if role not in _ROLES:
            raise ConversionError(f"{where}.role", f"expected one of {list(_ROLES)}, got "
                                                   f"{role!r}", "unknown role")
        if role == "system":
            if index != 0:
                raise ConversionError(where, "a system message after the first message is not "
                                             "supported (records carry one, before the dialogue)",
                                      "system message")
            system = content if content.strip() else None
            continue
        expected = "user" if len(contents) % 2 == 0 else "assistant"
        if role != expected:
            raise ConversionError(f"{where}.role", f"expected {expected!r}, got {role!r} "
                                  "(turns alternate user, assistant, ... from the first, after "
                                  "an optional leading system message)", "turns not alternating")
        contents.append(content)
    if not contents:
        raise ConversionError(field, "no user or assistant messages", "no turns")
    return _dialogue(contents, system)


def _require(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise ConversionError(name, "missing required field", "missing field")
    return obj[name]


def _record_id(obj: dict[str, Any]) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConversionError("id", f"expected a string or an integer, got {_json_type(value)}",
                              "wrong type")
    return str(value)


def _pair(obj: dict[str, Any], parse: Callable[[Any, str], Dialogue], last_turn: str,
          response_field: Callable[[str, str], str]) -> PreferencePair:
    """The PreferencePair of a chosen/rejected record whose sides ``parse`` splits.
    ``response_field(side, "role" | "content")`` names a side's last turn in errors."""
    chosen, rejected = (parse(_require(obj, side), side) for side in ("chosen", "rejected"))
    for side, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if dialogue.response is None:
            raise ConversionError(response_field(side, "role"), f"the last turn is the user's; "
                                  f"expected {last_turn} (the response)", "wrong last turn")
        if not dialogue.response.strip():
            raise ConversionError(response_field(side, "content"), "the response is empty or "
                                  "whitespace-only", "empty response")
    context = [*(turn for pair in chosen.history for turn in pair), chosen.prompt]
    other = [*(turn for pair in rejected.history for turn in pair), rejected.prompt]
    if context != other:
        first = next((i for i, (a, b) in enumerate(zip(context, other, strict=False)) if a != b),
                     min(len(context), len(other)))
        raise ConversionError("rejected", f"its turns before the response differ from chosen's "
                              f"(first at turn {first + 1}; chosen has {len(context)} such turns, "
                              f"rejected {len(other)})", "different context")
    if chosen.response.strip() == rejected.response.strip():
        raise ConversionError("rejected", "the same response as chosen", "identical responses")
    if chosen.system != rejected.system:
        raise ConversionError("rejected", "its system message differs from chosen's",
                              "different context")
    return PreferencePair(prompt=chosen.prompt, chosen=chosen.response,
                          rejected=rejected.response, history=chosen.history,
                          id=_record_id(obj), system=chosen.system)


def _hh_pair(obj: dict[str, Any]) -> PreferencePair:
    return _pair(obj, parse_hh_transcript, "Assistant:", lambda side, _: side)


def _chosen_rejected_pair(obj: dict[str, Any]) -> PreferencePair:
    def response_field(side: str, key: str) -> str:
        return f"{side}[{len(obj[side]) - 1}].{key}"

    pair = _pair(obj, parse_messages, "an assistant message", response_field)
    prompt = obj.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConversionError("prompt", f"expected a string, got {_json_type(prompt)}",
                                  "wrong type")
        if prompt != pair.prompt:
            raise ConversionError("prompt", f"{prompt[:60]!r} is not the last user turn "
                                  f"({pair.prompt[:60]!r})", "prompt mismatch")
    return pair


def _messages_dialogue(obj: dict[str, Any], last: Literal["user", "assistant"]) -> Dialogue:
    messages = _require(obj, "messages")
    dialogue = parse_messages(messages, "messages")
    if (dialogue.response is None) != (last == "user"):
        other = "assistant" if last == "user" else "user"
        raise ConversionError(f"messages[{len(messages) - 1}].role", f"the last turn is the "
                              f"{other}'s; expected the {last}'s", "wrong last turn")
    return dialogue


def _messages_sft(obj: dict[str, Any]) -> SFTExample:
    dialogue = _messages_dialogue(obj, "assistant")
    if not dialogue.response.strip():
        raise ConversionError(f"messages[{len(obj['messages']) - 1}].content",
                              "the response is empty or whitespace-only", "empty response")
    return SFTExample(dialogue.prompt, dialogue.response, dialogue.history,
                      system=dialogue.system)


def _messages_prompt(obj: dict[str, Any]) -> PromptExample:
    dialogue = _messages_dialogue(obj, "user")
    return PromptExample(dialogue.prompt, dialogue.history, system=dialogue.system)


_CONVERTERS: dict[tuple[str, str], Callable[[dict[str, Any]], Record]] = {
    ("hh", "preference"): _hh_pair,
    ("chosen_rejected", "preference"): _chosen_rejected_pair,
    ("messages", "sft"): _messages_sft,
    ("messages", "prompt"): _messages_prompt,
}
SOURCE_FORMATS = ("hh", "chosen_rejected", "messages")


def _check_format(source_format: str, kind: str) -> None:
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"unknown source format {source_format!r}; expected one of "
                         f"{list(SOURCE_FORMATS)}")
    if (source_format, kind) not in _CONVERTERS:
        kinds = [k for f, k in _CONVERTERS if f == source_format]
        raise ValueError(f"format {source_format!r} converts to {' or '.join(map(repr, kinds))} "
                         f"records, not {kind!r}")


def convert_record(obj: Any, source_format: SourceFormat, kind: RecordKind) -> Record:
    """One source object (a parsed JSON line or parquet row) as a glm_jax ``kind`` record.
    Raises ``ConversionError`` (a ``DataError``) naming the field at fault, ``ValueError`` for
    a format/kind pair that does not exist (``hh`` and ``chosen_rejected`` give
    ``preference``; ``messages`` gives ``sft`` or ``prompt``)."""
    _check_format(source_format, kind)
    if not isinstance(obj, dict):
        raise ConversionError(None, f"expected a JSON object, got {_json_type(obj)}",
                              "wrong type")
    return _CONVERTERS[source_format, kind](obj)


@dataclass(frozen=True)
class Skip:
    """A source record that was not converted."""

    reason: str  # the category, e.g. "identical responses"
    location: str  # "path:line" or "path:row N"
    detail: str  # "field: what is wrong"

    def __str__(self) -> str:
        return f"{self.location}: {self.detail}"


@dataclass
class ConversionReport:
    """What ``convert_file`` did: records converted, and every record skipped."""

    num_converted: int = 0
    skipped: list[Skip] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def by_reason(self) -> dict[str, list[Skip]]:
        """Skips grouped by reason, the most frequent reason first."""
        groups: dict[str, list[Skip]] = {}
        for skip in self.skipped:
            groups.setdefault(skip.reason, []).append(skip)
        return dict(sorted(groups.items(), key=lambda item: -len(item[1])))

    def format(self, max_locations: int = 3) -> str:
        """Lines for a person: counts, then per skip reason its count, first locations and
        first message."""
        total = self.num_converted + self.num_skipped
        lines = [f"converted {self.num_converted} of {total} records"]
        if self.skipped:
            lines.append(f"skipped {self.num_skipped}:")
        for reason, skips in self.by_reason().items():
            shown = ", ".join(s.location for s in skips[:max_locations])
            hidden = len(skips) - max_locations
            more = f", ... ({hidden} more)" if hidden > 0 else ""
            lines.append(f"  {reason}: {len(skips)} ({shown}{more}); first: {skips[0].detail}")
        return "\n".join(lines)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, object) per non-blank line; an unreadable line's object is its
    ConversionError."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield location, ConversionError(None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} "
                                                      f"at byte {e.start + 1} of the line)",
                                                "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield location, ConversionError(None, f"invalid JSON: {e.msg} (column {e.colno})",
                                                "invalid JSON")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row as a dict) per row, rows counted from 0."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ModuleNotFoundError(f"{path}: reading parquet files needs the pyarrow package, "
                                  "which is not installed: pip install 'pyarrow>=15'",
                                  name="pyarrow") from e
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}:row {number}", row
            number += 1


def convert_file(path: str | os.PathLike, source_format: SourceFormat, kind: RecordKind, *,
                 strict: bool = False) -> tuple[list[Record], ConversionReport]:
    """Converts every record of a ``.parquet`` file, or else a JSONL file (gzipped when its
    name ends in ``.gz``); blank lines are ignored. Records that cannot be converted are
    skipped and listed in the report, or with ``strict=True`` the first raises ``DataError``
    ``"{path}:{line}: {field}: {what is wrong}"`` (``{path}:row {N}: ...`` for parquet)."""
    _check_format(source_format, kind)
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    records: list[Record] = []
    report = ConversionReport()
    for location, obj in rows:
        try:
            if isinstance(obj, ConversionError):
                raise obj
            records.append(convert_record(obj, source_format, kind))
        except ConversionError as e:
            if strict:
                raise DataError(f"{location}: {e}") from None
            report.skipped.append(Skip(e.reason, location, str(e)))
    report.num_converted = len(records)
    return records, report
