"""Checks `sbt_keras.run` makes before TensorFlow loads: sweep-only flags without a sweep,
unreadable flagfiles, and the claim on --output_dir (a file, read-only, busy).

Imports no TensorFlow (only a gs:// --output_dir needs it, to be reached at all).
"""
import os
import re

from absl import logging

from sbt_keras import claim, distribute
from sbt_keras.errors import ConfigError


def check_sweep_flags(grid, sweep_workers, seeds):
    """--sweep_workers only means something for a sweep; --seeds=N alone is one (a sweep over
    the seed), which is said so."""
    if not grid and sweep_workers > 1:
        raise ConfigError(f"--sweep_workers={sweep_workers} runs the trials of a sweep in "
                          f"parallel, but no --grid_* flag (or --seeds > 1) makes this a "
                          f"sweep; drop it or add a grid")
    if grid and seeds > 1 and [field for field, _ in grid.axes] == ["seed"]:
        logging.info("--seeds=%d without a --grid_* flag: a sweep over the seed alone "
                     "(%d trials, one directory each under trials/)", seeds, seeds)


def claim_output_dir(output_dir, is_sweep, strategy):
    """Claims --output_dir for this command (sbt_keras/claim.py): a single run's chief, a
    non-distributed sweep, or the parent of --sweep_workers (of a multi_worker cluster, its
    chief). keras-tuner chief/worker processes share the sweep directory and claim only the
    trial directories they train."""
    if distribute.has_tuner_chief() or not distribute.is_chief(strategy):
        return  # the other workers of a multi_worker cluster write to scratch
    claim.acquire(output_dir, "sweep" if is_sweep else "run")


_FLAGFILE = re.compile(r"^--?flagfile=(.*)$")


def undecodable_flagfile(argv):
    """The one-line message for a typed --flagfile that is not UTF-8 text (absl would end in
    a UnicodeDecodeError traceback), or None."""
    for arg in argv[1:]:
        match = _FLAGFILE.match(arg)
        if not match or not os.path.isfile(match.group(1)):
            continue
        with open(match.group(1), "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return (f"--flagfile={match.group(1)} is not a text file (byte {error.start} is "
                    f"not UTF-8); a flagfile holds one --flag=value per line")
    return None
