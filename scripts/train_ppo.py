r"""PPO against a trained reward model (paper 3.4, eq. 3-6); exports WORKDIR/hf.

    python scripts/train_ppo.py --config configs/tiny.py --workdir runs/ppo \
        --config.model.init_checkpoint=runs/sft/hf --config.ppo.reward_model=runs/rm \
        --config.ppo.prompt_file=prompts.jsonl
"""

from absl import flags, logging

from glm_jax import cli
from glm_jax.train.ppo import train_ppo

cli.define_flags()
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics", required=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_ppo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
