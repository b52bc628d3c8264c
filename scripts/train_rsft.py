r"""Rejection-sampling fine-tuning (best-of-N): sample, keep each prompt's best response by the
reward model, then SFT on the winners; exports WORKDIR/sft/hf.

    python scripts/train_rsft.py --config configs/tiny.py --workdir runs/rsft \
        --config.model.init_checkpoint=runs/sft/hf --config.rsft.reward_model=runs/rm \
        --config.rsft.prompt_file=prompts.jsonl --config.rsft.num_samples=4
"""

from absl import flags, logging

from glm_jax import cli
from glm_jax.train.rejection import train_rsft

cli.define_flags()
flags.DEFINE_string("workdir", None, "directory for the winners, checkpoints and metrics",
                    required=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_rsft(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
