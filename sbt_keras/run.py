"""Train one run, or sweep a grid of runs, of Masters & Luschi (2018) "Revisiting Small Batch
Training for Deep Neural Networks". From the repository root, with .venv active:

  python -m sbt_keras.run --flagfile=experiments/cifar10_resnet32_bn.flags
      --batch_size=8 --log2_base_lr=-7 --output_dir=runs/cifar10_m8      (one run)
  python -m sbt_keras.run --flagfile=experiments/cifar10_resnet32_bn.flags
      --grid_batch_size=2:2048 --grid_log2_base_lr=-12:0 --output_dir=runs/fig08  (a sweep)

Add --dry_run to see what would run and its estimated cost, without training. Re-running
the same command resumes. --helpfull lists every flag, grouped by topic.
"""
# Only this module reads FLAGS. Bad input exits with status 2 and one line on stderr saying
# what to change, before TensorFlow is imported or any model is built.
import logging as pylogging
import os
import sys

from sbt_keras import children, termination

if __name__ == "__main__":  # before the slow imports: no SIGTERM goes unanswered (issue 15)
    termination.install()
    children.follow_parent()  # a --sweep_workers child dies with its parent

from absl import app, flags, logging  # noqa: E402

from sbt_keras import console  # noqa: E402
from sbt_keras import flags as run_flags  # noqa: E402
from sbt_keras import grid as grid_lib  # noqa: E402
from sbt_keras import packing  # noqa: E402
from sbt_keras import preflight  # noqa: E402
from sbt_keras.errors import ConfigError, Preempted, RunFailed  # noqa: E402

run_flags.define_flags()
run_flags.define_sweep_flags()
run_flags.define_command_flags()
FLAGS = flags.FLAGS
# What --help shows (--helpfull: every flag, by topic).
KEY_FLAGS = ("flagfile", "model", "norm", "dataset", "cifar_dir", "batch_size", "base_lr",
             "log2_base_lr", "epochs", "augment", "output_dir", "grid_batch_size",
             "grid_log2_base_lr", "seeds", "sweep_workers", "dry_run", "verbose")
for _name in KEY_FLAGS:
    flags.declare_key_flag(_name)


class _QuietCheckpoints(pylogging.Filter):
    """TF's checkpoint saver logs a timing line per save through absl; drop just that."""

    def filter(self, record):
        return "Sharding callback duration" not in record.getMessage()


def main(argv):
    logging.get_absl_handler().addFilter(_QuietCheckpoints())
    console.setup_logging(FLAGS.verbose)
    # SIGTERM outside a training loop (loading data, building, between sweep trials) stops
    # at once but still records `preempted` and exits 143; inside one, train() swaps in a
    # handler that first saves a checkpoint at the next step. Until the `try` it is noted.
    termination.install()
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
        termination.start()  # raises now for a SIGTERM noted while starting
        if FLAGS.sweep_workers < 1:
            raise ConfigError(f"--sweep_workers={FLAGS.sweep_workers} must be >= 1")
        base = run_flags.config_from_flags(FLAGS, sys.argv)
        grid = grid_lib.Grid.from_flags(base, run_flags.grid_texts_from_flags(FLAGS),
                                        FLAGS.seeds, FLAGS.grid_best_lr_from)
        pack = packing.parse(FLAGS.pack)
        if grid:  # validate every point before anything heavy is imported
            valid, _ = grid_lib.split_points(base, grid, lambda point: base.output_dir)
            packing.check_grid(base, valid, pack)
        else:
            packing.single_run_refused(pack)
            base = base.resolve()
        if FLAGS.dry_run:
            from sbt_keras import dry_run
            print(dry_run.plan(base, grid))
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
        preflight.check_sweep_flags(grid, FLAGS.sweep_workers, FLAGS.seeds)
        preflight.claim_output_dir(base.output_dir, bool(grid), base.strategy)
        console.import_tensorflow_quietly(FLAGS.verbose)
        from sbt_keras.training import progress
        progress.configure(every_seconds=FLAGS.progress_seconds)
        if grid and FLAGS.sweep_workers > 1 and "KERASTUNER_TUNER_ID" not in os.environ:
            from sbt_keras.sweep import run_local_workers
            sys.exit(run_local_workers(sys.argv, FLAGS.sweep_workers))
        if grid:
            from sbt_keras.sweep import run_sweep
            run_sweep(base, grid, pack=pack)
        else:
            from sbt_keras.train import train
            train(base)
        termination.check()  # a SIGTERM whose exception was lost still ends as preempted
    except ConfigError as error:
        _fail(str(error))
    except RunFailed as error:  # out of memory, a full disk, a sweep's failure limit
        _fail(str(error), code=1)
    except Preempted as error:
        # 128 + SIGTERM: schedulers read it as "terminated"; the checkpoint is on disk.
        _fail(f"{error}; re-run the same command to resume", code=143)
    except KeyboardInterrupt:  # Ctrl-C: result.yaml says `interrupted`; one line, no traceback
        console.close_progress_bars()
        print(console.interrupted_line(sys.argv), file=sys.stderr)
        sys.exit(130)


def _fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv):
    """absl's parsing, but a bad flag (unknown name, value not among an enum's choices,
    unreadable flagfile) is one `error:` line and exit status 2, like every other bad input."""
    message = preflight.undecodable_flagfile(argv)
    if message:
        _fail(message)
    try:
        return FLAGS(argv)
    except UnicodeDecodeError as error:  # a flagfile included by another one
        _fail(f"a --flagfile is not a text file ({error}); a flagfile holds one "
              f"--flag=value per line")
    except flags.Error as error:
        _fail("; ".join(line.strip() for line in str(error).splitlines() if line.strip()))


def entry():
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
