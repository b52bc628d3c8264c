r"""Supervised fine-tuning on (prompt, response) pairs; exports WORKDIR/hf.

    python scripts/train_sft.py --config configs/tiny.py --workdir runs/sft \
        --config.sft.train_file=sft.jsonl --config.sft.eval_file=sft_test.jsonl
"""

from absl import flags, logging

from glm_jax import cli
from glm_jax.train.sft import train_sft

cli.define_flags()
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics", required=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_sft(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
