"""The metrics writer's files, read back by independent readers (json, TensorBoard)."""

import json

import numpy as np
import pytest

from glm_jax.train.metrics import MetricsWriter, _masked_crc32c


def test_crc32c_known_value():
    # CRC-32C("123456789") = 0xE3069283 (RFC 3720); TFRecord stores it masked.
    crc = 0xE3069283
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert _masked_crc32c(b"123456789") == masked


def test_jsonl_and_tensorboard_events(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, print_every=2)
    for step in range(1, 5):
        writer.write(step, {"loss": np.float32(1.0 / step), "accuracy": 0.25 * step,
                            "note": "text is kept in JSONL only"})
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[2]["loss"] == pytest.approx(1 / 3) and lines[2]["note"].startswith("text")

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "accuracy"}
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in loss], [1, 1 / 2, 1 / 3, 1 / 4], rtol=1e-6)

    printed = capsys.readouterr().out.splitlines()
    assert printed == ["step 2: loss=0.5, accuracy=0.5", "step 4: loss=0.25, accuracy=1"]


def test_resume_drops_lines_after_the_resume_step(tmp_path):
    writer = MetricsWriter(tmp_path, print_every=0)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    writer = MetricsWriter(tmp_path, print_every=0, resume_step=3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
