r"""Train a reward model on preference pairs (paper 3.3).

    python scripts/train_rm.py --config configs/tiny.py --workdir runs/rm \
        --config.rm.train_file=prefs_train.jsonl --config.rm.eval_file=prefs_test.jsonl
"""

from absl import flags, logging

from glm_jax import cli
from glm_jax.train.reward import train_reward_model

cli.define_flags()
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics", required=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_reward_model(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
