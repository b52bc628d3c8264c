"""The pipeline's report: the paper's tables and figures recomputed from what the run wrote,
as Markdown, JSON and PNG in the work directory, and the findings stated plainly.

The reporter only reads and summarises; it never tunes anything toward a result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from glm_jax.pipeline.world import TASKS

RL_POLICIES = ("ppo", "dpo", "ppo_no_ref", "ppo_no_sft")
LABELS = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO", "ppo_no_ref": "PPO w/o reference reward",
          "ppo_no_sft": "PPO w/o SFT loss"}
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


def _reward_ends(curve: list[dict]) -> dict[str, float]:
    """Reward at the start and end of a PPO run, each the mean over a tenth of the iterations
    (at least one): one iteration's batch mixes the tasks, whose rewards differ widely."""
    window = max(1, len(curve) // 10)

    def mean(rows: list[dict], key: str) -> float:
        return float(np.mean([r.get(key, r["reward"]) for r in rows]))

    return {"first_reward": mean(curve[:window], "reward"),
            "last_reward": mean(curve[-window:], "reward"),
            "first_score": mean(curve[:window], "reward_minus_reference"),
            "last_kl": curve[-1]["kl"], "max_kl": max(r["kl"] for r in curve)}


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


def _plots(workdir: Path, curves: dict[str, list[dict]], rewards: dict[str, list[float]]
           ) -> dict[str, str]:
    """Figure 4 (reward and KL during PPO with and without the reference reward) and
    Figure 3 (reward distribution per task) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["reward"] for r in rows], label=LABELS[name])
        axes[1].plot(steps, [r["kl"] for r in rows], label=LABELS[name])
    for ax, title in zip(axes, ("reward (reward model)", "estimated KL to the SFT policy"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.legend()
    fig.tight_layout()
    files["reference_reward"] = str(workdir / "report_reference_reward.png")
    fig.savefig(files["reference_reward"], dpi=100)
    plt.close(fig)

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
    curves = {name: _metrics(workdir, name) for name in ("ppo", "ppo_no_ref")}
    data["reference_reward"] = {name: _reward_ends(c) for name, c in curves.items() if c}
    rewards = {t: [r["reward"] for r in rows["sft"] if r["task"] == t] for t in TASKS}
    data["reward_distributions"] = {t: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                                    for t, v in rewards.items()}
    data["figures"] = _plots(workdir, curves, rewards)
    data["findings"] = findings(data)

    markdown = render_markdown(data)
    (workdir / "report.md").write_text(markdown)
    (workdir / "report.json").write_text(json.dumps(data, indent=1))
    return {"markdown": str(workdir / "report.md"), "json": str(workdir / "report.json"),
            "figures": data["figures"], "findings": data["findings"]}


def findings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims, each with what this run measured and whether it reproduced."""
    rm, wtl, gold = data["reward_model"], data["win_tie_loss"], data["gold_quality"]
    tokens, capability = data["response_tokens"], data["capability_accuracy"]
    out = []

    def claim(text: str, measured: str, held: bool) -> None:
        out.append({"claim": text, "measured": measured, "reproduced": bool(held)})

    balanced, unbalanced = rm["rm"]["longer_preferred"], rm["rm_unbalanced"]["longer_preferred"]
    claim("Bucket-based length balancing lowers the reward model's preference for longer "
          "responses (3.3)",
          f"the longer response of a test pair scores higher in {balanced:.3f} of pairs with "
          f"balancing, {unbalanced:.3f} without", balanced < unbalanced)
    for name in ("ppo", "dpo"):
        w = wtl[name]["all"]
        claim(f"{LABELS[name]} beats SFT on response quality (Table 4)",
              f"gold-quality win/tie/loss {w['win']:.2f}/{w['tie']:.2f}/{w['loss']:.2f}, mean "
              f"gold {gold[name]:.3f} vs SFT {gold['sft']:.3f}",
              w["win"] > w["loss"] and gold[name] > gold["sft"])
    claim("PPO and DPO give longer responses than SFT (Table 6)",
          f"mean tokens SFT {tokens['sft']:.2f}, PPO {tokens['ppo']:.2f}, DPO {tokens['dpo']:.2f}",
          tokens["ppo"] > tokens["sft"] and tokens["dpo"] > tokens["sft"])
    claim("PPO's responses are shorter than DPO's, at higher quality (5.3)",
          f"PPO {tokens['ppo']:.2f} tokens, gold {gold['ppo']:.3f}; DPO {tokens['dpo']:.2f} "
          f"tokens, gold {gold['dpo']:.3f}",
          tokens["ppo"] < tokens["dpo"] and gold["ppo"] > gold["dpo"])
    ref = data["reference_reward"]
    if "ppo" in ref and "ppo_no_ref" in ref:
        claim("With the reference reward, PPO's reward starts near zero (Figure 4)",
              f"early reward minus reference {ref['ppo']['first_score']:+.3f} with, "
              f"reward {ref['ppo_no_ref']['first_reward']:+.3f} without",
              abs(ref["ppo"]["first_score"]) < abs(ref["ppo_no_ref"]["first_reward"]))
        claim("Both PPO runs improve the reward similarly (Figure 4)",
              f"reward gain {ref['ppo']['last_reward'] - ref['ppo']['first_reward']:+.3f} "
              f"with, {ref['ppo_no_ref']['last_reward'] - ref['ppo_no_ref']['first_reward']:+.3f}"
              f" without",
              (ref["ppo"]["last_reward"] > ref["ppo"]["first_reward"])
              and (ref["ppo_no_ref"]["last_reward"] > ref["ppo_no_ref"]["first_reward"]))
    claim("The SFT loss in PPO prevents capability forgetting (3.4)",
          f"capability accuracy SFT {capability['sft']:.2f}, PPO {capability['ppo']:.2f}, "
          f"PPO w/o SFT loss {capability['ppo_no_sft']:.2f}",
          capability["ppo"] >= capability["ppo_no_sft"]
          and capability["ppo_no_sft"] < capability["sft"])
    spread = data["reward_distributions"]
    means = [v["mean"] for v in spread.values()]
    claim("Rewards differ widely across tasks (Figure 3)",
          "mean reward per task " + ", ".join(f"{t} {v['mean']:+.2f}" for t, v in spread.items()),
          max(means) - min(means) > np.mean([v["std"] for v in spread.values()]))
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
              "mean over its samples, and a win is a higher mean than SFT's on that prompt.",
              _table(["policy", "task", "win", "tie", "loss", "mean gold", "SFT mean gold"],
                     rows)]
    parts += ["## Response length (Table 6)",
              _table(["policy", "mean response tokens", "mean gold quality",
                      "mean gold quality, greedy"],
                     [[LABELS[n], data["response_tokens"][n], data["gold_quality"][n],
                       data["greedy_gold_quality"][n]] for n in data["response_tokens"]])]
    ref = data["reference_reward"]
    parts += ["## Reference reward (Figure 4)",
              f"![reward and KL]({Path(data['figures']['reference_reward']).name})",
              "First and last reward: means over the first and the last tenth of the "
              "iterations.",
              _table(["run", "first reward", "last reward", "last KL", "max KL"],
                     [[LABELS[n], r["first_reward"], r["last_reward"], r["last_kl"],
                       r["max_kl"]] for n, r in ref.items()])]
    parts += ["## Capability retention",
              _table(["policy", "capability-set accuracy"],
                     [[LABELS[n], v] for n, v in data["capability_accuracy"].items()])]
    parts += ["## Reward distributions per task (Figure 3)",
              f"![reward per task]({Path(data['figures']['reward_distributions']).name})",
              _table(["task", "mean reward", "std"],
                     [[t, v["mean"], v["std"]] for t, v in data["reward_distributions"].items()])]
    parts += ["## Findings",
              _table(["paper's finding", "measured here", "reproduced"],
                     [[f["claim"], f["measured"], "yes" if f["reproduced"] else "**no**"]
                      for f in data["findings"]])]
    return "\n\n".join(parts) + "\n"
