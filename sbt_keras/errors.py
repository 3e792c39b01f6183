"""The exceptions `sbt_keras.run` reports as one line instead of a traceback.

`ConfigError` is bad user input: reported on stderr with exit status 2, before any training
step. Messages name the flag and what to change.
"""


class ConfigError(ValueError):
    """An impossible or inconsistent setting, found before any compute starts."""


class OutOfMemory(RuntimeError):
    """A step ran out of device or host memory; says which settings to lower (exit 1)."""
