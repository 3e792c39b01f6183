"""One process per output directory: an advisory claim file, `<output_dir>/.claim`.

A single run, a non-distributed sweep (and each trial of any sweep) claims its directory
before it writes anything: the file holds the claiming host, pid and start time, and on a
local or NFS disk an exclusive `flock` on it is the claim itself. A second process is
refused with one line naming the holder (`DirectoryInUse`, exit 2). The kernel drops a
flock when its process dies however it dies (kill -9 included), so a claim left by a dead
process is taken over with a warning that names it; the file is removed on every orderly
exit (normal end, error, SIGTERM, Ctrl-C).

What is guaranteed where (see README, "One process per output directory"):
- local disks: exclusive, race-free (flock), dead holders detected by the kernel;
- NFS: as far as the server's locking goes (NFSv4, or v3 with lockd), across hosts;
- filesystems without flock (some FUSE mounts) and object stores (gs://): the file alone.
  A live holder on this host is recognised by its pid, a dead one taken over; a holder on
  another host cannot be checked, so it is refused and the message says which file to
  delete if that process is gone. Two processes starting within moments of each other may
  both proceed there: there is no atomic create on object stores.

Imports no TensorFlow for local paths: `claim` runs before TensorFlow loads, so a busy,
unwritable or impossible --output_dir is refused in a second.
"""
import atexit
import contextlib
import functools
import os
import platform
import time

import yaml
from absl import logging

from sbt_keras import results, storage
from sbt_keras.errors import ConfigError, DirectoryInUse, StorageError, first_line

CLAIM_FILE = ".claim"
_held = {}  # absolute path or URL of a claimed directory -> _Claim


class _Claim:
    def __init__(self, directory, path, fd, info):
        self.directory, self.path, self.fd, self.info = directory, path, fd, info
        self.depth = 1
        self.created = False  # the claim made the directory: removed again if left empty


def _info(what):
    return {"host": platform.node(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}


def _key(directory):
    return directory.rstrip("/") if results.is_url(directory) else os.path.realpath(directory)


def acquire(directory, what="run"):
    """Claims `directory` for this process (re-entrant: a directory this process already
    holds is only counted). Creates the directory. Raises DirectoryInUse if another live
    process holds it, ConfigError if it cannot be a run directory (a file, read-only,
    unreachable)."""
    key = _key(directory)
    if key in _held:
        _held[key].depth += 1
        return _held[key]
    if results.is_url(directory):
        held = _acquire_url(directory, what)
    else:
        held = _acquire_local(directory, what)
    _held[key] = held
    return held


def release(directory):
    """Gives up this process's claim on `directory` (the last of re-entrant claims removes
    the file)."""
    key = _key(directory)
    held = _held.get(key)
    if held is None:
        return
    held.depth -= 1
    if held.depth > 0:
        return
    del _held[key]
    try:
        if held.fd is None:
            _release_by_content(held)
        else:
            with contextlib.suppress(OSError):
                if os.path.exists(held.path) and os.stat(held.path).st_ino == \
                        os.fstat(held.fd).st_ino:
                    os.remove(held.path)
            os.close(held.fd)  # drops the flock
            if held.created:  # a run refused before writing anything leaves no directory
                with contextlib.suppress(OSError):
                    os.rmdir(held.directory)
    except Exception as error:  # noqa: BLE001 - releasing must never mask the real outcome
        logging.warning("Could not remove the claim %s (%s)", held.path, first_line(error))


@atexit.register
def _release_all():
    for key in list(_held):
        _held[key].depth = 1
        release(key)


@contextlib.contextmanager
def claimed(directory, what="run"):
    acquire(directory, what)
    try:
        yield
    finally:
        release(directory)


def holding_output_dir(function):
    """Decorator of `train(cfg, ...)`: the run's chief holds cfg.output_dir while it runs
    (the other workers of a multi-worker cluster write to scratch and claim nothing)."""
    @functools.wraps(function)
    def wrapper(cfg, *args, **kwargs):
        from sbt_keras import distribute
        if not distribute.is_chief(cfg.strategy):
            return function(cfg, *args, **kwargs)
        with claimed(cfg.output_dir):
            return function(cfg, *args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------- local disks
def check_location(directory):
    """ConfigError (one line) if `directory` cannot hold a run: it is a file, or lies under
    one. Writability is found out by `acquire`'s first write."""
    if results.is_url(directory):
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"--output_dir={directory} is a file, not a directory; choose a "
                          f"directory for the records")
    parent = os.path.dirname(os.path.abspath(directory))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output_dir={directory} cannot be created: {parent} is a file; "
                          f"choose another --output_dir")


def _unwritable(directory, error):
    code = getattr(error, "errno", None)
    reason = os.strerror(code) if code else first_line(error)
    return ConfigError(f"--output_dir={directory} is not writable ({reason}: "
                       f"{getattr(error, 'filename', None) or directory}); choose a directory you can write "
                       f"to, or fix its permissions")


def _acquire_local(directory, what):
    import fcntl

    check_location(directory)
    path = os.path.join(directory, CLAIM_FILE)
    created = not os.path.exists(directory)
    for _ in range(10):  # retried only if the file was replaced while we locked it
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            if storage.kind(error) == "full":  # not bad input: say so, exit 1
                raise storage.explain(path, error) from None
            raise _unwritable(directory, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise DirectoryInUse(_in_use(directory, holder, path, checked=True)) from None
        except OSError:  # no flock here (some FUSE mounts): the file's content decides
            os.close(fd)
            return _acquire_by_content(directory, path, what)
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its holder removed it on exit while we waited: try again
            os.close(fd)
            continue
        previous = _read_fd(fd)
        if previous and previous.get("pid") != os.getpid():
            _warn_taking_over(directory, previous)
        info = _info(what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, yaml.safe_dump(info, sort_keys=False).encode(), 0)
        claimed = _Claim(directory, path, fd, info)
        claimed.created = created
        return claimed
    raise DirectoryInUse(f"--output_dir={directory}: its claim file {path} keeps changing; "
                         f"another process is starting there")


def _read_fd(fd):
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = yaml.safe_load(text)
        return info if isinstance(info, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process, or an unreadable pid: assume it lives
    return True


def _in_use(directory, holder, path, checked):
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
           f"{holder.get('started', '?')} ({holder.get('what', 'run')})")
    advice = "wait for it to end or stop it, or choose another --output_dir"
    if not checked:
        advice += f"; if that process is gone, delete {path}"
    return f"--output_dir={directory} is in use by {who}; {advice}"


def _warn_taking_over(directory, previous):
    logging.warning("--output_dir=%s was claimed by pid %s on %s (since %s), which no longer "
                    "holds it (it was killed or its host failed); taking it over",
                    directory, previous.get("pid"), previous.get("host"),
                    previous.get("started"))


def _acquire_by_content(directory, path, what):
    """The claim where no lock is available: the file's content against the process table
    of this host."""
    holder = _read_path(path)
    mine = holder.get("pid") == os.getpid() and holder.get("host") == platform.node()
    if holder and not mine:
        if holder.get("host") != platform.node() or _alive(holder.get("pid")):
            raise DirectoryInUse(_in_use(directory, holder, path, checked=False))
        _warn_taking_over(directory, holder)
    info = _info(what)
    try:
        results.write_yaml(path, info)
    except (OSError, StorageError) as error:
        raise _unwritable(directory, error) from None
    return _Claim(directory, path, None, info)


def _read_path(path):
    try:
        if not results.exists(path):
            return {}
        info = results.read_yaml(path)
    except Exception:  # noqa: BLE001 - a damaged claim file claims nothing
        return {}
    return info if isinstance(info, dict) else {}


# ---------------------------------------------------------------------- object stores
def _acquire_url(directory, what):
    import tensorflow as tf

    path = f"{directory.rstrip('/')}/{CLAIM_FILE}"
    try:
        tf.io.gfile.makedirs(directory)
        return _acquire_by_content(directory, path, what)
    except tf.errors.OpError as error:
        raise ConfigError(f"--output_dir={directory} cannot be reached ({type(error).__name__}:"
                          f" {first_line(error)}); check the address, the bucket and the "
                          f"credentials") from None


def _release_by_content(held):
    mine = _read_path(held.path)
    if mine.get("pid") == held.info["pid"] and mine.get("host") == held.info["host"]:
        if results.is_url(held.path):
            import tensorflow as tf
            tf.io.gfile.remove(held.path)
        else:
            os.remove(held.path)
