r"""Evaluate a trained reward model, or score single responses with it.

    python scripts/eval_rm.py --config configs/tiny.py --workdir runs/rm \
        --pairs test.jsonl [--output eval.json]
    python scripts/eval_rm.py --config configs/tiny.py --workdir runs/rm \
        --responses responses.jsonl --scores_output scores.jsonl

--pairs reports pairwise accuracy, mean margin, score mean/std and the correlation of score
with response length, overall and per task. --responses (SFT-format JSONL: prompt, response,
history?, task?) writes each record back with a "score" field.
"""

import json

from absl import flags, logging

from glm_jax import cli
from glm_jax.train.reward import run_eval_cli

cli.define_flags("the config the reward model was trained with")
flags.DEFINE_string("workdir", None, "the reward model's training workdir", required=True)
flags.DEFINE_string("pairs", None, "preference JSONL to evaluate on")
flags.DEFINE_string("output", None, "write the evaluation summary here as JSON")
flags.DEFINE_string("responses", None, "SFT-format JSONL of responses to score")
flags.DEFINE_string("scores_output", None, "where to write the scored responses (JSONL)")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    f = flags.FLAGS
    summary = run_eval_cli(f.config, f.workdir, pairs=f.pairs, output=f.output,
                           responses=f.responses, scores_output=f.scores_output)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run(main)
