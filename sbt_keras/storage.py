"""What a failed write means: a full disk, no permission, or a directory or bucket that is gone.

TensorFlow reports a full disk as `ResourceExhaustedError`, the same error as an exhausted
device memory, so a checkpoint that could not be written used to be reported as "out of
memory ... lower --batch_size". Every write of records (results.write_text_atomic) and
checkpoints (`guard_manager`, `guard_checkpoint`) goes through `explain`, which names the
path and the free space and says how to go on: the records before the failed write are
intact (all writes are temp file + rename) and the run resumes from its last checkpoint.

Imports no TensorFlow (it classifies TF errors only when TF is already loaded).
"""
import errno
import os
import shutil
import sys

from sbt_keras.errors import StorageError, first_line

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ENODEV, errno.ENXIO}
# How the C++ file systems under TensorFlow word the same errnos.
_FULL_WORDS = ("no space left on device", "disk quota exceeded", "enospc")
_DENIED_WORDS = ("permission denied", "read-only file system")
_OOM_WORDS = ("oom when allocating", "out of memory")
RESUME = "re-run the same command to resume from the last checkpoint"


def kind(error, writing=True):
    """'full', 'denied', 'gone' or None (not a storage problem). `writing`: the error came
    from a write of records or checkpoints (there, TF's ResourceExhausted means a full disk
    unless it says otherwise)."""
    if isinstance(error, StorageError):
        return getattr(error, "kind", None)
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code in _FULL:
        return "full"
    if code in _DENIED:
        return "denied"
    if code in _GONE and writing:
        return "gone"
    text = str(error).lower()
    if any(w in text for w in _FULL_WORDS):
        return "full"
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(error, tf.errors.OpError):
        return "denied" if writing and any(w in text for w in _DENIED_WORDS) else None
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return "full" if writing and not any(w in text for w in _OOM_WORDS) else None
    if not writing:
        return None
    if isinstance(error, tf.errors.PermissionDeniedError) or any(w in text for w in
                                                                 _DENIED_WORDS):
        return "denied"
    if isinstance(error, (tf.errors.NotFoundError, tf.errors.FailedPreconditionError,
                          tf.errors.UnavailableError)):
        return "gone"
    return None


def explain(path, error, writing=True, then=RESUME):
    """The StorageError saying what `error` (raised writing `path`) means, or None if it is
    not a storage problem; `then` says how to go on once the cause is fixed."""
    what = kind(error, writing)
    if what is None:
        return None
    if isinstance(error, StorageError):
        return error
    detail = f"{type(error).__name__}: {first_line(error)}"
    if what == "full":
        message = (f"could not write {path}: the disk is full ({free_space(path)}); free "
                   f"some space, then {then}")
    elif what == "denied":
        message = (f"could not write {path}: permission denied ({detail}); make "
                   f"{os.path.dirname(str(path)) or path} writable again, then {then}")
    else:
        message = (f"could not write {path}: its directory or bucket is gone or unreachable "
                   f"({detail}); restore it, then {then}")
    failure = StorageError(message)
    failure.kind = what
    return failure


def free_space(path):
    """'12.0 KiB free of 64.0 MiB on /mnt/x' for the disk holding `path` (local paths)."""
    path = str(path)
    if "://" in path:
        return f"no free-space figure for {path.split('://')[0]}:// paths"
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return "free space unknown"
    mount = where
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    return f"{_size(usage.free)} free of {_size(usage.total)} on {mount}"


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def raise_explained(path, error, writing=True, then=RESUME):
    """Raises the StorageError for `error` (from `error`), or nothing if it is not one."""
    failure = explain(path, error, writing, then)
    if failure is not None and failure is not error:
        raise failure from error


class _Guarded:
    """Forwards everything to `target`; the named write methods report storage failures."""

    def __init__(self, target, where):
        self._target = target
        self._where = where

    def __getattr__(self, name):
        if name == "_target":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._target, name)


class _GuardedManager(_Guarded):
    def save(self, checkpoint_number=None, **kwargs):
        try:
            return self._target.save(checkpoint_number=checkpoint_number, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a storage error
            step = "" if checkpoint_number is None else f"ckpt-{checkpoint_number}"
            latest = self._target.latest_checkpoint
            then = (f"re-run the same command to resume from {os.path.basename(latest)}"
                    if latest else "re-run the same command (no checkpoint was written yet)")
            raise_explained(os.path.join(self._where, step), error, then=then)
            raise


class _GuardedCheckpoint(_Guarded):
    def write(self, file_prefix, *args, **kwargs):
        try:
            return self._target.write(file_prefix, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a storage error
            raise_explained(file_prefix, error)
            raise


def guard_manager(manager):
    """A tf.train.CheckpointManager whose `save` reports a full disk as such."""
    return _GuardedManager(manager, manager.directory)


def guard_checkpoint(checkpoint, where=""):
    """A tf.train.Checkpoint whose `write` reports a full disk as such."""
    return _GuardedCheckpoint(checkpoint, where)


def try_write_yaml(path, record):
    """Writes a record about a run that is stopping; a storage failure is only logged (it
    must not hide why the run stopped)."""
    from sbt_keras import results

    try:
        results.write_yaml(path, record)
    except StorageError as error:
        from absl import logging
        logging.warning("Could not record the run's status in %s: %s", path, error)
