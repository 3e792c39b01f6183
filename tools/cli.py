"""Command-line plumbing shared by the instrument tools (tools/sharpness.py,
tools/interpolate.py): bad input is one `error: ...` line on stderr and exit status 2, as
for `python -m sbt_keras.run` (docs/bad_input.md)."""
import sys

from absl import app, flags


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """absl's parsing, with a bad flag reported as one `error:` line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail("; ".join(line.strip() for line in str(error).splitlines() if line.strip()))


def run(main):
    """app.run(main) with the one-line flag errors above; ConfigError -> exit 2."""
    from sbt_keras.errors import ConfigError

    def guarded(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
        try:
            main(argv)
        except ConfigError as error:
            fail(str(error))

    app.run(guarded, flags_parser=parse_flags)


def progress(total, description):
    """A tqdm bar on stderr when tqdm is installed (it usually is, as a dependency of
    keras-tuner/tfds; it is not required), else one line per step."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, description)
    return tqdm(total=total, desc=description, file=sys.stderr, leave=True)


class _Lines:
    """The tqdm subset the tools use, printing a line per `update`."""

    def __init__(self, total, description):
        self.n, self.total, self.description, self.postfix = 0, total, description, ""

    def update(self, n=1):
        self.n += n
        print(f"{self.description}: {self.n}/{self.total} {self.postfix}", file=sys.stderr,
              flush=True)

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass
