"""Sweep grids: parsing the `--grid_*` flags, expanding points, sorting out invalid ones.

TensorFlow-free, so a malformed grid fails in a fraction of a second. Syntax per axis:
  a comma list          --grid_batch_size=2,8,32          --grid_log2_base_lr=-8,-7.5,-7
  a range  START:END    --grid_batch_size=2:2048  (powers of two, both ends powers of two)
                        --grid_log2_base_lr=-12:0 (step 1)   -12:0:0.5 (step 0.5)
"""
import dataclasses
import itertools
import math
import os

from sbt_keras import norms, results
from sbt_keras.config import BN_OPTION_NAMES, NEW_NORM_OPTIONS, Config
from sbt_keras.errors import ConfigError

# Swept Config fields in keras-tuner's order (the last varies fastest), and how a range of
# each is read. `seed` comes from --seeds=N.
AXES = ("norm", "batch_size", "log2_base_lr", "bn_batch_size", "epochs", "seed")
_POWER_OF_TWO_AXES = ("batch_size", "bn_batch_size")
# What a --grid_<axis> value looks like, for its help text.
AXIS_EXAMPLES = {"norm": f"a comma list of {', '.join(norms.NORM_NAMES)}",
                 "batch_size": "2,8,32 or 2:2048 (powers of two)",
                 "log2_base_lr": "-8,-7 or -12:0 or -12:0:0.5",
                 "bn_batch_size": "2,4,8 or 2:64 (powers of two)",
                 "epochs": "41,82,164"}
BEST_LR = "best_log2_base_lr"  # as_dict()'s {m: log2 eta_tilde} from --grid_best_lr_from


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: values of the swept fields."""
    values: tuple  # ((field, value), ...) in AXES order, swept fields only

    def as_dict(self):
        return dict(self.values)

    @property
    def name(self):
        """A directory name that says what the trial is: m8_lr-7_bn4_e82_s0."""
        short = {"norm": "norm-", "batch_size": "m", "log2_base_lr": "lr",
                 "bn_batch_size": "bn", "epochs": "e", "seed": "s"}
        return "_".join(f"{short[k]}{_fmt(v)}" for k, v in self.values)


def parse_axis(flag, text):
    """The values of one `--grid_<flag>` string; [] when empty."""
    text = (text or "").strip()
    if not text:
        return []
    if flag == "norm":
        return _parse_names(flag, text, norms.NORM_NAMES)
    kind = float if flag == "log2_base_lr" else int
    if ":" in text:
        values = _parse_range(flag, text, kind)
    else:
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise ConfigError(f"--grid_{flag}={text} has an empty item; write a comma list "
                              f"like 2,8,32")
        values = [_number(flag, item.strip(), kind) for item in items]
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid_{flag}={text} repeats a value; list each once")
    # Sizes and lengths must be counts. A 0 (bn_batch_size's "whole batch") or a negative
    # value would only become a skipped point; a typo like that should stop the sweep.
    if kind is int and min(values) < 1:
        raise ConfigError(f"--grid_{flag}={text}: {min(values)} is not positive; every "
                          f"{flag} in a grid must be >= 1")
    return values


def _parse_names(flag, text, choices):
    names = [item.strip() for item in text.split(",")]
    unknown = [n for n in names if n not in choices]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"--grid_{flag}={text}: give each of {', '.join(choices)} at most "
                          f"once, comma-separated")
    return names


def _parse_range(flag, text, kind):
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise ConfigError(f"--grid_{flag}={text} is not a range START:END or START:END:STEP")
    start, end = (_number(flag, p.strip(), kind) for p in parts[:2])
    if start > end:
        raise ConfigError(f"--grid_{flag}={text}: START must not exceed END")
    if flag in _POWER_OF_TWO_AXES:
        if len(parts) == 3:
            raise ConfigError(f"--grid_{flag}={text}: a {flag} range steps by powers of two; "
                              f"drop the STEP")
        for v in (start, end):
            if v < 1 or v & (v - 1):
                raise ConfigError(f"--grid_{flag}={text}: {v} is not a power of two; a range "
                                  f"of {flag} runs over powers of two, so both ends must be")
        return [2 ** k for k in range(int(math.log2(start)), int(math.log2(end)) + 1)]
    step = _number(flag, parts[2].strip(), kind) if len(parts) == 3 else kind(1)
    if step <= 0:
        raise ConfigError(f"--grid_{flag}={text}: STEP must be positive")
    count = int(round((end - start) / step)) + 1
    values = [kind(start + i * step) for i in range(count)]
    if abs(values[-1] - end) > 1e-9:
        raise ConfigError(f"--grid_{flag}={text}: STEP {step} does not reach END {end}")
    return values


def _number(flag, text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"--grid_{flag}: {text!r} is not a{'n integer' if kind is int else ' number'}"
                          ) from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"--grid_{flag}: {text!r} is not finite")
    return value


def _fmt(value):
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The swept axes and their values.

    `best_lr` (from --grid_best_lr_from) maps each batch size to the log2 base learning rate
    that was best for it in an earlier sweep; each point then uses its m's rate, as the
    paper's Fig. 13-14 do.
    """
    axes: tuple  # ((field, (values...)), ...) in AXES order; only swept fields
    best_lr: tuple = ()  # ((batch_size, log2_base_lr), ...)

    @classmethod
    def from_flags(cls, base: Config, grid_texts: dict, seeds: int, best_lr_from=""):
        """`grid_texts` maps a field in AXES (minus seed) to its --grid_ text."""
        grid = cls._from_texts(base, grid_texts, seeds)
        if not best_lr_from:
            return grid
        if "log2_base_lr" in dict(grid.axes):
            raise ConfigError("--grid_best_lr_from picks eta_tilde per batch size; drop "
                              "--grid_log2_base_lr")
        batch_sizes = dict(grid.axes).get("batch_size", (base.batch_size,))
        best = best_lr_by_batch(best_lr_from)
        missing = [m for m in batch_sizes if m not in best]
        if missing:
            raise ConfigError(f"--grid_best_lr_from={best_lr_from} has no completed trial with "
                              f"batch_size {missing[0]}; sweep it there first or drop it")
        return cls(grid.axes, tuple((m, best[m]) for m in batch_sizes))

    @classmethod
    def _from_texts(cls, base, grid_texts, seeds):
        if seeds < 1:
            raise ConfigError(f"--seeds={seeds} must be >= 1")
        axes = []
        for field in AXES:
            if field == "seed":
                values = list(range(base.seed, base.seed + seeds)) if seeds > 1 else []
            else:
                values = parse_axis(field, grid_texts.get(field))
            if values:
                axes.append((field, tuple(values)))
        return cls(tuple(axes))

    def __bool__(self):
        return bool(self.axes)

    def points(self):
        names = [f for f, _ in self.axes]
        best = dict(self.best_lr)
        for combo in itertools.product(*(v for _, v in self.axes)):
            values = dict(zip(names, combo))
            if best:
                values["log2_base_lr"] = best[values.get("batch_size", self.best_lr[0][0])]
            yield Point(tuple((k, values[k]) for k in AXES if k in values))

    def as_dict(self):
        out = {f: list(v) for f, v in self.axes}
        if self.best_lr:
            out[BEST_LR] = {m: lr for m, lr in self.best_lr}
        return out


def best_lr_by_batch(results_dir):
    """{batch_size: log2 eta_tilde with the best median-of-final test accuracy}."""
    path = os.path.join(results_dir, "results.csv")
    if not results.exists(path):
        raise ConfigError(f"--grid_best_lr_from={results_dir} has no results.csv; point it at "
                          f"a finished sweep's --output_dir")
    best = {}
    for row in results.read_csv(path):
        if row.get("status") != "completed":
            continue
        m, lr, acc = int(row["batch_size"]), float(row["log2_base_lr"]), row["test_accuracy"]
        if m not in best or acc > best[m][1]:
            best[m] = (lr, acc)
    return {m: lr for m, (lr, _) in best.items()}


def point_config(base: Config, point: Point, output_dir: str) -> Config:
    """The resolved Config of one trial; ConfigError if the point is impossible."""
    values = point.as_dict()
    if "log2_base_lr" in values:
        values["base_lr"] = None
    if "norm" in values:
        # A sweep over norms shares one set of settings: the options a point's norm does not
        # read keep their defaults in its config, so each trial records only what it used.
        read = norms.NORM_OPTIONS[values["norm"]]
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        values.update({name: defaults[name]
                       for name in NEW_NORM_OPTIONS + tuple(BN_OPTION_NAMES)
                       if BN_OPTION_NAMES.get(name, name) not in read})
    return dataclasses.replace(base, output_dir=output_dir, **values).resolve()


def split_points(base: Config, grid: Grid, trial_dir, replicas=1):
    """(valid, skipped): valid = [(point, config)], skipped = [(point, reason)].

    `trial_dir(point)` gives a trial's output directory; `replicas` the strategy's replica
    count, which m and bn_batch_size must also fit (8 TPU cores cannot train m = 4).
    Raises ConfigError if no point is valid, naming the first reason.
    """
    valid, skipped = [], []
    for point in grid.points():
        try:
            cfg = point_config(base, point, trial_dir(point))
            cfg.check_replicas(replicas)
            valid.append((point, cfg))
        except ConfigError as error:
            skipped.append((point, str(error)))
    if not valid:
        raise ConfigError(f"the grid has no valid point; e.g. {skipped[0][0].name}: "
                          f"{skipped[0][1]}")
    return valid, skipped
