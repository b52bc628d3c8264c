"""The embedded pipeline end to end on a reduced world: every stage runs, the annotators judge
the SFT model's samples, the report has every section, its numbers agree with the files the
stages wrote, and a rerun skips the stages already done."""

import json
from pathlib import Path

import numpy as np
import pytest
from ml_collections import config_flags

from glm_jax.pipeline.report import SECTIONS
from glm_jax.pipeline.run import Pipeline, run_pipeline
from glm_jax.pipeline.world import gold_quality

ROOT = Path(__file__).resolve().parents[1]


def reduced_config():
    from absl import flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["prog", "--config", str(ROOT / "configs" / "tiny.py")])
    config = values.config
    config.pipeline.update(num_sft=600, num_capability_sft=60, num_preference_prompts=800,
                           num_test_preference_prompts=120, num_rl_prompts=64,
                           num_eval_prompts_per_task=8, ablation_steps=2)
    config.sft.update(num_steps=60, checkpoint_every=60)
    config.rm.update(num_steps=40, eval_every=40, checkpoint_every=40)
    config.ppo.update(num_steps=3, batch_size=16, minibatch_size=8, ppo_epochs=1,
                      filter_samples=2, checkpoint_every=3)
    config.dpo.update(num_steps=4, num_samples=2, eval_every=4, checkpoint_every=4)
    return config


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    summary = run_pipeline(reduced_config(), workdir)
    return workdir, summary


def test_report_has_every_section_and_figure(pipeline_run):
    workdir, summary = pipeline_run
    markdown = Path(summary["markdown"]).read_text()
    for section in SECTIONS:
        assert f"## {section}" in markdown, section
    for figure in summary["figures"].values():
        assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(figure).name in markdown
    report = json.loads(Path(summary["json"]).read_text())
    assert {f["claim"] for f in report["findings"]} == {f["claim"] for f in summary["findings"]}
    assert all(isinstance(f["reproduced"], bool) for f in report["findings"])


def test_annotators_judged_the_sft_models_samples(pipeline_run):
    workdir, _ = pipeline_run
    prompts = [r["prompt"] for r in lines(workdir / "data" / "preference_prompts.jsonl")]
    pairs = lines(workdir / "data" / "preferences_raw.jsonl")
    assert {p["prompt"] for p in pairs} <= set(prompts)
    assert len({p["prompt"] for p in pairs}) > 0.8 * len(prompts)
    assert all(p["chosen"] != p["rejected"] and p["chosen"].strip() and p["rejected"].strip()
               for p in pairs)
    counts = json.loads((workdir / "annotate" / "stage.json").read_text())["preference"]
    assert counts == {"prompts": len(prompts), "pairs": len(pairs)}


def test_report_numbers_match_the_stage_outputs(pipeline_run):
    workdir, summary = pipeline_run
    report = json.loads(Path(summary["json"]).read_text())
    sft, ppo = lines(workdir / "evaluate" / "sft.jsonl"), lines(workdir / "evaluate" / "ppo.jsonl")
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in ppo]
    diff = np.array([p["gold"] - s["gold"] for p, s in zip(ppo, sft, strict=True)])
    wtl = report["win_tie_loss"]["ppo"]["all"]
    assert wtl["win"] == pytest.approx(np.mean(diff > 0))
    assert wtl["loss"] == pytest.approx(np.mean(diff < 0))
    assert report["gold_quality"]["ppo"] == pytest.approx(np.mean([r["gold"] for r in ppo]))
    assert report["greedy_gold_quality"]["sft"] == pytest.approx(
        np.mean([r["greedy_gold"] for r in sft]))
    for row in sft + ppo:  # a prompt's gold quality is the mean over its sampled responses
        assert len(row["responses"]) == reduced_config().pipeline.eval_samples
        assert row["gold"] == pytest.approx(np.mean([gold_quality(row["prompt"], r)
                                                     for r in row["responses"]]))
        assert row["greedy_gold"] == gold_quality(row["prompt"], row["greedy_response"])
    assert report["response_tokens"]["sft"] == pytest.approx(np.mean([r["tokens"] for r in sft]))
    steps = {s["step"]: s["num_comparisons"] for s in report["data_statistics"]}
    assert steps["raw"] == len(lines(workdir / "data" / "preferences_raw.jsonl"))
    assert steps["balance_by_length"] == len(lines(workdir / "data" /
                                                   "preferences_balanced.jsonl"))
    assert steps["raw"] > steps["drop_ties"] > steps["drop_cycles"] >= steps["balance_by_length"]
    for bucket in report["longer_wins"]:  # balancing equalises longer / shorter wins
        if bucket["count_after"]:
            assert bucket["longer_wins_after"] == 0.5
    curve = lines(workdir / "ppo" / "metrics.jsonl")
    assert report["reference_reward"]["ppo"]["last_kl"] == curve[-1]["kl"]
    window = max(1, len(curve) // 10)
    assert report["reference_reward"]["ppo"]["last_reward"] == pytest.approx(
        np.mean([r["reward"] for r in curve[-window:]]))
    bayes = report["bayes_accuracy"]["test"]
    assert 0.5 < bayes < 1 and report["reward_model"]["rm"]["test_accuracy"] <= 1


def test_rerun_skips_finished_stages(pipeline_run, capsys):
    workdir, summary = pipeline_run
    marker = workdir / "ppo" / "stage.json"
    before = marker.stat().st_mtime_ns
    again = run_pipeline(reduced_config(), workdir)
    out = capsys.readouterr().out
    for stage in Pipeline.STAGES:
        assert f"[pipeline] {stage}: done before, skipped" in out
    assert marker.stat().st_mtime_ns == before and again["findings"] == summary["findings"]
