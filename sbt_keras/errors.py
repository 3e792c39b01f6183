"""The exceptions `sbt_keras.run` reports as one line instead of a traceback.

`ConfigError` is bad user input: reported on stderr with exit status 2, before any training
step. Messages name the flag and what to change. `RunFailed` (out of memory, a full disk, a
sweep stopped by its failure limit) exits 1, `Preempted` 143.
"""


class ConfigError(ValueError):
    """An impossible or inconsistent setting, found before any compute starts."""


class DamagedRecord(ConfigError):
    """A record file (config.yaml, result.yaml, sweep.yaml, ...) that cannot be parsed; the
    message names the file and what to do (exit 2)."""


class DirectoryInUse(ConfigError):
    """Another live process holds the claim on this --output_dir (exit 2)."""


class RunFailed(RuntimeError):
    """A run or sweep stopped by something outside its settings; one line, exit 1."""


class OutOfMemory(RunFailed):
    """A step ran out of device or host memory; says which settings to lower (exit 1)."""


class StorageError(RunFailed):
    """Records or checkpoints could not be written: full disk, no permission, a vanished
    directory or bucket. Says which path and how much space is left (exit 1)."""


class SweepStopped(RunFailed):
    """A sweep stopped after --sweep_failure_limit trials failed in a row (exit 1)."""


class Preempted(BaseException):
    """SIGTERM arrived (how TPU/VM preemption is announced); exit status 143.

    A BaseException so that keras-tuner, which records ordinary exceptions as failed
    trials and moves on, lets it end the sweep. Inside a training run the checkpoint is
    saved first (see training/callbacks.py); elsewhere the process stops at once.
    """


def first_line(error, limit=200):
    """The first non-blank line of an exception's message (its type name when the message
    is empty), cut to `limit` characters (None: whole): what a one-line report shows of
    TensorFlow's multi-line errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if limit is None else text[:limit]
