"""Child processes that die with their parent (the chief and workers of --sweep_workers).

The parent starts each child with `parent_environment()`; the child calls `follow_parent()`
first thing (sbt_keras/run.py). On Linux the kernel then sends the child SIGTERM the moment
its parent dies, however it dies (`prctl(PR_SET_PDEATHSIG)`); elsewhere a daemon thread
checks the parent once a second. Either way the child stops as on any SIGTERM: a checkpoint
at the next step boundary, `status: preempted`, exit 143. A parent that died before the
child got this far is caught by comparing the parent pid with the one the parent passed.

Imports nothing heavy.
"""
import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "SBT_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def parent_environment():
    """Environment additions for a child that must die with this process."""
    return {PARENT_ENV: str(os.getpid())}


def follow_parent(poll_seconds=1.0):
    """In a child started with `parent_environment()`: SIGTERM to itself when the parent
    dies. Does nothing in a process started otherwise."""
    parent = os.environ.pop(PARENT_ENV, None)  # not inherited by this child's own children
    if not parent:
        return
    parent = int(parent)
    if sys.platform.startswith("linux") and _set_death_signal(signal.SIGTERM):
        pass
    else:
        threading.Thread(target=_watch, args=(parent, poll_seconds), daemon=True,
                         name="sbt-parent-watch").start()
    if os.getppid() != parent:  # it died before the death signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _set_death_signal(signum):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent, poll_seconds):
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    os.kill(os.getpid(), signal.SIGTERM)
