"""The whole ChatGLM-RLHF pipeline in miniature on the synthetic world, with the report.

    python scripts/run_pipeline.py --config configs/tiny.py --workdir runs/pipeline [--force]

Reruns skip the stages already done (WORKDIR/<stage>/stage.json); --force redoes them all.
The report is WORKDIR/report.md (with report.json and the PNG figures beside it).
"""

from absl import app, flags, logging

from glm_jax.config import define_config_flag, parse_flags
from glm_jax.pipeline.run import run_pipeline

define_config_flag()
flags.DEFINE_string("workdir", None, "directory for every stage's outputs and the report",
                    required=True)
flags.DEFINE_bool("force", False, "redo every stage, even those already done")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir, force=flags.FLAGS.force)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
