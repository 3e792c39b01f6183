"""`python -m sbt_keras.run ARGS` with a slow moment injected, for the SIGTERM tests.

    python tests/term_probe.py MODULE MARKER SECONDS MODE ARGS...

When MODULE is first imported, MARKER is written and the import sleeps SECONDS: the moment
the test sends SIGTERM. MODE `plain` sleeps in the import itself; `destructor` sleeps in an
object's __del__, where an exception raised by a signal handler is printed as "Exception
ignored" and lost, as happens when a SIGTERM lands in one of TensorFlow's destructors.
"""
import importlib.abc
import os
import pathlib
import runpy
import sys
import time


def _sleep(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


class _SleepsWhenDropped:
    def __init__(self, seconds):
        self.seconds = seconds

    def __del__(self):
        _sleep(self.seconds)


class _SlowImport(importlib.abc.MetaPathFinder):
    def __init__(self, module, marker, seconds, mode):
        self.module, self.marker, self.seconds, self.mode = module, marker, seconds, mode
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if name == self.module and not self.done:
            self.done = True
            pathlib.Path(self.marker).write_text(str(os.getpid()))
            if self.mode == "destructor":
                _SleepsWhenDropped(self.seconds)  # dropped at once: __del__ runs here
            else:
                _sleep(self.seconds)
        return None  # the normal finders import it


if __name__ == "__main__":
    module, marker, seconds, mode, *args = sys.argv[1:]
    sys.meta_path.insert(0, _SlowImport(module, marker, float(seconds), mode))
    sys.argv = ["sbt_keras.run", *args]
    runpy.run_module("sbt_keras.run", run_name="__main__", alter_sys=True)
