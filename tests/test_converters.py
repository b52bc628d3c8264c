"""Converters from HH-RLHF transcripts, chosen/rejected message lists and OpenAI `messages`
records to glm_jax records, from JSONL and parquet files, and the convert_preferences CLI."""

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from glm_jax.data import (
    ConversionError,
    ConversionReport,
    DataError,
    Dialogue,
    PreferencePair,
    PromptExample,
    SFTExample,
    Skip,
    convert_file,
    convert_record,
    parse_hh_transcript,
    parse_messages,
    read_jsonl,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_preferences.py"
sys.path.insert(0, str(ROOT / "scripts"))
import convert_preferences  # noqa: E402


class Skipped(NamedTuple):
    """An expected skip: its reason and the start of its "field: what is wrong" detail."""

    reason: str
    detail: str


def hh(*turns: str) -> str:
    """An HH transcript of alternating Human/Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}"
                   for i, text in enumerate(turns))


def msgs(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Alternating user/assistant messages, after a system message when given."""
    out = [] if system is None else [{"role": "system", "content": system}]
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": text}
                  for i, text in enumerate(turns)]


FAKE_HH = "\n\nHuman: fake\n\nAssistant: fake"

# (source object, expected record or Skipped); every row is writable to parquet as well.
HH_ROWS = [
    ({"id": 7, "chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Go away.")},
     PreferencePair("Hi", "Hello!", "Go away.", id="7")),
    ({"id": 8, "chosen": hh("Bonjour ☕", "Salut 👋", "日本語で?\nお願い", "はい、どうぞ。"),
      "rejected": hh("Bonjour ☕", "Salut 👋", "日本語で?\nお願い", "No.")},
     PreferencePair("日本語で?\nお願い", "はい、どうぞ。", "No.",
                    history=(("Bonjour ☕", "Salut 👋"),), id="8")),
    ({"id": 9, "chosen": hh("Say 'Human: hi'", "Human: hi", "Again", "Assistant: ok",
                            "\n  Last", "A\n"),
      "rejected": hh("Say 'Human: hi'", "Human: hi", "Again", "Assistant: ok", "\n  Last", "B")},
     PreferencePair("\n  Last", "A\n", "B", history=(("Say 'Human: hi'", "Human: hi"),
                                                     ("Again", "Assistant: ok")), id="9")),
    ({"id": 10, "chosen": hh("Hi", "Hello!", "Q", "A"),
      "rejected": hh("Hey", "Hello!", "Q", "B")},
     Skipped("different context", "rejected: its turns before the response differ from "
                                  "chosen's (first at turn 1")),
    ({"id": 11, "chosen": hh("Hi", "Same"), "rejected": hh("Hi", "Same ")},
     Skipped("identical responses", "rejected: the same response as chosen")),
    ({"id": 12, "chosen": hh("Hi", "Hello", "More?"), "rejected": hh("Hi", "Hello")},
     Skipped("wrong last turn", "chosen: the last turn is the user's; expected Assistant:")),
    ({"id": 13, "chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": hh("a", "d")},
     Skipped("turns not alternating", "chosen: turn 2 is Human:, expected Assistant:")),
    ({"id": 14, "chosen": hh("Hi", "Fine"), "rejected": "just text, no turns"},
     Skipped("no turns", "rejected: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")),
    ({"id": 15, "chosen": hh("Hi", ""), "rejected": hh("Hi", "Something")},
     Skipped("empty response", "chosen: the response is empty or whitespace-only")),
    ({"id": 16, "chosen": "Intro\n\nHuman: a\n\nAssistant: b", "rejected": hh("a", "c")},
     Skipped("unparsable transcript", "chosen: text before the first turn: 'Intro")),
]
# Malformed rows: JSONL only (a raw string is written as the line itself).
HH_BAD_JSON = [
    ('{"chosen": "x", ', Skipped("invalid JSON", "invalid JSON: ")),
    ({"chosen": hh("Hi", "A")}, Skipped("missing field", "rejected: missing required field")),
    ({"chosen": 3, "rejected": hh("Hi", "A")},
     Skipped("wrong type", "chosen: expected a string (an HH transcript), got number")),
    ("[1, 2]", Skipped("wrong type", "expected a JSON object, got array")),
    ({"id": True, "chosen": hh("Hi", "A"), "rejected": hh("Hi", "B")},
     Skipped("wrong type", "id: expected a string or an integer, got boolean")),
]

CR_ROWS = [
    ({"id": "abc", "prompt": "Joke?", "chosen": msgs("Joke?", "Knock knock."),
      "rejected": msgs("Joke?", "No.")},
     PreferencePair("Joke?", "Knock knock.", "No.", id="abc")),
    ({"id": "def", "prompt": None,
      "chosen": msgs("Quote this: " + FAKE_HH, FAKE_HH, "Ünïcödé ✓?", "Ja ✓\n"),
      "rejected": msgs("Quote this: " + FAKE_HH, FAKE_HH, "Ünïcödé ✓?", "Nein")},
     PreferencePair("Ünïcödé ✓?", "Ja ✓\n", "Nein", history=(("Quote this: " + FAKE_HH, FAKE_HH),),
                    id="def")),
    ({"id": "sys0", "prompt": "Q", "chosen": msgs("Q", "A", system=""),
      "rejected": msgs("Q", "B", system="")},
     PreferencePair("Q", "A", "B", id="sys0")),
    ({"id": "sys", "prompt": "Q", "chosen": msgs("Q", "A", system="Be brief."),
      "rejected": msgs("Q", "B", system="Be brief.")},
     PreferencePair("Q", "A", "B", id="sys", system="Be brief.")),
    ({"id": "mismatch", "prompt": "Other question", "chosen": msgs("Q", "A"),
      "rejected": msgs("Q", "B")},
     Skipped("prompt mismatch", "prompt: 'Other question' is not the last user turn ('Q')")),
    ({"id": "ctx", "prompt": "Q", "chosen": msgs("Hi", "Hello", "Q", "A"),
      "rejected": msgs("Q", "B")},
     Skipped("different context", "rejected: its turns before the response differ from chosen's "
                                  "(first at turn 1; chosen has 3 such turns, rejected 1)")),
    ({"id": "sysdiff", "prompt": "Q", "chosen": msgs("Q", "A", system="Be brief."),
      "rejected": msgs("Q", "B")},
     Skipped("different context", "rejected: its system message differs from chosen's")),
    ({"id": "last", "prompt": "More", "chosen": msgs("Q", "A", "More"),
      "rejected": msgs("Q", "A", "More")},
     Skipped("wrong last turn", "chosen[2].role: the last turn is the user's; expected an "
                                "assistant")),
    ({"id": "blank", "prompt": "Q", "chosen": msgs("Q", "A"), "rejected": msgs("Q", " \n")},
     Skipped("empty response", "rejected[1].content: the response is empty or whitespace-only")),
    ({"id": "order", "prompt": "Q", "chosen": msgs("Q", "A")[::-1], "rejected": msgs("Q", "B")},
     Skipped("turns not alternating", "chosen[0].role: expected 'user', got 'assistant'")),
    ({"id": "same", "prompt": "Q", "chosen": msgs("Q", "A"), "rejected": msgs("Q", " A")},
     Skipped("identical responses", "rejected: the same response as chosen")),
    ({"id": "role", "prompt": "Q", "chosen": msgs("Q", "A"),
      "rejected": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "B"}]},
     Skipped("unknown role", "rejected[1].role: expected one of ['user', 'assistant', "
                             "'system'], got 'tool'")),
    ({"id": "empty", "prompt": "Q", "chosen": [], "rejected": msgs("Q", "B")},
     Skipped("no turns", "chosen: no user or assistant messages")),
]
CR_BAD_JSON = [
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 5}],
      "rejected": msgs("Q", "B")},
     Skipped("wrong type", "chosen[1].content: expected a string, got number")),
    ({"chosen": msgs("Q", "A"), "rejected": [{"role": "user", "content": "Q"},
                                             {"role": "assistant"}]},
     Skipped("missing field", "rejected[1].content: missing required field")),
    ({"chosen": [{"role": "user", "content": "Q"}, "A"], "rejected": msgs("Q", "B")},
     Skipped("wrong type", 'chosen[1]: expected a {"role": ..., "content": ...} object, '
                           "got string")),
    ({"chosen": "Q A", "rejected": msgs("Q", "B")},
     Skipped("wrong type", "chosen: expected an array of messages, got string")),
    ({"prompt": 1, "chosen": msgs("Q", "A"), "rejected": msgs("Q", "B")},
     Skipped("wrong type", "prompt: expected a string, got number")),
    ({"id": {"x": 1}, "chosen": msgs("Q", "A"), "rejected": msgs("Q", "B")},
     Skipped("wrong type", "id: expected a string or an integer, got object")),
    # Extra keys of a message are ignored.
    ({"chosen": [{"role": "user", "content": "Q", "name": "u"},
                 {"role": "assistant", "content": "A", "weight": 1}],
      "rejected": msgs("Q", "B")},
     PreferencePair("Q", "A", "B")),
    ("\xff not json", Skipped("invalid JSON", "invalid JSON: ")),
]

# One file for both kinds: SFT takes the dialogues ending with the assistant, prompt the others.
MESSAGES_ROWS = [
    ({"messages": msgs("Hi", "Hello")},
     SFTExample("Hi", "Hello"),
     Skipped("wrong last turn", "messages[1].role: the last turn is the assistant's; expected "
                                "the user's")),
    ({"messages": msgs("Hi", "Hello", "Tell me a story 📖")},
     Skipped("wrong last turn", "messages[2].role: the last turn is the user's; expected the "
                                "assistant's"),
     PromptExample("Tell me a story 📖", history=(("Hi", "Hello"),))),
    ({"messages": msgs("Human: hi" + FAKE_HH, "Ça va", "Et toi ?", "Oui\n\nAssistant: oui")},
     SFTExample("Et toi ?", "Oui\n\nAssistant: oui", history=(("Human: hi" + FAKE_HH, "Ça va"),)),
     Skipped("wrong last turn", "messages[3].role")),
    ({"messages": msgs("Q", "A", system="You are GLM.")},
     SFTExample("Q", "A", system="You are GLM."),
     Skipped("wrong last turn", "messages[2].role")),
    ({"messages": msgs("Hi", "Hello", "Q", system="You are GLM.")},
     Skipped("wrong last turn", "messages[3].role"),
     PromptExample("Q", history=(("Hi", "Hello"),), system="You are GLM.")),
    ({"messages": [*msgs("Q", "A"), {"role": "system", "content": "late"}]},
     Skipped("system message", "messages[2]: a system message after the first message is not "
                               "supported"),
     Skipped("system message", "messages[2]: a system message after the first message")),
    ({"messages": msgs("Only a question")},
     Skipped("wrong last turn", "messages[0].role"),
     PromptExample("Only a question")),
    ({"messages": msgs("Q", "  ")},
     Skipped("empty response", "messages[1].content: the response is empty or whitespace-only"),
     Skipped("wrong last turn", "messages[1].role")),
    ({"messages": msgs("Q", "A") + [{"role": "assistant", "content": "B"}]},
     Skipped("turns not alternating", "messages[2].role: expected 'user', got 'assistant'"),
     Skipped("turns not alternating", "messages[2].role: expected 'user', got 'assistant'")),
]
MESSAGES_BAD_JSON = [
    ({"messages": "Hi"}, Skipped("wrong type", "messages: expected an array of messages"),
     Skipped("wrong type", "messages: expected an array of messages")),
    ({"msgs": msgs("Q", "A")}, Skipped("missing field", "messages: missing required field"),
     Skipped("missing field", "messages: missing required field")),
    ({"messages": [{"role": "user", "content": ["part"]}]},
     Skipped("wrong type", "messages[0].content: expected a string, got array"),
     Skipped("wrong type", "messages[0].content: expected a string, got array")),
]


def write_source(tmp_path, rows, suffix, name="source"):
    """Writes rows as JSONL (a blank line after the first row, to be ignored but counted) or
    parquet; returns the path and each row's location."""
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path, [f"{path}:row {i}" for i in range(len(rows))]
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
             for row in rows]
    lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, [f"{path}:{n}" for n in [1, *range(3, len(rows) + 2)]]


def check_conversion(tmp_path, path, locations, expected, source_format, kind):
    """convert_file gives exactly the expected records and skips (reason, location, detail),
    the counts add up, and the records survive write_jsonl -> read_jsonl."""
    records, report = convert_file(path, source_format, kind)
    assert records == [e for e in expected if not isinstance(e, Skipped)]
    skips = [(e, loc) for e, loc in zip(expected, locations, strict=True)
             if isinstance(e, Skipped)]
    assert [(s.reason, s.location) for s in report.skipped] == [
        (e.reason, loc) for e, loc in skips]
    for skip, (e, _) in zip(report.skipped, skips, strict=True):
        assert skip.detail.startswith(e.detail), (skip.detail, e.detail)
        assert str(skip) == f"{skip.location}: {skip.detail}"
    assert report.num_converted == len(records)
    assert report.num_converted + report.num_skipped == len(expected)
    out = tmp_path / f"{path.stem}.{kind}.out.jsonl"
    write_jsonl(out, records)
    back, read_report = read_jsonl(out, kind)
    assert back == records and read_report.num_skipped == 0
    return records, report


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_hh_transcripts(tmp_path, suffix):
    rows = HH_ROWS + (HH_BAD_JSON if suffix == ".jsonl" else [])
    path, locations = write_source(tmp_path, [r for r, _ in rows], suffix)
    records, _ = check_conversion(tmp_path, path, locations, [e for _, e in rows], "hh",
                                  "preference")
    assert len(records) == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_chosen_rejected_message_lists(tmp_path, suffix):
    rows = CR_ROWS + (CR_BAD_JSON if suffix == ".jsonl" else [])
    path, locations = write_source(tmp_path, [r for r, _ in rows], suffix)
    if suffix == ".jsonl":  # an invalid UTF-8 byte makes the last line unreadable
        path.write_bytes(path.read_bytes().replace("\xff".encode(), b"\xff"))
        rows[-1] = (rows[-1][0], Skipped("invalid UTF-8",
                                         "invalid UTF-8 (byte 0xff at byte 1 of the line)"))
    check_conversion(tmp_path, path, locations, [e for _, e in rows], "chosen_rejected",
                     "preference")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("kind", ["sft", "prompt"])
def test_openai_messages(tmp_path, suffix, kind):
    rows = MESSAGES_ROWS + (MESSAGES_BAD_JSON if suffix == ".jsonl" else [])
    path, locations = write_source(tmp_path, [r for r, *_ in rows], suffix)
    expected = [sft if kind == "sft" else prompt for _, sft, prompt in rows]
    records, _ = check_conversion(tmp_path, path, locations, expected, "messages", kind)
    assert len(records) == 3


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row, _ in HH_ROWS[:5]:
            f.write(json.dumps(row) + "\n")
    records, report = convert_file(path, "hh", "preference")
    assert records == [e for _, e in HH_ROWS[:3]]
    assert [(s.reason, s.location) for s in report.skipped] == [
        ("different context", f"{path}:4"), ("identical responses", f"{path}:5")]


STRICT_CASES = [  # (format, kind, two good rows, a bad row, the start of its error)
    ("hh", "preference", [HH_ROWS[0][0], HH_ROWS[1][0]], HH_ROWS[4][0],
     "rejected: the same response as chosen"),
    ("chosen_rejected", "preference", [CR_ROWS[0][0], CR_ROWS[2][0]], CR_ROWS[4][0],
     "prompt: 'Other question' is not the last user turn"),
    ("messages", "sft", [MESSAGES_ROWS[0][0], MESSAGES_ROWS[2][0]], MESSAGES_ROWS[1][0],
     "messages[2].role: the last turn is the user's"),
    ("messages", "prompt", [MESSAGES_ROWS[1][0], MESSAGES_ROWS[4][0]], MESSAGES_ROWS[8][0],
     "messages[2].role: expected 'user', got 'assistant'"),
]


@pytest.mark.parametrize("source_format, kind, good, bad, message", STRICT_CASES)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_strict_raises_for_the_first_bad_record(tmp_path, source_format, kind, good, bad,
                                                message, suffix):
    good_path, _ = write_source(tmp_path, good, suffix, name="good")
    records, report = convert_file(good_path, source_format, kind, strict=True)
    assert len(records) == 2 and report.num_skipped == 0

    path, locations = write_source(tmp_path, [*good, bad, *good], suffix)
    assert locations[2] == (f"{path}:row 2" if suffix == ".parquet" else f"{path}:4")
    with pytest.raises(DataError) as info:
        convert_file(path, source_format, kind, strict=True)
    assert str(info.value).startswith(f"{locations[2]}: {message}")
    _, report = convert_file(path, source_format, kind)  # the same message as the skip's
    assert [str(s) for s in report.skipped] == [str(info.value)]


def test_strict_names_a_malformed_field(tmp_path):
    path, _ = write_source(tmp_path, [CR_ROWS[0][0], CR_ROWS[1][0], CR_BAD_JSON[0][0]],
                           ".jsonl")
    with pytest.raises(DataError) as info:
        convert_file(path, "chosen_rejected", "preference", strict=True)
    assert str(info.value) == f"{path}:4: chosen[1].content: expected a string, got number"


def test_parse_functions():
    assert parse_hh_transcript("Human: Hi\n\nAssistant:") == Dialogue((), "Hi", "")
    assert parse_hh_transcript(hh("a", "b", "c")) == Dialogue((("a", "b"),), "c", None)
    assert parse_messages(msgs("a", "b", "c", "d")) == Dialogue((("a", "b"),), "c", "d")
    with pytest.raises(ConversionError) as info:
        parse_messages([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
                       "chosen")
    assert (info.value.field, info.value.reason) == ("chosen[1]", "system message")
    assert str(info.value).startswith("chosen[1]: a system message after the first message")
    assert parse_messages(msgs("a", "b", system="s")) == Dialogue((), "a", "b", "s")
    assert parse_messages(msgs("a", system=" ")) == Dialogue((), "a", None)  # empty: dropped
    assert isinstance(info.value, DataError)


def test_format_kind_pairs():
    with pytest.raises(ValueError, match="format 'messages' converts to 'sft' or 'prompt' "
                                         "records, not 'preference'"):
        convert_record({"messages": msgs("a", "b")}, "messages", "preference")
    with pytest.raises(ValueError, match="format 'hh' converts to 'preference' records"):
        convert_record({"chosen": hh("a", "b"), "rejected": hh("a", "c")}, "hh", "sft")
    with pytest.raises(ValueError, match="unknown source format 'sharegpt'"):
        convert_record({}, "sharegpt", "sft")


def test_report_format():
    report = ConversionReport(num_converted=5, skipped=[
        Skip("identical responses", f"d.jsonl:{n}", "rejected: the same response as chosen")
        for n in (2, 4, 6, 8)] + [Skip("system message", "d.jsonl:9", "chosen[0]: a system")])
    assert report.format().splitlines() == [
        "converted 5 of 10 records",
        "skipped 5:",
        "  identical responses: 4 (d.jsonl:2, d.jsonl:4, d.jsonl:6, ... (1 more)); first: "
        "rejected: the same response as chosen",
        "  system message: 1 (d.jsonl:9); first: chosen[0]: a system",
    ]


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs the pyarrow package.*pip install") as e:
        convert_file(path, "hh", "preference")
    assert e.value.name == "pyarrow"
    with pytest.raises(SystemExit, match="error: .*pyarrow"):
        convert_preferences.main(["--input", str(path), "--format", "hh", "--output",
                                  str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()


def test_unreadable_parquet_is_a_data_error(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=f"{path}: not a readable parquet file"):
        convert_file(path, "hh", "preference")


def test_cli_writes_nothing_when_nothing_converts(tmp_path):
    path, _ = write_source(tmp_path, [r for r, _ in HH_ROWS[3:6]], ".jsonl")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match="no record converted"):
        convert_preferences.main(["--input", str(path), "--format", "hh", "--output", str(out)])
    assert not out.exists()


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_converts_and_reports(tmp_path):
    rows = [HH_ROWS[i] for i in (0, 4, 1, 3, 4)]
    path, _ = write_source(tmp_path, [r for r, _ in rows], ".jsonl")
    out = tmp_path / "out.jsonl"
    result = run_script("--input", path, "--format", "hh", "--kind", "preference",
                        "--output", out)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in out.read_text("utf-8").splitlines()] == [
        HH_ROWS[0][1].to_json(), HH_ROWS[1][1].to_json()]
    assert result.stdout.splitlines() == [
        "converted 2 of 5 records",
        "skipped 3:",
        f"  identical responses: 2 ({path}:3, {path}:6); first: rejected: the same response "
        "as chosen",
        f"  different context: 1 ({path}:5); first: rejected: its turns before the response "
        "differ from chosen's (first at turn 1; chosen has 3 such turns, rejected 3)",
        f"wrote 2 preference records to {out}",
    ]


def test_cli_strict_failure_exits_nonzero_without_output(tmp_path):
    rows = [HH_ROWS[0], HH_ROWS[1], HH_ROWS[4]]
    path, _ = write_source(tmp_path, [r for r, _ in rows], ".jsonl")
    out = tmp_path / "out.jsonl"
    result = run_script("--input", path, "--format", "hh", "--output", out, "--strict")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path}:4: rejected: the same response as chosen")
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file either
