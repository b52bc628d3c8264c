"""The whole ChatGLM-RLHF pipeline in miniature on the synthetic world, with the report.

    python scripts/run_pipeline.py --config configs/tiny.py --workdir runs/pipeline [--force]

Each stage records the config fields it depends on (its own and those of the stages whose
outputs it reads; not the runtime ones such as the mesh or metrics logging) in
WORKDIR/<stage>/settings.json. A rerun skips the stages done with the same settings. When a
stage was made with other settings (e.g. --config.seed=1 in a seed-0 workdir), the rerun
refuses before changing anything, naming the first such stage and each field (old -> new);
--force then redoes that stage and every stage after it, keeping the ones before it. With no
difference, --force redoes every stage. The report is WORKDIR/report.md (with report.json
and the PNG figures beside it).
"""

from absl import flags, logging

from glm_jax import cli
from glm_jax.pipeline.run import run_pipeline

cli.define_flags()
flags.DEFINE_string("workdir", None, "directory for every stage's outputs and the report",
                    required=True)
flags.DEFINE_bool("force", False, "redo the first stage whose recorded settings differ "
                  "from this config's and every stage after it, keeping the ones before it "
                  "(every stage when none differs)")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir, force=flags.FLAGS.force)


if __name__ == "__main__":
    cli.run(main)
