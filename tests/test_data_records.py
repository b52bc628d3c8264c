"""Record types and validated JSONL reading/writing."""

import json

import pytest

from glm_jax.data import (
    DataError,
    PreferencePair,
    PromptExample,
    SFTExample,
    read_jsonl,
    write_jsonl,
)

GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind, line, message", [
    ("preference", '{"prompt": "p", "chosen": "a"', "invalid JSON: Expecting ',' delimiter"),
    ("preference", '["p", "a", "b"]', "expected a JSON object, got array"),
    ("preference", '"just text"', "expected a JSON object, got string"),
    ("preference", '{"prompt": "p", "rejected": "b"}', "chosen: missing required field"),
    ("preference", '{"chosen": "a", "rejected": "b"}', "prompt: missing required field"),
    ("preference", '{"prompt": 3, "chosen": "a", "rejected": "b"}',
     "prompt: expected a string, got number"),
    ("preference", '{"prompt": "p", "chosen": ["a"], "rejected": "b"}',
     "chosen: expected a string, got array"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": null}',
     "rejected: expected a string, got null"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "task": 7}',
     "task: expected a string, got number"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "id": {"x": 1}}',
     "id: expected a string, got object"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"}',
     "tie: expected a boolean, got string"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "tie": 1}',
     "tie: expected a boolean, got number"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "history": "hi"}',
     "history: expected an array of [user, assistant] pairs, got string"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", '
                   '"history": [["u", "a"], ["u2"]]}',
     'history[1]: expected a [user, assistant] pair of strings, got ["u2"]'),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "history": [["u", 2]]}',
     'history[0]: expected a [user, assistant] pair of strings, got ["u", 2]'),
    ("preference", '{"prompt": "p", "chosen": " \\n\\t", "rejected": "b"}',
     "chosen: empty or whitespace-only"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": ""}',
     "rejected: empty or whitespace-only"),
    ("sft", '{"prompt": "p"}', "response: missing required field"),
    ("sft", '{"prompt": "p", "response": "   "}', "response: empty or whitespace-only"),
    ("sft", '{"prompt": "p", "response": 1.5}', "response: expected a string, got number"),
    ("prompt", '{"history": []}', "prompt: missing required field"),
    ("prompt", '{"prompt": true}', "prompt: expected a string, got boolean"),
])
def test_bad_line_message_names_file_line_field(tmp_path, kind, line, message):
    good = {"preference": GOOD, "sft": '{"prompt": "p", "response": "r"}',
            "prompt": '{"prompt": "p"}'}[kind]
    # A blank line before the bad one: line numbers count it, it is otherwise ignored.
    path = write_lines(tmp_path, [good, "", line, good])
    with pytest.raises(DataError) as info:
        read_jsonl(path, kind)
    assert str(info.value).startswith(f"{path}:3: {message}")
    assert isinstance(info.value, ValueError)


def test_valid_records_parse_with_defaults_and_ignore_unknown_fields(tmp_path):
    path = write_lines(tmp_path, [
        GOOD,
        '{"prompt": "p", "chosen": "a", "rejected": "b", "history": [["u", "v"]], '
        '"task": "math", "tie": true, "id": "x1", "annotator": 17}',
        '{"prompt": "", "chosen": "a", "rejected": "b", "task": null, "id": null}',
        "   ",
    ])
    records, report = read_jsonl(path, "preference")
    assert records == [
        PreferencePair("p", "a", "b"),
        PreferencePair("p", "a", "b", history=(("u", "v"),), task="math", tie=True, id="x1"),
        PreferencePair("", "a", "b"),
    ]
    assert (report.num_read, report.num_skipped, report.first_skipped_lines,
            report.first_error) == (3, 0, [], None)
    sft, _ = read_jsonl(write_lines(tmp_path, ['{"prompt": "q", "response": "r", "task": "t"}'],
                                    "sft.jsonl"), "sft")
    assert sft == [SFTExample("q", "r", task="t")]
    prompts, _ = read_jsonl(write_lines(tmp_path, ['{"prompt": "q", "history": [["a", "b"]]}'],
                                        "prompts.jsonl"), "prompt")
    assert prompts == [PromptExample("q", history=(("a", "b"),))]


def test_skip_mode_counts_and_first_lines(tmp_path):
    bad = '{"prompt": "p", "chosen": "", "rejected": "b"}'
    lines = [GOOD, "{oops", bad, GOOD, "[]", bad, bad, "", bad, GOOD, bad]
    path = write_lines(tmp_path, lines)
    records, report = read_jsonl(path, "preference", on_error="skip")
    assert len(records) == 3 and report.num_read == 3
    assert report.num_skipped == 7
    assert report.first_skipped_lines == [2, 3, 5, 6, 7]
    assert report.first_error.startswith(f"{path}:2: invalid JSON")


def test_invalid_arguments(tmp_path):
    path = write_lines(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="unknown record kind"):
        read_jsonl(path, "pairs")
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(path, "preference", on_error="ignore")


def test_to_json_omits_defaults():
    assert PreferencePair("p", "a", "b").to_json() == {"prompt": "p", "chosen": "a",
                                                        "rejected": "b"}
    assert PreferencePair("p", "a", "b", history=(("u", "v"),), task="t", tie=True,
                          id="7").to_json() == {
        "prompt": "p", "chosen": "a", "rejected": "b", "history": [["u", "v"]], "task": "t",
        "tie": True, "id": "7"}
    assert SFTExample("p", "r").to_json() == {"prompt": "p", "response": "r"}
    assert PromptExample("p", task="t").to_json() == {"prompt": "p", "task": "t"}


@pytest.mark.parametrize("kind, records", [
    ("preference", [PreferencePair("p", "a", "b"),
                    PreferencePair("问题 \"q\"\n", "好的 {x}", "b", history=(("u", "v"), ("w", "")),
                                   task="zh", tie=True, id="42")]),
    ("sft", [SFTExample("p", "r"), SFTExample("p2", "r2", history=(("u", "v"),), task="t")]),
    ("prompt", [PromptExample("p"), PromptExample("p2", history=(("u", "v"),), task="t")]),
])
def test_write_read_round_trip(tmp_path, kind, records):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, records)
    back, report = read_jsonl(path, kind)
    assert back == records and report.num_read == len(records)
    assert [json.loads(line) for line in path.read_text("utf-8").splitlines()] == [
        r.to_json() for r in records]
    assert kind != "preference" or "问题" in path.read_text("utf-8")  # not \u-escaped


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [PreferencePair("p", "a", "b")])
    original = path.read_text()

    def broken():
        yield PreferencePair("q", "c", "d")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_jsonl(path, broken())
    assert path.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left
