"""Reading and writing run records: config.yaml, history.csv, result.yaml.

Every write goes to a temporary file in the same directory followed by `os.replace`, so a
reader (or a killed writer) never sees a half-written file. TensorFlow-free, so tools that
only read results start fast.
"""
import csv
import io
import math
import os
import statistics
import tempfile

import yaml

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
RESULT_FILE = "result.yaml"
HISTORY_COLUMNS = ("epoch", "step", "learning_rate", "base_lr", "train_loss",
                   "train_accuracy", "test_loss", "test_accuracy", "wall_seconds")


def write_text_atomic(path, text):
    """Writes `text` to `path` via a same-directory temp file and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_yaml(path, obj):
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))


def read_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


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
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def median_of_final(values, n):
    """The paper's reported number: the median of the last `n` epochs' test accuracies."""
    tail = list(values)[-n:]
    if len(tail) < n:
        raise ValueError(f"need {n} epochs for the median of the final {n}, have {len(tail)}")
    return float(statistics.median(tail))


def is_finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)
