"""Helpers for tests that start sbt_keras in other processes."""
import contextlib
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, **env):
    """`python ARGS...` in the repo root, with `env` added; output captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    """Waits for `proc`; fails the test with its stderr tail unless it exited 0."""
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


@contextlib.contextmanager
def killed_if_left():
    """A list for the processes a test starts; any still running when the block ends
    (only after a failure: a passing test has finished them all) is killed."""
    started = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
