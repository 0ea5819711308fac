"""Command line: ``python -m sovr_jax.main --config configs/<name>.py --workdir <dir>``.

Override any config field on the command line, e.g.
``--config.method=trades --config.train.epochs=5``. Running the same command
again resumes from the workdir's newest readable checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from sovr_jax import experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:method]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  report = experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  for name, r in report["test"].items():
    acc = ", ".join(f"{k}={r[k]:.4f}" for k in ("clean_acc", "pgd_acc", "cw_acc") if k in r)
    print(f"test ({name} model, epoch {r['epoch']}, n={r['n']}): {acc}")
  print(experiment.UPPER_BOUND_NOTE)
  print(f"Report: {FLAGS.workdir}/report.json")


if __name__ == "__main__":
  app.run(main)
