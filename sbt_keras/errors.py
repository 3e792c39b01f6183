"""The exceptions `sbt_keras.run` reports as one line instead of a traceback.

`ConfigError` is bad user input: reported on stderr with exit status 2, before any training
step. Messages name the flag and what to change. `OutOfMemory` exits 1, `Preempted` 143.
"""


class ConfigError(ValueError):
    """An impossible or inconsistent setting, found before any compute starts."""


class OutOfMemory(RuntimeError):
    """A step ran out of device or host memory; says which settings to lower (exit 1)."""


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
