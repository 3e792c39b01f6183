"""Command line: one training run, or a grid of runs, from flags or a flagfile.

    python -m sbt_keras.run --flagfile=experiments/cifar10_resnet32_bn.flags \
        --batch_size=8 --log2_base_lr=-7 --output_dir=runs/demo
    python -m sbt_keras.run --flagfile=experiments/cifar10_resnet32_bn.flags \
        --grid_batch_size=2:2048 --grid_log2_base_lr=-12:0 --output_dir=runs/fig8

Only this module reads FLAGS. Bad input exits with status 2 and one line on stderr saying what
to change, before TensorFlow is imported or any model is built.
"""
import logging as pylogging
import os
import signal
import sys

from absl import app, flags, logging

from sbt_keras import flags as run_flags
from sbt_keras import grid as grid_lib
from sbt_keras import packing
from sbt_keras.errors import ConfigError, OutOfMemory, Preempted

run_flags.define_flags()
run_flags.define_sweep_flags()
FLAGS = flags.FLAGS


class _QuietCheckpoints(pylogging.Filter):
    """TF's checkpoint saver logs a timing line per save through absl; drop just that."""

    def filter(self, record):
        return "Sharding callback duration" not in record.getMessage()


def _terminated(signum, frame):
    raise Preempted("terminated by SIGTERM")


def main(argv):
    logging.get_absl_handler().addFilter(_QuietCheckpoints())
    # SIGTERM outside a training loop (loading data, building, between sweep trials) stops
    # at once but still records `preempted` and exits 143; inside one, train() swaps in a
    # handler that first saves a checkpoint at the next step.
    signal.signal(signal.SIGTERM, _terminated)
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
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
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
        if grid and FLAGS.sweep_workers > 1 and "KERASTUNER_TUNER_ID" not in os.environ:
            from sbt_keras.sweep import run_local_workers
            sys.exit(run_local_workers(sys.argv, FLAGS.sweep_workers))
        if grid:
            from sbt_keras.sweep import run_sweep
            run_sweep(base, grid, pack=pack)
        else:
            from sbt_keras.train import train
            train(base)
    except ConfigError as error:
        _fail(str(error))
    except OutOfMemory as error:
        _fail(str(error), code=1)
    except Preempted as error:
        # 128 + SIGTERM: schedulers read it as "terminated"; the checkpoint is on disk.
        _fail(f"{error}; re-run the same command to resume", code=143)


def _fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv):
    """absl's parsing, but a bad flag (unknown name, value not among an enum's choices,
    unreadable flagfile) is one `error:` line and exit status 2, like every other bad input."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        _fail("; ".join(line.strip() for line in str(error).splitlines() if line.strip()))


def entry():
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
