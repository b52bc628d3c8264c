"""The embedded pipeline's reruns (each stage's recorded settings against the config's) and the
report's verdicts (bootstrap intervals, Figure 4), on instant stand-in stages and synthetic
numbers: no training."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config

from glm_jax.pipeline import report
from glm_jax.pipeline.run import (
    SETTINGS_FILE,
    Pipeline,
    SettingsChanged,
    derive,
    run_pipeline,
    stage_settings,
)
from glm_jax.pipeline.world import TASKS

STAGES = Pipeline.STAGES


@pytest.fixture
def instant(monkeypatch):
    """Every stage replaced by one that records its call and writes `made_by.json` (the seed
    and the PPO KL coefficient it ran with) in its directory; returns the list of calls."""
    calls = []

    def fake(stage):
        def run(self):
            calls.append(stage)
            made = {"seed": self.config.seed, "kl_coef": self.config.ppo.kl_coef}
            (self.workdir / stage / "made_by.json").write_text(json.dumps(made))
            return {"markdown": str(self.workdir / "report.md")} if stage == "report" else made
        return run

    for stage in STAGES:
        monkeypatch.setattr(Pipeline, stage, fake(stage))
    return calls


def config_with(**updates):
    return derive(load_config("tiny.py"), **updates)


def snapshot(workdir):
    """Every file of the work directory and its bytes."""
    return {p.relative_to(workdir): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file()}


def test_stage_settings_follow_the_stages_inputs_and_skip_runtime_fields():
    config = config_with(**{"mesh.fsdp": 4, "ppo.fused": False})
    ppo = stage_settings(config, "ppo")
    # Its own section and those of the stages it reads from: rm <- clean <- annotate <- sft
    # <- world.
    assert ppo["ppo.kl_coef"] == 0.1 and ppo["rm.num_steps"] == 250
    assert ppo["sft.num_steps"] == 1200 and ppo["seed"] == 0 and "pipeline.num_sft" in ppo
    assert ppo["model.tiny.hidden_size"] == 128 and ppo["data.max_response_tokens"] == 12
    # Not what it does not read, how it runs or logs, nor the files the pipeline sets.
    for field in ("dpo.beta", "pipeline.eval_samples", "pipeline.ablation_steps", "mesh.fsdp",
                  "ppo.fused", "ppo.log_every", "ppo.checkpoint_every", "metrics.peak_tflops",
                  "model.scan_layers", "model.remat", "rm.train_file", "ppo.reward_model",
                  "distributed.num_processes", "on_damaged_checkpoint", "rsft.num_samples"):
        assert field not in ppo, field
    rm = stage_settings(config, "rm")
    # Annotation samples with PPO's rollout settings; the rest of PPO is not the RM's.
    assert "ppo.temperature" in rm and "ppo.kl_coef" not in rm
    assert stage_settings(config, "world").keys() == {
        "seed", *(k for k in ppo if k.startswith("pipeline.") and k != "pipeline.bucket_edges"
                  and k != "pipeline.annotate_samples")}
    assert "dpo.beta" in stage_settings(config, "report")
    # GRPO against the reward model reads it; GRPO on the gold reward does not.
    grpo, gold = stage_settings(config, "grpo"), stage_settings(config, "grpo_gold")
    assert grpo["ppo.kl_coef"] == gold["ppo.kl_coef"] == 0.1 and grpo["rm.num_steps"] == 250
    assert "rm.num_steps" not in gold and gold["sft.num_steps"] == 1200


def test_grpo_stages_need_ppo_sequences_divisible_by_their_group_size(tmp_path):
    with pytest.raises(ValueError, match=r"30 sequences per PPO iteration.*multiple of 4"):
        Pipeline(config_with(**{"ppo.batch_size": 30, "ppo.minibatch_size": 10}), tmp_path)
    assert not any(tmp_path.iterdir())


def test_rerun_with_same_settings_skips_every_stage(tmp_path, instant, capsys):
    run_pipeline(config_with(), tmp_path)
    assert instant == list(STAGES)
    recorded = json.loads((tmp_path / "ppo" / SETTINGS_FILE).read_text())
    assert recorded == stage_settings(config_with(), "ppo")
    instant.clear()
    # Runtime-only fields (mesh, fused PPO, metrics, logging, checkpointing) do not count.
    run_pipeline(config_with(**{"mesh.fsdp": 2, "mesh.data": 4, "ppo.fused": False,
                                "metrics.wandb_project": "x", "sft.log_every": 7,
                                "rm.checkpoint_every": 5, "model.scan_layers": True}),
                 tmp_path)
    assert instant == []
    out = capsys.readouterr().out
    assert all(f"[pipeline] {s}: done before, skipped" in out for s in STAGES)


def test_changed_seed_refuses_before_changing_anything(tmp_path, instant):
    run_pipeline(config_with(), tmp_path)
    before = snapshot(tmp_path)
    instant.clear()
    with pytest.raises(SettingsChanged) as error:
        run_pipeline(config_with(seed=1), tmp_path)
    message = str(error.value)
    assert f"{tmp_path / 'world'} was made with other settings" in message
    assert "seed: 0 -> 1" in message and "--force" in message
    assert str(tmp_path / "world" / SETTINGS_FILE) in message
    assert instant == [] and snapshot(tmp_path) == before  # config.json included


def test_script_with_another_seed_exits_with_the_message(tmp_path, instant):
    """What the user runs: scripts/run_pipeline.py --config.seed=1 in a seed-0 workdir stops
    with one line (no stage starts, so the stand-in stages of this process are not needed)."""
    run_pipeline(config_with(), tmp_path)
    before = snapshot(tmp_path)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "run_pipeline.py"),
                          "--workdir", str(tmp_path), "--config.seed=1"],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode != 0
    assert "seed: 0 -> 1" in run.stderr and "--force" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and snapshot(tmp_path) == before


def test_changed_field_names_the_first_stage_that_depends_on_it(tmp_path, instant):
    run_pipeline(config_with(), tmp_path)
    with pytest.raises(SettingsChanged, match=r"/annotate was made with other settings.*"
                       r"ppo\.temperature: 1\.0 -> 0\.7.*keeping world, sft\)"):
        run_pipeline(config_with(**{"ppo.temperature": 0.7}), tmp_path)
    with pytest.raises(SettingsChanged, match=r"/dpo was made with .*dpo\.beta: 0\.3 -> 0\.5"):
        run_pipeline(config_with(**{"dpo.beta": 0.5}), tmp_path)


def test_force_redoes_the_first_changed_stage_and_every_later_one(tmp_path, instant, capsys):
    run_pipeline(config_with(), tmp_path)
    kept = {stage: (tmp_path / stage / "made_by.json").read_text() for stage in STAGES}
    (tmp_path / "ppo" / "stale_checkpoint").write_text("old")
    instant.clear()
    run_pipeline(config_with(**{"ppo.kl_coef": 0.2}), tmp_path, force=True)
    first = STAGES.index("ppo")
    assert instant == list(STAGES[first:])
    assert "--force: redoing ppo, ppo_no_ref" in capsys.readouterr().out
    for stage in STAGES[:first]:  # kept as they were
        assert (tmp_path / stage / "made_by.json").read_text() == kept[stage]
    for stage in STAGES[first:]:
        assert json.loads((tmp_path / stage / "made_by.json").read_text())["kl_coef"] == 0.2
    assert not (tmp_path / "ppo" / "stale_checkpoint").exists()
    assert json.loads((tmp_path / "ppo" / SETTINGS_FILE).read_text())["ppo.kl_coef"] == 0.2
    assert json.loads((tmp_path / "config.json").read_text())["ppo"]["kl_coef"] == 0.2
    instant.clear()
    run_pipeline(config_with(**{"ppo.kl_coef": 0.2}), tmp_path)  # now all match
    assert instant == []


def test_force_with_no_difference_redoes_every_stage(tmp_path, instant):
    run_pipeline(config_with(), tmp_path)
    instant.clear()
    run_pipeline(config_with(), tmp_path, force=True)
    assert instant == list(STAGES)


def test_a_stage_interrupted_under_other_settings_is_refused(tmp_path, instant, monkeypatch):
    def dies(self):
        raise RuntimeError("killed")

    monkeypatch.setattr(Pipeline, "ppo", dies)
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(config_with(), tmp_path)
    assert not (tmp_path / "ppo" / "stage.json").exists()
    # Its checkpoints would be resumed under the new settings: refused, naming it.
    with pytest.raises(SettingsChanged, match=r"/ppo was made with .*ppo\.kl_coef: 0\.1 -> 0\.3"):
        run_pipeline(config_with(**{"ppo.kl_coef": 0.3}), tmp_path)


def test_workdir_from_before_settings_were_recorded(tmp_path, instant):
    run_pipeline(config_with(), tmp_path)
    for stage in STAGES:
        (tmp_path / stage / SETTINGS_FILE).unlink()
    before = snapshot(tmp_path)
    instant.clear()
    with pytest.raises(SettingsChanged) as error:
        run_pipeline(config_with(), tmp_path)
    message = str(error.value)
    assert f"{tmp_path / 'world'} has no {SETTINGS_FILE}" in message
    assert "before the pipeline recorded each stage's settings" in message
    assert "--force" in message and snapshot(tmp_path) == before
    run_pipeline(config_with(), tmp_path, force=True)
    assert instant == list(STAGES)


# --- the report's verdicts -------------------------------------------------------------------


def test_bootstrap_verdicts_on_synthetic_numbers():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)  # per-prompt difficulty, shared by both policies
    noise = rng.normal(0, 0.1, 200)

    def judged(a, b, sign=+1):
        interval = report.bootstrap_interval(a, b, paired=True, seed=3)
        return report.verdict(interval, sign), interval

    clear, interval = judged(base + 0.1 + noise, base)
    # The percentile interval of the mean difference: about mean +- 1.96 standard errors.
    half = 1.96 * noise.std() / np.sqrt(200)
    assert clear == "yes" and interval["difference"] == pytest.approx(0.1 + noise.mean())
    assert interval["low"] == pytest.approx(0.1 + noise.mean() - half, abs=0.003)
    assert interval["high"] == pytest.approx(0.1 + noise.mean() + half, abs=0.003)
    assert judged(base + 0.002 + noise, base)[0] == "inconclusive"
    assert judged(base - 0.1 + noise, base)[0] == "no"
    assert judged(base - 0.1 + noise, base, sign=-1)[0] == "yes"
    # Pairing removes the prompts' shared difficulty: unpaired, the same gain is noise.
    small = base + 0.03 + noise
    assert judged(small, base)[0] == "yes"
    unpaired = report.bootstrap_interval(small, base, paired=False, seed=3)
    assert report.verdict(unpaired, +1) == "inconclusive"
    # Seeded: the same interval again.
    assert report.bootstrap_interval(small, base, paired=True, seed=3) == judged(small, base)[1]
    # Nothing to compare, or no difference at all, is no evidence.
    assert report.verdict(report.bootstrap_interval([], [], paired=True, seed=0), 1) == \
        "inconclusive"
    assert judged(base, base)[0] == "inconclusive"
    # A threshold ("widely"): beyond it, short of it, or cannot tell.
    wide = {"low": 0.5, "high": 0.9}
    assert [report.verdict(wide, +1, t) for t in (0.3, 1.0, 0.7)] == \
        ["yes", "no", "inconclusive"]
    assert report.all_of(["yes", "yes"]) == "yes"
    assert report.all_of(["yes", "inconclusive"]) == "inconclusive"
    assert report.all_of(["inconclusive", "no"]) == "no"


def test_curve_interval_uses_the_iteration_noise():
    rng = np.random.default_rng(1)
    rising = np.linspace(0, 1, 60) + rng.normal(0, 0.05, 60)
    flat = rng.normal(0, 0.5, 60)
    sd = report._noise_sd(rising)
    assert 0.03 < sd < 0.07  # the trend does not count as noise
    gain = report.curve_interval(rising[-6:], rising[:6], sd, sd)
    assert report.verdict(gain, +1) == "yes" and gain["n"] == [6, 6]
    noisy = report._noise_sd(flat)
    assert report.verdict(report.curve_interval(flat[-6:], flat[:6], noisy, noisy), +1) == \
        "inconclusive"
    assert np.isnan(report._noise_sd(rising[:2]))  # too few iterations to tell


def ppo_curve(steps, start, gain, reference, seed):
    rng = np.random.default_rng(seed)
    reward = start + gain * np.arange(steps) / steps + rng.normal(0, 0.05, steps)
    return [{"step": i + 1, "reward": float(r), "reference_reward": reference,
             "reward_minus_reference": float(r - reference), "kl": 0.01 * i}
            for i, r in enumerate(reward)]


def test_reference_reward_figure_has_both_panels(tmp_path):
    curves = {"ppo": ppo_curve(60, 1.0, 0.5, 0.9, 0), "ppo_no_ref": ppo_curve(30, 1.0, 0.5, 0.0, 1)}
    figure = report.reference_reward_figure(curves, tmp_path / "fig4.png")
    assert Path(figure["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw, eq5 = figure["panels"]
    assert "raw reward" in raw["title"] and "reference reward (eq. 5)" in eq5["title"]
    for panel in figure["panels"]:
        assert (panel["xlabel"], panel["ylabel"]) == ("RL iteration", "reward")
        assert panel["legend"] == ["PPO", "PPO w/o reference reward"]
    # Moving averages over a tenth of the iterations, ending at each window's last iteration.
    series = eq5["series"]["PPO"]
    expected = np.convolve([r["reward_minus_reference"] for r in curves["ppo"]], np.ones(6) / 6,
                           mode="valid")
    np.testing.assert_allclose(series["y"], expected)
    assert series["x"][0] == 6 and series["x"][-1] == 60 and len(series["x"]) == 55
    # Without the reference reward there is nothing to subtract: both panels agree.
    assert eq5["series"]["PPO w/o reference reward"] == raw["series"]["PPO w/o reference reward"]


def test_gold_reward_run_gets_a_panel_of_its_own(tmp_path):
    """GRPO on the gold reward trains on gold quality, not the reward model's score: it is
    plotted apart from the reward-model runs, with its own y-axis label."""
    curves = {"ppo": ppo_curve(60, 1.0, 0.5, 0.9, 0), "grpo": ppo_curve(60, 1.0, 0.4, 0.9, 1),
              "grpo_gold": ppo_curve(60, 0.5, 0.2, 0.0, 2)}
    raw, eq5, gold = report.reference_reward_figure(curves, tmp_path / "fig4.png")["panels"]
    for panel in (raw, eq5):
        assert panel["legend"] == ["PPO", "GRPO"] and panel["ylabel"] == "reward"
    assert gold["legend"] == ["GRPO on the gold reward (RLVR)"]
    assert gold["ylabel"] == "gold quality" and "not the RM's scale" in gold["title"]
    expected = np.convolve([r["reward"] for r in curves["grpo_gold"]], np.ones(6) / 6,
                           mode="valid")
    np.testing.assert_allclose(gold["series"]["GRPO on the gold reward (RLVR)"]["y"], expected)


def synthetic_results(rng, n=120):
    """What the stages before the report return, with PPO clearly better than SFT, DPO the
    same as SFT, and length balancing barely changing the length preference (0.46 vs 0.47)."""
    tasks = [TASKS[i % len(TASKS)] for i in range(n)]
    sft_gold = rng.uniform(0.3, 0.8, n)
    reward = {t: 2.0 * i for i, t in enumerate(TASKS)}

    def rows(gold, tokens):
        return [{"prompt": f"p{i}", "task": t, "gold": float(g), "tokens": float(k),
                 "reward": reward[t] + float(rng.normal(0, 0.3)), "greedy_gold": float(g)}
                for i, (t, g, k) in enumerate(zip(tasks, gold, tokens, strict=True))]

    tokens = rng.uniform(3, 6, n)
    policies = {"sft": (sft_gold, tokens), "ppo": (sft_gold + 0.1 + rng.normal(0, 0.05, n),
                                                    tokens + 1 + rng.normal(0, 0.2, n)),
                "ppo_no_ref": (sft_gold, tokens), "ppo_no_sft": (sft_gold, tokens),
                "grpo": (sft_gold, tokens), "grpo_gold": (sft_gold + 0.2, tokens),
                "dpo": (sft_gold + rng.normal(0, 0.1, n), tokens + rng.normal(0, 0.5, n))}
    capability = [{"correct": True}] * 10
    evaluate = {name: {"rows": rows(*values), "capability": capability}
                for name, values in policies.items()}
    pairs = 250
    unbalanced = (rng.uniform(size=pairs) < 0.47).astype(float)
    balanced = unbalanced.copy()  # 20 pairs flip one way, 17 the other: 0.46 against 0.47
    balanced[np.flatnonzero(unbalanced == 1)[:20]] = 0.0
    balanced[np.flatnonzero(unbalanced == 0)[:17]] = 1.0
    steps = [{"step": s, "num_comparisons": 10, "avg_prompt_tokens": 5.0,
              "avg_response_tokens": 4.0} for s in ("raw", "balance_by_length")]
    bucket = [{"bucket": "1-2", "count": 10, "longer_wins": 0.5}]

    def rm(longer):
        return {"train": {"accuracy": 0.7},
                "test": {"accuracy": 0.65, "longer_preferred": float(np.mean(longer)),
                         "pair_length_correlation": 0.1,
                         "longer_scored_higher": [None, *longer.tolist()]}}

    return {"clean": {"steps": steps, "longer_wins_before": bucket, "longer_wins_after": bucket,
                      "test_longer_wins": 0.55, "bayes_accuracy_test": 0.85,
                      "bayes_accuracy_train": 0.85},
            "rm": rm(balanced), "rm_unbalanced": rm(unbalanced), "evaluate": evaluate}


def test_report_verdicts_and_intervals(tmp_path):
    results = synthetic_results(np.random.default_rng(0))
    for name, curve in (("ppo", ppo_curve(60, 1.0, 0.5, 0.95, 2)),
                        ("ppo_no_ref", ppo_curve(60, 1.0, 0.5, 0.0, 3)),
                        ("grpo", ppo_curve(60, 1.0, 0.5, 0.95, 4)),
                        ("grpo_gold", ppo_curve(60, 0.5, 0.2, 0.0, 5))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in curve))
    summary = report.write_report(tmp_path, results, config_with())
    found = {f["claim"].split(" (")[0]: f for f in summary["findings"]}
    verdicts = {claim: f["reproduced"] for claim, f in found.items()}
    assert verdicts == {
        "Bucket-based length balancing lowers the reward model's preference for longer "
        "responses": "inconclusive",  # 0.46 against 0.47: within the noise
        "PPO beats SFT on response quality": "yes",
        "DPO beats SFT on response quality": "inconclusive",
        "PPO and DPO give longer responses than SFT": "inconclusive",  # DPO's are not
        "PPO's responses are shorter than DPO's, at higher quality": "no",
        "With the reference reward, PPO's reward starts near zero": "yes",
        "Both PPO runs improve the reward similarly": "yes",
        "The SFT loss in PPO prevents capability forgetting": "inconclusive",  # none forgets
        "Rewards differ widely across tasks": "yes"}
    data = json.loads(Path(summary["json"]).read_text())
    gold = data["intervals"]["gold_ppo_minus_sft"]
    assert gold["low"] < gold["difference"] < gold["high"] and gold["n"] == [120, 120]
    assert data["intervals"]["longer_preferred_balanced_minus_unbalanced"]["n"] == [250, 250]
    markdown = Path(summary["markdown"]).read_text()
    shown = (f"gold_ppo_minus_sft {gold['difference']:+.3f} [{gold['low']:+.3f}, "
             f"{gold['high']:+.3f}]")
    assert shown in markdown and "| **inconclusive** |" in markdown
    assert "1000 resamples" in markdown
    # The GRPO runs get rows in Tables 4 and 6 and Figure 4's table, and no verdicts: the
    # gold-reward run beats SFT on every prompt (+0.2), and its reward is labelled gold quality.
    assert "| GRPO on the gold reward (RLVR) | all | 1.000 | 0.000 | 0.000 |" in markdown
    assert data["win_tie_loss"]["grpo"]["all"]["tie"] == 1.0
    for name in ("grpo", "grpo_gold"):
        assert f"| {report.LABELS[name]} | {data['response_tokens'][name]:.3f} |" in markdown
    assert data["reference_reward"]["grpo_gold"]["last_kl"] == pytest.approx(0.59)
    assert "| GRPO on the gold reward (RLVR) | gold quality |" in markdown
    assert "| GRPO | reward model |" in markdown
    assert not any("grpo" in name for name in data["intervals"])
    # Seeded by config.seed: the same report again.
    again = report.write_report(tmp_path, results, config_with())
    assert again["findings"] == summary["findings"]
