"""The pipeline's report: the paper's tables and figures recomputed from what the run wrote,
as Markdown, JSON and PNG in the work directory, and the findings stated plainly.

The reporter only reads and summarises; it never tunes anything toward a result.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from glm_jax.pipeline.world import TASKS
from glm_jax.train.workdir import write_file

RL_POLICIES = ("ppo", "dpo", "grpo", "grpo_gold", "ppo_no_ref", "ppo_no_sft")
LABELS = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO", "ppo_no_ref": "PPO w/o reference reward",
          "ppo_no_sft": "PPO w/o SFT loss", "grpo": "GRPO",
          "grpo_gold": "GRPO on the gold reward (RLVR)"}
# The RL runs whose training reward is the world's gold quality (a rule), not the reward
# model's score: another scale, plotted apart.
GOLD_REWARD_RUNS = ("grpo_gold",)
CURVES = ("ppo", "ppo_no_ref", "grpo", "grpo_gold")  # the runs in Figure 4
SECTIONS = ("Data statistics", "Reward model accuracy", "Gold-quality win/tie/loss against SFT",
            "Response length", "Reference reward", "Capability retention",
            "Reward distributions per task", "Findings")


def win_tie_loss(policy: list[dict], baseline: list[dict], task: str | None = None
                 ) -> dict[str, float]:
    """Per prompt, the policy's gold quality against the baseline's: fractions of wins,
    ties and losses, and both mean gold qualities."""
    pairs = [(p["gold"], b["gold"]) for p, b in zip(policy, baseline, strict=True)
             if task is None or p["task"] == task]
    diffs = np.array([p - b for p, b in pairs])
    return {"win": float(np.mean(diffs > 1e-9)), "tie": float(np.mean(np.abs(diffs) <= 1e-9)),
            "loss": float(np.mean(diffs < -1e-9)), "n": len(pairs),
            "gold": float(np.mean([p for p, _ in pairs])),
            "gold_sft": float(np.mean([b for _, b in pairs]))}


RESAMPLES, LEVEL = 1000, 0.95
VERDICTS = ("yes", "no", "inconclusive")


def bootstrap_interval(a: Any, b: Any, *, paired: bool, seed: Any,
                       resamples: int = RESAMPLES, level: float = LEVEL) -> dict[str, Any]:
    """mean(a) - mean(b) with its percentile bootstrap interval over the units (prompts,
    pairs, items): `resamples` resamples, seeded. a `[n]`, b `[m]`; `paired`: a[i] and b[i]
    are the same unit's (n == m), resampled together. Empty sides give NaNs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = {"difference": float("nan"), "low": float("nan"), "high": float("nan"),
           "n": [len(a), len(b)], "method": f"{'paired ' if paired else ''}bootstrap over "
           f"units, {resamples} resamples, {level:.0%} interval"}
    if not len(a) or not len(b):
        return out
    rng = np.random.default_rng(seed)
    if paired:
        diffs = a - b
        stats = diffs[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1)
    else:
        stats = (a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1)
                 - b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1))
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {**out, "difference": float(a.mean() - b.mean()), "low": float(low),
            "high": float(high)}


def verdict(interval: dict[str, Any], direction: int, threshold: float = 0.0) -> str:
    """"yes" when the interval lies beyond `threshold` in the claimed direction (+1: above,
    -1: below), "no" when it lies beyond it the other way, else (or NaN) "inconclusive"."""
    low, high = interval["low"] - threshold, interval["high"] - threshold
    if low > 0:
        return "yes" if direction > 0 else "no"
    if high < 0:
        return "yes" if direction < 0 else "no"
    return "inconclusive"


def all_of(verdicts: list[str]) -> str:
    """A claim made of several comparisons: "no" if any is "no", "yes" if all are "yes"."""
    return "no" if "no" in verdicts else "yes" if set(verdicts) == {"yes"} else "inconclusive"


def _window(curve: list[dict]) -> int:
    """A tenth of the iterations (at least one): the first / last reward's average, and the
    figure's moving average. One iteration's batch mixes the tasks, whose rewards differ."""
    return max(1, len(curve) // 10)


def _values(curve: list[dict], key: str) -> np.ndarray:
    # Metrics written before `reward_minus_reference` existed: no reference, the reward.
    return np.array([r.get(key, r["reward"]) for r in curve], np.float64)


def _noise_sd(values: np.ndarray) -> float:
    """One iteration's noise around the trend: the spread of consecutive differences / sqrt 2
    (NaN below 3 iterations)."""
    return float(np.std(np.diff(values), ddof=1) / np.sqrt(2)) if len(values) >= 3 else math.nan


def curve_interval(first: np.ndarray, second: np.ndarray, sd_first: float, sd_second: float,
                   *, absolute: bool = False, level: float = LEVEL) -> dict[str, Any]:
    """mean(first) - mean(second) (of their absolute values with `absolute`), each a window of
    one run's logged iterations, with the normal interval from each run's iteration noise
    `sd_*` (the curves have one number per iteration, no per-prompt values)."""
    m1, m2 = float(np.mean(first)), float(np.mean(second))
    difference = abs(m1) - abs(m2) if absolute else m1 - m2
    half = (statistics.NormalDist().inv_cdf((1 + level) / 2)
            * math.sqrt(sd_first ** 2 / len(first) + sd_second ** 2 / len(second)))
    return {"difference": difference, "low": difference - half, "high": difference + half,
            "n": [len(first), len(second)],
            "method": f"normal {level:.0%} interval from the iteration-to-iteration noise"}


def _reward_ends(curve: list[dict]) -> dict[str, float]:
    """Reward at the start and end of a PPO run, each the mean over `_window` iterations."""
    window = _window(curve)
    reward, score = _values(curve, "reward"), _values(curve, "reward_minus_reference")
    return {"first_reward": float(reward[:window].mean()),
            "last_reward": float(reward[-window:].mean()),
            "first_score": float(score[:window].mean()),
            "last_kl": curve[-1]["kl"], "max_kl": max(r["kl"] for r in curve)}


def moving_average(values: Any, window: int) -> np.ndarray:
    """Trailing mean over `window` values: `[n]` -> `[n - window + 1]` (`[0]` when shorter)."""
    values = np.asarray(values, np.float64)
    if len(values) < window:
        return np.zeros(0)
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _metrics(workdir: Path, stage: str) -> list[dict[str, Any]]:
    path = workdir / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def reference_reward_figure(curves: dict[str, list[dict]], path: str | Path
                            ) -> dict[str, Any]:
    """Figure 4 as a PNG at `path`: per RL run (`curves`: its metrics.jsonl rows), the raw
    reward beside the reward minus the reference reward (eq. 5: what PPO with the reference
    reward trains on; a run without has none to subtract), each a moving average over a tenth
    of the iterations. The runs of `GOLD_REWARD_RUNS` train on the gold quality, not on the
    reward model's score: their reward gets a third panel of its own scale. Returns what each
    panel shows: title, axis labels, legend and the plotted (x, y) series per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = {n: c for n, c in curves.items() if n not in GOLD_REWARD_RUNS}
    gold = {n: c for n, c in curves.items() if n in GOLD_REWARD_RUNS}
    plotted = [("raw reward (reward model)", "reward", "reward", model),
               ("reward minus reference reward (eq. 5)", "reward_minus_reference", "reward",
                model)]
    if gold:
        plotted.append(("gold quality (rule reward, not the RM's scale)", "reward",
                        "gold quality", gold))
    fig, axes = plt.subplots(1, len(plotted), figsize=(5 * len(plotted), 3.6))
    axes[1].sharey(axes[0])  # the reward model's scale
    colors = {name: f"C{i}" for i, name in enumerate(curves)}  # a run's in every panel
    panels = []
    for ax, (title, key, ylabel, runs) in zip(axes, plotted, strict=True):
        series = {}
        for name, rows in runs.items():
            window = _window(rows)
            x = [r["step"] for r in rows][window - 1:]
            y = moving_average(_values(rows, key), window)
            ax.plot(x, y, label=LABELS[name], color=colors[name])
            series[LABELS[name]] = {"x": x, "y": y.tolist()}
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(title)
        ax.set_xlabel("RL iteration")
        ax.set_ylabel(ylabel)
        ax.legend()
        panels.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(),
                       "ylabel": ax.get_ylabel(),
                       "legend": [t.get_text() for t in ax.get_legend().get_texts()],
                       "series": series})
    fig.suptitle("moving average over a tenth of the iterations")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"file": str(path), "panels": panels}


def _plots(workdir: Path, curves: dict[str, list[dict]], rewards: dict[str, list[float]]
           ) -> dict[str, str]:
    """Figure 4 (`reference_reward_figure`) and Figure 3 (reward distribution per task) as
    PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {"reference_reward": reference_reward_figure(
        curves, workdir / "report_reference_reward.png")["file"]}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.boxplot([rewards[t] for t in TASKS], tick_labels=list(TASKS))
    ax.set_title("reward of SFT responses per task (held-out prompts)")
    ax.set_ylabel("reward")
    fig.tight_layout()
    files["reward_distributions"] = str(workdir / "report_reward_distributions.png")
    fig.savefig(files["reward_distributions"], dpi=100)
    plt.close(fig)
    return files


def write_report(workdir: str | Path, results: dict[str, Any], config: ConfigDict
                 ) -> dict[str, Any]:
    """Writes report.md, report.json and the PNG figures; returns their paths and the
    findings."""
    workdir = Path(workdir)
    clean, evaluate = results["clean"], results["evaluate"]
    rows = {name: evaluate[name]["rows"] for name in evaluate}
    data: dict[str, Any] = {"config": {
        "seed": config.seed, "eval_samples": config.pipeline.eval_samples,
        "temperature": config.ppo.temperature, "top_k": config.ppo.top_k,
        "top_p": config.ppo.top_p}}

    # Table 2 and the length bias per bucket.
    data["data_statistics"] = clean["steps"]
    data["longer_wins"] = [
        {"bucket": b["bucket"], "count_before": b["count"], "longer_wins_before": b["longer_wins"],
         "count_after": a["count"], "longer_wins_after": a["longer_wins"]}
        for b, a in zip(clean["longer_wins_before"], clean["longer_wins_after"], strict=True)]

    # Table 5.
    data["reward_model"] = {
        name: {"train_accuracy": results[name]["train"]["accuracy"],
               "test_accuracy": results[name]["test"]["accuracy"],
               "longer_preferred": results[name]["test"]["longer_preferred"],
               "pair_length_correlation": results[name]["test"]["pair_length_correlation"]}
        for name in ("rm", "rm_unbalanced")}
    data["bayes_accuracy"] = {"test": clean["bayes_accuracy_test"],
                              "train": clean["bayes_accuracy_train"]}
    data["annotators_longer_wins"] = clean["test_longer_wins"]

    # Table 4, Table 6, capability.
    data["win_tie_loss"] = {
        name: {"all": win_tie_loss(rows[name], rows["sft"]),
               **{t: win_tie_loss(rows[name], rows["sft"], t) for t in TASKS}}
        for name in RL_POLICIES}
    data["gold_quality"] = {name: float(np.mean([r["gold"] for r in rows[name]]))
                            for name in rows}
    data["greedy_gold_quality"] = {name: float(np.mean([r["greedy_gold"] for r in rows[name]]))
                                   for name in rows}
    data["response_tokens"] = {name: float(np.mean([r["tokens"] for r in rows[name]]))
                               for name in rows}
    data["capability_accuracy"] = {
        name: float(np.mean([c["correct"] for c in evaluate[name]["capability"]]))
        for name in evaluate}

    # Figure 4 and Figure 3.
    curves = {name: c for name in CURVES if (c := _metrics(workdir, name))}
    data["reference_reward"] = {name: _reward_ends(c) for name, c in curves.items()}
    rewards = {t: [r["reward"] for r in rows["sft"] if r["task"] == t] for t in TASKS}
    data["reward_distributions"] = {t: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                                    for t, v in rewards.items()}
    data["figures"] = _plots(workdir, curves, rewards)
    data["intervals"] = intervals(results, curves, config.seed)
    data["findings"] = findings(data)

    markdown = render_markdown(data)
    write_file(workdir / "report.md", markdown)
    write_file(workdir / "report.json", json.dumps(data, indent=1))
    return {"markdown": str(workdir / "report.md"), "json": str(workdir / "report.json"),
            "figures": data["figures"], "findings": data["findings"]}


def intervals(results: dict[str, Any], curves: dict[str, list[dict]], seed: int
              ) -> dict[str, dict[str, Any]]:
    """Each difference a finding rests on, with its 95% interval (`bootstrap_interval` over
    the held-out prompts, test pairs or capability items, paired where both sides answered the
    same ones; `curve_interval` for the PPO curves). Seeded by `seed`: a rerun reports the
    same intervals."""
    evaluate, out = results["evaluate"], {}
    column = {name: {key: [r[key] for r in evaluate[name]["rows"]] for key in ("gold", "tokens")}
              for name in evaluate}

    def paired(name: str, a: list[float], b: list[float]) -> None:
        out[name] = bootstrap_interval(a, b, paired=True, seed=[seed, len(out)])

    # The test pairs whose responses differ in length (the same pairs for both models).
    balanced, unbalanced = (results[n]["test"]["longer_scored_higher"]
                            for n in ("rm", "rm_unbalanced"))
    both = [(x, y) for x, y in zip(balanced, unbalanced, strict=True) if x is not None]
    paired("longer_preferred_balanced_minus_unbalanced", [x for x, _ in both],
           [y for _, y in both])
    for a, b in (("ppo", "sft"), ("dpo", "sft"), ("ppo", "dpo")):
        for key in ("gold", "tokens"):
            paired(f"{key}_{a}_minus_{b}", column[a][key], column[b][key])
    correct = {name: [float(c["correct"]) for c in evaluate[name]["capability"]]
               for name in evaluate}
    paired("capability_ppo_minus_ppo_no_sft", correct["ppo"], correct["ppo_no_sft"])
    paired("capability_ppo_no_sft_minus_sft", correct["ppo_no_sft"], correct["sft"])
    rewards = {t: [r["reward"] for r in evaluate["sft"]["rows"] if r["task"] == t]
               for t in TASKS}
    means = {t: np.mean(v) if v else math.nan for t, v in rewards.items()}
    top, bottom = max(means, key=means.get), min(means, key=means.get)
    out["task_reward_gap"] = {
        **bootstrap_interval(rewards[top], rewards[bottom], paired=False, seed=[seed, len(out)]),
        "tasks": [top, bottom]}
    if {"ppo", "ppo_no_ref"} <= set(curves):
        first = {}
        for name, key in (("ppo", "reward_minus_reference"), ("ppo_no_ref", "reward")):
            values = _values(curves[name], key)
            first[name] = (values[:_window(curves[name])], _noise_sd(values))
        out["first_abs_reward_ppo_minus_ppo_no_ref"] = curve_interval(
            first["ppo"][0], first["ppo_no_ref"][0], first["ppo"][1], first["ppo_no_ref"][1],
            absolute=True)
        for name in ("ppo", "ppo_no_ref"):
            curve = curves[name]
            values, window = _values(curve, "reward"), _window(curve)
            sd = _noise_sd(values)
            out[f"reward_gain_{name}"] = curve_interval(values[-window:], values[:window], sd,
                                                        sd)
    return out


def _shown(interval: dict[str, Any]) -> str:
    return (f"{interval['difference']:+.3f} [{interval['low']:+.3f}, "
            f"{interval['high']:+.3f}]")


def findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims, each with what this run measured, the differences it rests on with
    their 95% intervals (`data["intervals"]`), and whether it reproduced: "yes" when every
    interval lies on the claimed side of 0, "no" when one lies on the other side, else
    "inconclusive" (the run cannot tell the difference from its noise)."""
    rm, wtl, gold = data["reward_model"], data["win_tie_loss"], data["gold_quality"]
    tokens, capability = data["response_tokens"], data["capability_accuracy"]
    ci = data["intervals"]
    out = []

    def claim(text: str, measured: str, tests: list[tuple[str, int]],
              threshold: float = 0.0) -> None:
        """tests: (interval name, claimed sign of its difference)."""
        out.append({"claim": text, "measured": measured,
                    "intervals": "; ".join(f"{name} {_shown(ci[name])}" for name, _ in tests),
                    "reproduced": all_of([verdict(ci[name], sign, threshold)
                                          for name, sign in tests])})

    balanced, unbalanced = rm["rm"]["longer_preferred"], rm["rm_unbalanced"]["longer_preferred"]
    claim("Bucket-based length balancing lowers the reward model's preference for longer "
          "responses (3.3)",
          f"the longer response of a test pair scores higher in {balanced:.3f} of pairs with "
          f"balancing, {unbalanced:.3f} without",
          [("longer_preferred_balanced_minus_unbalanced", -1)])
    for name in ("ppo", "dpo"):
        w = wtl[name]["all"]
        claim(f"{LABELS[name]} beats SFT on response quality (Table 4)",
              f"gold-quality win/tie/loss {w['win']:.2f}/{w['tie']:.2f}/{w['loss']:.2f}, mean "
              f"gold {gold[name]:.3f} vs SFT {gold['sft']:.3f}",
              [(f"gold_{name}_minus_sft", +1)])
    claim("PPO and DPO give longer responses than SFT (Table 6)",
          f"mean tokens SFT {tokens['sft']:.2f}, PPO {tokens['ppo']:.2f}, DPO {tokens['dpo']:.2f}",
          [("tokens_ppo_minus_sft", +1), ("tokens_dpo_minus_sft", +1)])
    claim("PPO's responses are shorter than DPO's, at higher quality (5.3)",
          f"PPO {tokens['ppo']:.2f} tokens, gold {gold['ppo']:.3f}; DPO {tokens['dpo']:.2f} "
          f"tokens, gold {gold['dpo']:.3f}",
          [("tokens_ppo_minus_dpo", -1), ("gold_ppo_minus_dpo", +1)])
    ref = data["reference_reward"]
    if "first_abs_reward_ppo_minus_ppo_no_ref" in ci:
        claim("With the reference reward, PPO's reward starts near zero (Figure 4)",
              f"early reward minus reference {ref['ppo']['first_score']:+.3f} with, "
              f"reward {ref['ppo_no_ref']['first_reward']:+.3f} without (their sizes compared)",
              [("first_abs_reward_ppo_minus_ppo_no_ref", -1)])
        claim("Both PPO runs improve the reward similarly (Figure 4)",
              f"reward gain {ref['ppo']['last_reward'] - ref['ppo']['first_reward']:+.3f} "
              f"with, {ref['ppo_no_ref']['last_reward'] - ref['ppo_no_ref']['first_reward']:+.3f}"
              f" without",
              [("reward_gain_ppo", +1), ("reward_gain_ppo_no_ref", +1)])
    claim("The SFT loss in PPO prevents capability forgetting (3.4)",
          f"capability accuracy SFT {capability['sft']:.2f}, PPO {capability['ppo']:.2f}, "
          f"PPO w/o SFT loss {capability['ppo_no_sft']:.2f}",
          [("capability_ppo_no_sft_minus_sft", -1), ("capability_ppo_minus_ppo_no_sft", +1)])
    spread = data["reward_distributions"]
    within = float(np.mean([v["std"] for v in spread.values()]))
    top, bottom = ci["task_reward_gap"]["tasks"]
    claim("Rewards differ widely across tasks (Figure 3)",
          "mean reward per task " + ", ".join(f"{t} {v['mean']:+.2f}" for t, v in spread.items())
          + f"; widely: the gap between {top} and {bottom} beyond the mean within-task "
          f"standard deviation {within:.2f}",
          [("task_reward_gap", +1)], threshold=within)
    return out


def render_markdown(data: dict[str, Any]) -> str:
    rm, bayes = data["reward_model"], data["bayes_accuracy"]
    parts = ["# ChatGLM-RLHF in miniature: the report",
             "Every number below was measured by this run on the synthetic world "
             "(glm_jax/pipeline/world.py); gold quality is the world's hidden ground truth, "
             "which the annotators, the reward model and the policies never see."]
    parts += ["## Data statistics (Table 2)",
              _table(["step", "comparisons", "prompt tokens", "response tokens"],
                     [[s["step"], s["num_comparisons"], s["avg_prompt_tokens"],
                       s["avg_response_tokens"]] for s in data["data_statistics"]]),
              "Fraction of pairs whose longer response was chosen, per bucket of "
              "|len(chosen) - len(rejected)| tokens, before and after length balancing:",
              _table(["bucket", "pairs before", "longer wins before", "pairs after",
                      "longer wins after"],
                     [[b["bucket"], b["count_before"], b["longer_wins_before"],
                       b["count_after"], b["longer_wins_after"]] for b in data["longer_wins"]])]
    parts += ["## Reward model accuracy (Table 5)",
              _table(["reward model", "train accuracy", "test accuracy",
                      "Bayes-optimal test accuracy", "longer response scores higher (test)",
                      "reward-length correlation (test)"],
                     [[name, rm[key]["train_accuracy"], rm[key]["test_accuracy"],
                       bayes["test"], rm[key]["longer_preferred"],
                       rm[key]["pair_length_correlation"]]
                      for key, name in (("rm", "length-balanced"),
                                        ("rm_unbalanced", "without balancing"))]),
              "The Bayes-optimal accuracy is that of a predictor that knows the annotators' "
              "noise and length bias: no reward model can expect more. \"Longer response "
              "scores higher\" is, of the test pairs whose responses differ in length, the "
              "fraction where the "
              "reward model scores the longer one higher (the annotators chose the longer "
              f"one in {data['annotators_longer_wins']:.3f} of them). The correlation is "
              "within test pairs: of the reward difference with the response-length "
              "difference (uncentred, so it does not depend on which response was chosen)."]
    wtl = data["win_tie_loss"]
    rows = []
    for name in RL_POLICIES:
        for task in ("all", *TASKS):
            w = wtl[name][task]
            rows.append([LABELS[name], task, w["win"], w["tie"], w["loss"], w["gold"],
                         w["gold_sft"]])
    setting = data["config"]
    parts += ["## Gold-quality win/tie/loss against SFT (Table 4)",
              f"Each policy answers every held-out prompt {setting['eval_samples']} times, "
              f"sampled as in PPO's rollouts (temperature {setting['temperature']}, top-k "
              f"{setting['top_k']}, top-p {setting['top_p']}); a prompt's gold quality is the "
              "mean over its samples, and a win is a higher mean than SFT's on that prompt. "
              "GRPO on the gold reward optimises this gold quality itself (RLVR): a ceiling "
              "for the runs that optimise the reward model, not an RLHF result.",
              _table(["policy", "task", "win", "tie", "loss", "mean gold", "SFT mean gold"],
                     rows)]
    parts += ["## Response length (Table 6)",
              _table(["policy", "mean response tokens", "mean gold quality",
                      "mean gold quality, greedy"],
                     [[LABELS[n], data["response_tokens"][n], data["gold_quality"][n],
                       data["greedy_gold_quality"][n]] for n in data["response_tokens"]])]
    ref = data["reference_reward"]
    parts += ["## Reference reward (Figure 4)",
              f"![reward and reward minus reference reward]"
              f"({Path(data['figures']['reference_reward']).name})",
              "The raw reward and the reward minus the reference reward (eq. 5, what PPO with "
              "the reference reward trains on; the run without has none to subtract; GRPO's "
              "group baseline cancels it), moving averages over a tenth of the iterations. "
              f"{' and '.join(LABELS[n] for n in GOLD_REWARD_RUNS)} trains on the world's gold "
              "quality (in [0, 1]) instead of the reward model's score: its rewards, in their "
              "own panel, are on another scale. First and last reward: means over the first and "
              "the last tenth of the iterations. KL: summed over the response tokens, each "
              "run's estimator (config.ppo.kl_kind for PPO, k3 for GRPO).",
              _table(["run", "reward", "first reward", "last reward", "last KL", "max KL"],
                     [[LABELS[n], "gold quality" if n in GOLD_REWARD_RUNS else "reward model",
                       r["first_reward"], r["last_reward"], r["last_kl"], r["max_kl"]]
                      for n, r in ref.items()])]
    parts += ["## Capability retention",
              _table(["policy", "capability-set accuracy"],
                     [[LABELS[n], v] for n, v in data["capability_accuracy"].items()])]
    parts += ["## Reward distributions per task (Figure 3)",
              f"![reward per task]({Path(data['figures']['reward_distributions']).name})",
              _table(["task", "mean reward", "std"],
                     [[t, v["mean"], v["std"]] for t, v in data["reward_distributions"].items()])]
    parts += ["## Findings",
              "A finding is reproduced when the difference it claims is beyond this run's "
              f"noise: each difference is shown with its {LEVEL:.0%} interval, a bootstrap "
              f"over the held-out prompts ({RESAMPLES} resamples, paired: every policy answered "
              "the same prompts; the test pairs for the reward models, the capability items "
              "for capability), and for the PPO curves, which have one number per iteration, "
              "a normal interval from the iteration-to-iteration noise. \"yes\": every "
              "interval lies on the claimed side of 0 (of the stated threshold for \"widely\"); "
              "\"no\": one lies on the other side; \"inconclusive\": the run cannot tell.",
              _table(["paper's finding", "measured here", f"difference [{LEVEL:.0%} interval]",
                      "reproduced"],
                     [[f["claim"], f["measured"], f["intervals"],
                       f["reproduced"] if f["reproduced"] == "yes" else f"**{f['reproduced']}**"]
                      for f in data["findings"]])]
    return "\n\n".join(parts) + "\n"
