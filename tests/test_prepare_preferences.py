"""The prepare_preferences CLI on a small hand-made file: ties, a cycle, a length-biased set."""

import json
import sys
from pathlib import Path

import pytest

from glm_jax.data import DataError, Tokenizer, read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import prepare_preferences  # noqa: E402


def words(word, k):
    return " ".join([word] * k)


def raw_records():
    """17 pairs. With the tiny tokenizer "word" x k is 3k tokens and "yes" x k is 2k tokens."""
    records = [
        {"id": "tie", "prompt": "t1", "chosen": "fine", "rejected": "also fine", "tie": True},
        {"id": "same", "prompt": "t2", "chosen": "identical", "rejected": "identical"},
        # A > B > C > A is a cycle; A > D is not.
        {"id": "c1", "prompt": "cyc", "chosen": "A", "rejected": "B"},
        {"id": "c2", "prompt": "cyc", "chosen": "B", "rejected": "C"},
        {"id": "c3", "prompt": "cyc", "chosen": "C", "rejected": "A"},
        {"id": "acyc", "prompt": "cyc", "chosen": "A", "rejected": "D"},
        # equal lengths (6 tokens each): d = 0, always kept
        {"id": "eq1", "prompt": "e1", "chosen": words("word", 2), "rejected": words("yes", 3),
         "history": [["hi", "hello"]]},
        {"id": "eq2", "prompt": "e2", "chosen": words("yes", 3), "rejected": words("word", 2),
         "history": [["hi", "hello"]]},
    ]
    # bucket [1, 8): d = 3; longer chosen 3 times out of 4
    records += [{"id": f"s_long{i}", "prompt": f"s{i}", "chosen": words("word", 3),
                 "rejected": words("word", 2)} for i in range(3)]
    records += [{"id": "s_short", "prompt": "s9", "chosen": words("word", 2),
                 "rejected": words("word", 3)}]
    # bucket [8, inf): d = 12; longer chosen 4 times out of 5
    records += [{"id": f"l_long{i}", "prompt": f"l{i}", "chosen": words("word", 5),
                 "rejected": words("word", 1)} for i in range(4)]
    records += [{"id": "l_short", "prompt": "l9", "chosen": words("word", 1),
                 "rejected": words("word", 5)}]
    return records


def write_raw(tmp_path, records, extra_lines=()):
    path = tmp_path / "raw.jsonl"
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_token_counts_the_data_relies_on():
    tokenizer = Tokenizer.tiny()
    for k in (1, 2, 3, 5):
        assert len(tokenizer.encode(words("word", k))) == 3 * k
    assert len(tokenizer.encode(words("yes", 3))) == 6


def test_prepare_cleans_and_balances(tmp_path, capsys):
    raw = write_raw(tmp_path, raw_records())
    out = tmp_path / "clean.jsonl"
    stats = prepare_preferences.main(["--input", str(raw), "--output", str(out),
                                      "--bucket-edges", "1,8", "--seed", "0"])
    steps = {s["step"]: s for s in stats["steps"]}
    assert [s["step"] for s in stats["steps"]] == ["input", "drop_ties", "drop_cycles",
                                                   "balance_by_length"]
    assert [s["num_comparisons"] for s in stats["steps"]] == [17, 15, 12, 7]
    assert steps["input"]["avg_turns"] == pytest.approx(19 / 17)
    assert steps["balance_by_length"]["avg_turns"] == pytest.approx(9 / 7)
    assert stats["length_bias"]["before"] == [
        {"bucket": "[1, 8)", "count": 4, "longer_wins": 0.75},
        {"bucket": "[8, inf)", "count": 5, "longer_wins": 0.8}]
    assert stats["length_bias"]["after"] == [
        {"bucket": "[1, 8)", "count": 2, "longer_wins": 0.5},
        {"bucket": "[8, inf)", "count": 2, "longer_wins": 0.5}]
    assert stats["num_written"] == 7

    written, _ = read_jsonl(out, "preference")
    ids = [p.id for p in written]
    assert {"acyc", "eq1", "eq2", "s_short", "l_short"} <= set(ids)
    assert sum(i.startswith("s_long") for i in ids) == 1
    assert sum(i.startswith("l_long") for i in ids) == 1
    input_order = [r["id"] for r in raw_records()]
    assert ids == sorted(ids, key=input_order.index)
    assert written[ids.index("eq1")].history == (("hi", "hello"),)  # fields survive

    printed = capsys.readouterr().out
    assert "num_comparisons" in printed and "longer_wins_after" in printed
    assert f"wrote 7 pairs to {out}" in printed

    again = tmp_path / "again.jsonl"
    prepare_preferences.main(["--input", str(raw), "--output", str(again),
                              "--bucket-edges", "1,8", "--seed", "0"])
    assert again.read_text() == out.read_text()  # deterministic by seed


def test_prepare_no_balance_and_tokenizer_dir(tmp_path):
    raw = write_raw(tmp_path, raw_records())
    out = tmp_path / "clean.jsonl"
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_bytes(Tokenizer.tiny().path.read_bytes())
    stats = prepare_preferences.main(["--input", str(raw), "--output", str(out), "--no-balance",
                                      "--bucket-edges", "1,8", "--tokenizer",
                                      str(tokenizer_dir)])
    assert [s["step"] for s in stats["steps"]] == ["input", "drop_ties", "drop_cycles"]
    assert stats["length_bias"]["after"] == stats["length_bias"]["before"]
    written, _ = read_jsonl(out, "preference")
    assert len(written) == 12
    assert not {"tie", "same", "c1", "c2", "c3"} & {p.id for p in written}


def test_prepare_on_error(tmp_path):
    raw = write_raw(tmp_path, raw_records(), ['{"prompt": "p", "chosen": 5, "rejected": "x"}'])
    out = tmp_path / "clean.jsonl"
    with pytest.raises(DataError, match=r"raw.jsonl:18: chosen: expected a string, got number"):
        prepare_preferences.main(["--input", str(raw), "--output", str(out)])
    assert not out.exists()
    stats = prepare_preferences.main(["--input", str(raw), "--output", str(out),
                                      "--on-error", "skip", "--bucket-edges", "1,8"])
    assert stats["read"]["num_skipped"] == 1 and stats["read"]["first_skipped_lines"] == [18]
    assert stats["steps"][0]["num_comparisons"] == 17
