"""Command line: ``python -m sovr_jax.main --config configs/<name>.py --workdir <dir>``.

Override any config field on the command line, e.g.
``--config.method=trades --config.train.epochs=5``. Running the same command
again resumes from the workdir's newest readable checkpoint; a resume that changes what is
trained is refused unless the field is named in ``--allow_change``.

Several hosts (docs/multihost.md): run the same command on every host, with
``--distributed=on`` on a TPU pod slice (jax finds the other hosts), or with
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (or the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
on GPU hosts. Only process 0 prints and writes the logs and the report.

A bad input (config field, data set, workdir, checkpoint) or a diverged run exits with
status 2 and one message that says what to fix (docs/reliability.md).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sovr_jax import cli, evaluate, experiment, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:method]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_list("allow_change", [],
                  "Config fields that a resume may change besides the always-allowed ones "
                  "(train.epochs, eval.*, ...), e.g. train.lr after a divergence; each change "
                  "is recorded in WORKDIR/config_changes.jsonl.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize: 'on' always (a TPU pod slice: the hosts are "
                  "detected), 'off' never, 'auto' when a coordinator address, a process id or "
                  "several processes are given (flags or JAX_* environment) or SLURM / Open MPI "
                  "launched several tasks.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, reachable from every process (default: "
                    "$JAX_COORDINATOR_ADDRESS or detected).")
flags.DEFINE_integer("num_processes", None,
                     "Number of processes (default: $JAX_NUM_PROCESSES or detected).")
flags.DEFINE_integer("process_id", None,
                     "This process's id in [0, num_processes) (default: $JAX_PROCESS_ID or "
                     "detected).")
flags.mark_flags_as_required(["config", "workdir"])


@cli.guarded
def main(argv):
  del argv  # config_flags_parser refused positional arguments
  logging.set_verbosity(logging.WARNING)
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, mode=FLAGS.distributed)
  rep = experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                      allow_changes=FLAGS.allow_change)
  if jax.process_index() != 0:  # process 0 reports
    return
  for name, r in rep["test"].items():
    acc = ", ".join(f"{k}={r[k]:.4f}" for k in ("clean_acc", "pgd_acc", "cw_acc") if k in r)
    print(f"test ({name} model, epoch {r['epoch']}, n={r['n']}): {acc}")
  print(evaluate.UPPER_BOUND_NOTE)
  print(f"Report: {FLAGS.workdir}/report.json")


def run() -> None:
  """The ``sovr-train`` console entry point."""
  app.run(main, flags_parser=cli.config_flags_parser(FLAGS))


if __name__ == "__main__":
  run()
