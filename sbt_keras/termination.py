"""SIGTERM (how TPU/VM preemption and schedulers stop a job) at any moment of a command.

`install()` runs first thing in `python -m sbt_keras.run`, before the heavy imports, so
there is no window in which SIGTERM kills the process without a word. Until `start()` (the
top of `run.main`) a SIGTERM is only noted; from then on it raises `Preempted`, which
`run.main` reports as one line with exit status 143.

A Python signal handler runs in the main thread at the next bytecode boundary, which may be
inside a destructor or a weakref callback (TensorFlow's iterators and resources have many):
an exception raised there is printed as "Exception ignored" and lost, and the run would
carry on to its end. So every SIGTERM is also noted until something acts on it, and
`check()` raises for a noted one where a run would otherwise go on: before training starts
(callbacks.Preemption) and when the command ends (run.main).

Imports nothing heavy (no TensorFlow, no absl).
"""
import signal
import threading

from sbt_keras.errors import Preempted

_received = threading.Event()
_state = {"raising": False, "installed": False}


def _handle(signum, frame):
    _received.set()
    if _state["raising"]:
        raise Preempted("preempted by SIGTERM")


def install():
    """Notes SIGTERM from now on (raises only after `start`). Main thread only; idempotent."""
    if threading.current_thread() is threading.main_thread() and not _state["installed"]:
        signal.signal(signal.SIGTERM, _handle)
        _state["installed"] = True


def start():
    """From now on SIGTERM raises Preempted; raises at once if one arrived before."""
    install()
    _state["raising"] = True
    check()


def note():
    """Records a SIGTERM handled elsewhere (the training loop's own handler)."""
    _received.set()


def received():
    return _received.is_set()


def check():
    """Raises Preempted if a SIGTERM arrived that nothing has acted on yet, even one whose
    exception was lost; the SIGTERM is then acted on."""
    if _received.is_set():
        _received.clear()
        raise Preempted("preempted by SIGTERM")


def acted_on():
    """The noted SIGTERM has been answered (a Preempted exception is on its way out)."""
    _received.clear()
