"""What a run or a sweep costs: steps, and seconds from step times (no TensorFlow).

A step's time on one device is close to a + b·m: a per-step floor (kernel launches, the
optimizer, the host round trip, amortised over `steps_per_execution`) plus a cost per
example. `DOCUMENTED_STEP_MS` holds step times of the sbt step on in-memory data on this
project's 2-core CPU (see its comment for how each was measured); `StepTimes` prefers step
times measured in the sweep itself and falls back to the documented ones. Used by `--dry_run` and by the
sweep's ETA (training/progress.py).
"""
import math

# ms per training step on the project's 2-core CPU (no GPU), 32x32x3 inputs, float32, the run
# defaults, sbt step on in-memory data. resnet20 + BN: `make bench` on a quiet machine
# (2026-11-22, the README's table). The other models: resnet20's times scaled by each model's
# step-time ratio to resnet20, the median over m = 2 ... 512 of one interleaved run
#   python -m tools.bench --cost_table=resnet20:batch,resnet8:none,resnet8:batch,\
#       resnet32:batch,alexnet_reduced:batch,alexnet_reduced:none --steps=10
# (2026-12-01; the machine was shared, load 4-8 on 2 cores, so the ratios scatter by up to
# 2x across m and only their median is used; docs/bench_cpu.md). An estimate, good to a
# factor of about 1.5: a sweep replaces it with its own step times after its first trials.
# Other norms use the model's `batch` row.
DOCUMENTED_STEP_MS = {
    ("resnet20", "batch"): {2: 16.2, 8: 24.1, 32: 55.4, 128: 199.7, 512: 750.3},
    ("resnet8", "none"): {2: 4.9, 8: 7.3, 32: 16.7, 128: 60.2, 512: 226.1},
    ("resnet8", "batch"): {2: 6.4, 8: 9.5, 32: 21.9, 128: 78.8, 512: 296.1},
    ("resnet32", "batch"): {2: 21.5, 8: 32.0, 32: 73.7, 128: 265.6, 512: 997.7},
    ("alexnet_reduced", "batch"): {2: 4.2, 8: 6.3, 32: 14.4, 128: 52.0, 512: 195.5},
    ("alexnet_reduced", "none"): {2: 3.5, 8: 5.2, 32: 11.8, 128: 42.7, 512: 160.5},
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
    return interpolated_seconds(table, m) if table else None


def interpolated_seconds(table, m):
    """Seconds per step at m from {m: ms per step}: the a + b·m line through the two nearest
    measured batch sizes (the per-step floor plus the per-example cost), so beyond the
    largest measured m the last segment's slope extrapolates; floored at a tenth of the
    smallest m's time."""
    sizes = sorted(table)
    if len(sizes) == 1:
        return table[sizes[0]] * m / sizes[0] / 1e3
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
    mean_m, mean_t = sum(ms) / len(ms), sum(ts) / len(ts)
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


def figure_seconds(trials, single_ms, packed_ms=None, k=1, overhead_s=0.0):
    """(seconds one trial at a time, seconds packed) of a figure's trials [(m, train steps,
    test examples evaluated over the run, size of the pack --pack=K puts it in)], from
    {m: ms per step} of one trial (`single_ms`) and of a pack of `k` trials (`packed_ms`;
    None: no packed figure).

    One trial: steps·t₁(m) + evaluated examples / m · EVAL_FRACTION · t₁(m), plus
    `overhead_s` of set-up. Packed: a trial that shares its pack pays t_K(m)/K per step
    instead of t₁(m) (a short last pack of a column is taken to cost its share of a full
    one), evaluation and set-up alike; a trial alone in its pack (no other eta_tilde at its
    m) costs what it costs unpacked."""
    single = packed = 0.0
    for m, steps, evaluated, pack_size in trials:
        work = steps + evaluated / m * EVAL_FRACTION  # in step-times
        alone = work * interpolated_seconds(single_ms, m) + overhead_s
        single += alone
        if packed_ms is not None:
            packed += (work * interpolated_seconds(packed_ms, m) / k + overhead_s
                       if pack_size > 1 else alone)
    return single, (packed if packed_ms is not None else None)
