"""Reading and writing run records: config.yaml, history.csv, result.yaml.

Every write goes to a temporary file in the same directory followed by a rename, so a
reader (or a killed writer) never sees a half-written file. Local paths use `os` (no
TensorFlow import, so tools that only read results start fast); URL paths (gs://, and
ram:// in tests) go through `tf.io.gfile`, like the checkpoints and TensorBoard logs.
"""
import csv
import io
import math
import os
import statistics
import tempfile
import uuid

import yaml

from sbt_keras.errors import DamagedRecord, first_line

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
RESULT_FILE = "result.yaml"
SWEEP_FILE = "sweep.yaml"  # marks a sweep's directory (sbt_keras/sweep.py)
# What to do about a damaged record file, by name.
_REPAIR = {
    CONFIG_FILE: "it records the run's settings: restore it from a copy, or delete it to "
                 "resume with the settings given now (the checkpoints are kept)",
    RESULT_FILE: "delete it and re-run the same command: the run resumes from its last "
                 "checkpoint and writes it again",
    SWEEP_FILE: "it records the sweep's settings and grid: restore it from a copy, or "
                "delete it and re-run the same command to write it again",
}
_REPAIR_OTHER = "delete it and re-run the same command to write it again"
HISTORY_COLUMNS = ("epoch", "step", "learning_rate", "base_lr", "train_loss",
                   "train_accuracy", "test_loss", "test_accuracy", "wall_seconds")


def is_url(path):
    return "://" in str(path)


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


def exists(path):
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path):
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path):
    if is_url(path):  # object stores may list sub-directories as "name/"
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def open_text(path, mode="r"):
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode, newline="")


def write_text_atomic(path, text):
    """Writes `text` to `path` via a same-directory temp file and an atomic rename.

    A full disk, a permission error or a vanished directory or bucket raises StorageError
    naming `path` and the free space (sbt_keras/storage.py); `path` keeps its old content.
    """
    from sbt_keras import storage

    try:
        _write_text_atomic(path, text)
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a storage error
        storage.raise_explained(path, error)
        raise


def _write_text_atomic(path, text):
    if is_url(path):
        gfile = _gfile()
        directory, name = path.rsplit("/", 1)
        gfile.makedirs(directory)
        # Unique across hosts: the workers of a distributed sweep share the bucket.
        tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
        with gfile.GFile(tmp, "w") as f:
            f.write(text)
        # On object stores a rename is a copy then a delete; readers still only ever see
        # a whole object, because a single object's write is atomic there.
        gfile.rename(tmp, path, overwrite=True)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less
        # the umask), so collaborators sharing the directory can read the records.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    """The process's umask. Linux shows it in /proc (read-only, thread-safe); elsewhere it is
    read by setting it and putting it back, which a file created by another thread in
    between would see, so that is done once and kept."""
    global _UMASK
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK = None


def write_yaml(path, obj):
    """Block style throughout (one setting per line, lists one item per line)."""
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))


def read_yaml(path):
    """The YAML document in `path`; DamagedRecord (one line naming the file and what to do)
    if it is not readable YAML."""
    name = os.path.basename(str(path))
    try:
        with open_text(path) as f:
            value = yaml.safe_load(f.read())
        if name in _REPAIR and not isinstance(value, (dict, type(None))):
            raise ValueError(f"not a mapping but {type(value).__name__}")
        return value
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as error:
        mark = getattr(error, "problem_mark", None)
        why = (f"{error.problem}, line {mark.line + 1}" if mark and getattr(error, "problem", None)
               else first_line(error, 120))
        raise DamagedRecord(f"{path} is damaged ({why}); "
                            f"{_REPAIR.get(name, _REPAIR_OTHER)}") from None


def write_csv(path, rows, columns):
    """`rows` are dicts; missing values are written empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_csv(path):
    """Rows as dicts of floats where a value parses as a number, else strings."""
    with open_text(path) as f:
        rows = csv.DictReader(io.StringIO(f.read()))
        return [{k: _number(v) for k, v in row.items()} for row in rows]


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def median_of_final(values, n):
    """The paper's reported number: the median of the last `n` epochs' test accuracies.

    NaN if one of them is NaN: sorting with a NaN is undefined, so statistics.median would
    return an arbitrary element (a diverged run is reported at chance by the caller anyway).
    """
    tail = list(values)[-n:]
    if len(tail) < n:
        raise ValueError(f"need {n} epochs for the median of the final {n}, have {len(tail)}")
    if any(math.isnan(v) for v in tail):
        return math.nan
    return float(statistics.median(tail))


def is_finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def summarize(rows, cfg, num_classes, diverged_at_step=None, session=None, worker=None):
    """result.yaml's content from a run's history rows and its Config; `session` is
    (examples trained, seconds) of this process's share, for the throughput; `worker` the
    sweep worker that ran it."""
    accuracies = [r["test_accuracy"] for r in rows]
    last = rows[-1] if rows else {}
    diverged = diverged_at_step is not None or not is_finite(last.get("train_loss"))
    result = {
        "status": "diverged" if diverged else "completed",
        # A diverged run is reported at chance level, as in the paper's figures.
        "test_accuracy": (1.0 / num_classes if diverged
                          else median_of_final(accuracies, cfg.median_of)),
        "median_of": cfg.median_of,
        "best_test_accuracy": max(accuracies) if accuracies else None,
        "final_test_accuracy": last.get("test_accuracy"),
        "final_train_loss": last.get("train_loss"),
        "epochs_completed": len(rows),
        "steps": last.get("step", 0),
        "wall_seconds": last.get("wall_seconds", 0.0),
        "batch_size": cfg.batch_size,
        "base_lr": cfg.base_lr,
        "log2_base_lr": cfg.log2_base_lr,
    }
    if is_finite(last.get("sharpness")):  # the final network's (--sharpness=final)
        result["sharpness"] = last["sharpness"]
    if diverged:
        result["diverged_at_step"] = diverged_at_step or last.get("step")
    if session is not None:
        examples, seconds = session
        result["examples_per_second"] = examples / seconds if seconds > 0 else 0.0
    if worker:
        result["worker"] = worker
    return result
