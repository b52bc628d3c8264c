"""Evaluating and scoring with a trained reward model: the eval script and the notebook."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import separable_pairs, tiny_rm_config

from glm_jax.data.records import SFTExample, write_jsonl
from glm_jax.train.reward import run_eval_cli, train_reward_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm_eval")
    config = tiny_rm_config(tmp_path, num_steps=40, eval_every=0, learning_rate=2e-3)
    train_reward_model(config, tmp_path / "rm")
    pairs = separable_pairs(48, seed=7)
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    responses = [SFTExample(prompt=p.prompt, response=r, task=p.task)
                 for p in pairs for r in (p.chosen, p.rejected)]
    write_jsonl(tmp_path / "responses.jsonl", responses)
    return config, tmp_path


def test_eval_cli_pairs_and_scores_agree(rm_workdir):
    config, tmp_path = rm_workdir
    summary = run_eval_cli(config, tmp_path / "rm", pairs=str(tmp_path / "pairs.jsonl"),
                           output=str(tmp_path / "eval.json"),
                           responses=str(tmp_path / "responses.jsonl"),
                           scores_output=str(tmp_path / "scores.jsonl"))
    assert summary["pairs"] == 48 and summary["scored_responses"] == 96
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == summary["accuracy"]
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [s["response"] for s in scored[:2]] == [separable_pairs(48, 7)[0].chosen,
                                                   separable_pairs(48, 7)[0].rejected]
    # Scoring single responses and scoring pairs must agree on every pair.
    chosen = np.array([s["score"] for s in scored[0::2]])
    rejected = np.array([s["score"] for s in scored[1::2]])
    assert np.mean(chosen > rejected) == pytest.approx(summary["accuracy"])
    assert np.mean(chosen - rejected) == pytest.approx(summary["margin"], rel=1e-4)
    for task in ("alpha", "beta"):
        sel = np.array([s["task"] == task for s in scored[0::2]])
        assert np.mean(chosen[sel] > rejected[sel]) == pytest.approx(
            summary["per_task"][task]["accuracy"])


def test_eval_cli_needs_something_to_do(rm_workdir):
    config, tmp_path = rm_workdir
    with pytest.raises(ValueError, match="give --pairs and/or --responses"):
        run_eval_cli(config, tmp_path / "rm")
    with pytest.raises(ValueError, match="needs --scores_output"):
        run_eval_cli(config, tmp_path / "rm", responses=str(tmp_path / "responses.jsonl"))


def test_notebook_runs_top_to_bottom_and_saves_figures(rm_workdir):
    import nbformat
    from nbclient import NotebookClient

    config, tmp_path = rm_workdir
    figures = tmp_path / "figures"
    os.environ.update(GLM_JAX_RM_WORKDIR=str(tmp_path / "rm"),
                      GLM_JAX_RESPONSES=str(tmp_path / "responses.jsonl"),
                      GLM_JAX_PAIRS=str(tmp_path / "pairs.jsonl"),
                      GLM_JAX_FIGURES=str(figures))
    notebook = nbformat.read(ROOT / "notebooks" / "reward_distributions.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    for name in ("reward_per_task.png", "reward_vs_length.png", "accuracy_per_task.png"):
        png = (figures / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5_000, name
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    expected = run_eval_cli(config, tmp_path / "rm", pairs=str(tmp_path / "pairs.jsonl"))
    assert f"accuracy={expected['per_task']['alpha']['accuracy']:.3f} over 24 pairs" in printed
