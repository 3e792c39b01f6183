"""What the command line prints: plain log lines, a quiet TensorFlow start-up, Ctrl-C.

- Log lines are the message alone (warnings and errors prefixed `warning:` / `error:`);
  `--verbose` restores absl's prefix (level, date, time, thread id, file:line).
- TensorFlow's native libraries log a few lines at import and device discovery through
  absl's C++ logging *before* it is initialised, and those ignore TF_CPP_MIN_LOG_LEVEL
  (tensorflow/tensorflow#100442): the "All log messages before absl::InitializeLog()"
  banner, oneDNN's "custom operations are on", and on a machine without a GPU the
  CUDA-stub's "Could not find cuda drivers" and "failed call to cuInit". There is no
  environment variable or Python call that reaches that logger, so `quiet_native_startup`
  routes file descriptor 2 through a filter for the duration of `import tensorflow` and the
  device listing only, and drops exactly those lines (the cuInit failure only when the
  CUDA driver is absent or reports no device); every other line passes through at once.
  TF_CPP_MIN_LOG_LEVEL=2 (run.py and the Makefile) still hides TF's later INFO and
  WARNING lines; 3 would also hide its errors, so it is not used.
- tf.function's "N out of the last M calls ... triggered tf.function retracing" warning
  counts traces per Python function *code*: every trial of a sweep builds a new model whose
  train and test functions are traced once each, from the same code, so after five trials
  TF reports "retracing" although no function was traced twice (a run traces its train
  function once: tests/test_console.py). That warning is dropped for SummedGradientModel's
  functions only.
"""
import contextlib
import logging as pylogging
import os
import re
import shlex
import sys
import threading

_NO_GPU_DRIVER = re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers")
_HARMLESS = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are "
               r"written to STDERR$"),
    re.compile(r"port\.cc:\d+\] oneDNN custom operations are on"),
    _NO_GPU_DRIVER,
)
_CUINIT = re.compile(r"failed call to cuInit")
_NO_DEVICE = re.compile(r"NO_DEVICE|no CUDA-capable device")


class LineFilter:
    """Decides, line by line, which of TF's start-up lines to drop."""

    def __init__(self):
        self.no_driver = False

    def keep(self, line):
        text = line.rstrip("\n")
        if _NO_GPU_DRIVER.search(text):
            self.no_driver = True
        if any(p.search(text) for p in _HARMLESS):
            return False
        if _CUINIT.search(text) and (self.no_driver or _NO_DEVICE.search(text)):
            return False
        return True


@contextlib.contextmanager
def quiet_native_startup(verbose=False):
    """Within this context, file descriptor 2 passes through `LineFilter` (see above)."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    line_filter = LineFilter()

    def forward():
        with os.fdopen(read_end, "r", errors="replace") as pipe:
            for line in pipe:
                if line_filter.keep(line):
                    os.write(saved, line.encode())

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees its end
        thread.join(timeout=10)
        os.close(saved)


def import_tensorflow_quietly(verbose=False):
    """Imports TensorFlow and lists its devices (where the CUDA stub reports) quietly."""
    with quiet_native_startup(verbose):
        import tensorflow as tf
        tf.config.list_physical_devices()


class PlainFormatter(pylogging.Formatter):
    """The message alone; `warning: ` / `error: ` before anything above INFO."""

    def format(self, record):
        text = super().format(record)
        if record.levelno >= pylogging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


class QuietRetracing(pylogging.Filter):
    """Drops tf.function's retracing warning about SummedGradientModel's own functions
    (one trace per trial, counted together across a sweep's trials; see above)."""

    def filter(self, record):
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message
                    and "SummedGradientModel." in message)


def setup_logging(verbose=False):
    """Plain lines on absl's handler unless `verbose`; the retracing warning dropped."""
    from absl import logging

    handler = logging.get_absl_handler()
    if not verbose:
        handler.setFormatter(PlainFormatter())
        handler.addFilter(QuietRetracing())


def resume_command(argv):
    """The command that resumes this one: the same interpreter and arguments."""
    python = sys.executable or "python"
    relative = os.path.relpath(python)
    if not relative.startswith(".."):
        python = relative if os.sep in relative else f".{os.sep}{relative}"
    return shlex.join([python, "-m", "sbt_keras.run", *argv[1:]])


def interrupted_line(argv):
    """The one line Ctrl-C prints."""
    return f"interrupted; resume with: {resume_command(argv)}"


def close_progress_bars():
    """Closes a progress bar Ctrl-C left open, so the next line starts on its own line."""
    progress = sys.modules.get("sbt_keras.training.progress")
    if progress is not None:
        progress.close_all_bars()
