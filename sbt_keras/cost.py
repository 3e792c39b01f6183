"""What a run or a sweep costs: steps, and seconds from step times (no TensorFlow).

A step's time on one device is close to a + b·m: a per-step floor (kernel launches, the
optimizer, the host round trip, amortised over `steps_per_execution`) plus a cost per
example. `DOCUMENTED_STEP_MS` holds step times measured with `make bench` (sbt step on
in-memory data) on this project's 2-core CPU; `StepTimes` prefers step times measured in
the sweep itself and falls back to the documented ones. Used by `--dry_run` and by the
sweep's ETA (training/progress.py).
"""
import math

# ms per training step on the project's 2-core CPU (no GPU), 32x32x3 inputs, float32, the run
# defaults (steps_per_execution 10 here), median of 3 blocks of 10 steps; measured with
#   python -m tools.bench --models=M --norms=N --batch_sizes=2,8,32,128,512 \
#       --baselines= --noinput_pipeline --steps=10
# on 2026-12-01 (docs/bench_cpu.md, "Step times for the cost model"). Other norms use the
# model's `batch` row, whose per-example cost is within ~15% of every other norm's there.
DOCUMENTED_STEP_MS = {
    ("resnet8", "none"): {2: 4.9, 8: 8.2, 32: 20.6, 128: 69.0, 512: 271.0},
    ("resnet8", "batch"): {2: 5.8, 8: 9.6, 32: 23.1, 128: 81.3, 512: 310.0},
    ("resnet20", "batch"): {2: 14.3, 8: 23.5, 32: 55.4, 128: 199.7, 512: 750.3},
    ("resnet32", "batch"): {2: 22.6, 8: 37.4, 32: 92.0, 128: 330.0, 512: 1240.0},
    ("alexnet_reduced", "batch"): {2: 3.1, 8: 5.6, 32: 14.8, 128: 52.0, 512: 203.0},
}
DOCUMENTED_WHERE = "the project's 2-core CPU (docs/bench_cpu.md)"
# Seconds a sweep trial spends outside its epochs (building the model, tracing its train and
# test functions, writing records), measured on the same CPU in `make demo`: the sweep's ETA
# uses it until the sweep has measured its own.
DOCUMENTED_TRIAL_OVERHEAD_S = 6.0
# Evaluating one example costs about a third of training on it (forward only).
EVAL_FRACTION = 1.0 / 3.0


def documented_step_seconds(model, norm, m):
    """Seconds per training step from DOCUMENTED_STEP_MS (linear in m between and beyond the
    measured batch sizes); None when the model was not measured."""
    table = (DOCUMENTED_STEP_MS.get((model, norm))
             or DOCUMENTED_STEP_MS.get((model, "batch"))
             or DOCUMENTED_STEP_MS.get((model, "none")))
    if not table:
        return None
    sizes = sorted(table)
    if m in table:
        return table[m] / 1e3
    lo = max((s for s in sizes if s < m), default=sizes[0])
    hi = min((s for s in sizes if s > m), default=sizes[-1])
    if lo == hi:  # outside the table: extend the nearest segment
        lo, hi = (sizes[0], sizes[1]) if m < sizes[0] else (sizes[-2], sizes[-1])
    slope = (table[hi] - table[lo]) / (hi - lo)
    return max(table[lo] + slope * (m - lo), 0.1 * table[sizes[0]]) / 1e3


def fit_linear(points):
    """(a, b) of seconds ≈ a + b·m by least squares over {m: seconds}, both kept >= 0."""
    ms, ts = list(points), list(points.values())
    n, mean_m, mean_t = len(ms), sum(ms) / len(ms), sum(ts) / len(ts)
    var = sum((m - mean_m) ** 2 for m in ms)
    b = max(sum((m - mean_m) * (t - mean_t) for m, t in zip(ms, ts)) / var, 0.0) if var else 0.0
    a = max(mean_t - b * mean_m, 0.0)
    return a, b


class StepTimes:
    """Seconds per step for (norm, m): measured where this sweep measured it, else derived
    from its measurements (a + b·m fitted over several m, or one measurement scaled by the
    documented shape), else the documented CPU table. `source(norm, m)` says which."""

    def __init__(self, model, measured=None):
        self.model = model
        self.measured = dict(measured or {})  # {(norm, m): seconds per step}

    def seconds(self, norm, m):
        return self._estimate(norm, m)[0]

    def source(self, norm, m):
        return self._estimate(norm, m)[1]

    def _estimate(self, norm, m):
        if (norm, m) in self.measured:
            return self.measured[(norm, m)], "measured"
        for same in (True, False):  # this norm's measurements first, then any norm's
            mine = {mm: t for (n, mm), t in self.measured.items() if n == norm or not same}
            if len(mine) >= 2 and len(set(mine)) >= 2:
                a, b = fit_linear(mine)
                return a + b * m, "fitted"
            if mine:
                (m0, t0), = list(mine.items())[:1]
                doc, doc0 = (documented_step_seconds(self.model, norm, x) for x in (m, m0))
                return (t0 * doc / doc0 if doc and doc0 else t0 * m / m0), "scaled"
        doc = documented_step_seconds(self.model, norm, m)
        return doc, ("documented" if doc is not None else None)


def run_steps(cfg, info):
    """(steps per epoch, total steps) of a resolved Config on data `info`."""
    per_epoch = info.num_train // cfg.batch_size
    return per_epoch, per_epoch * cfg.epochs


def run_seconds(cfg, info, step_seconds):
    """Estimated seconds of a whole run: its steps at `step_seconds`, plus one evaluation of
    the test set per epoch (EVAL_FRACTION of training per example)."""
    if step_seconds is None:
        return None
    _, total = run_steps(cfg, info)
    eval_per_epoch = info.num_test * EVAL_FRACTION * step_seconds / cfg.batch_size
    return total * step_seconds + cfg.epochs * eval_per_epoch


def duration(seconds):
    """'45s', '3m12s', '2h05m', '3d04h'; '?' for None."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def power_of_two(exponent):
    """2⁻⁸ for -8; 2^-7.5 where superscripts cannot say it."""
    if float(exponent).is_integer():
        return "2" + str(int(exponent)).translate(_SUPERSCRIPT)
    return f"2^{exponent:g}"
