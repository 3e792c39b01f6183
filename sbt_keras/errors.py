"""The one exception type for bad user input.

Anything raised as `ConfigError` is reported by `sbt_keras.run` as a single line on stderr
with exit status 2, before any model is built. Messages name the flag and what to change.
"""


class ConfigError(ValueError):
    """An impossible or inconsistent setting, found before any compute starts."""
