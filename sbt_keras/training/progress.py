"""Progress: inside a run (steps, steps/s, ETA) and across a sweep (trial k/N, ETA, best).

`RunProgress` is a Keras callback. Keras calls batch hooks once per `steps_per_execution`
block, and this one only reads the step index and the clock there (no tensor, no device
sync), so it costs nothing measurable per step (docs/bench_cpu.md, "Progress"). On a
terminal it draws a tqdm bar per epoch; otherwise (logs, CI, a batch scheduler) it writes
one plain line every `every_seconds`.

`SweepProgress` prints a header before each trial (`trial 5/16  m=16  η̃=2⁻⁸`), the
sweep's elapsed time, the ETA of the trial and of the sweep from step times measured in
the sweep (`cost.StepTimes`: a trial at small m makes many more steps, so the ETA counts
steps left, not trials left), and the best result so far. While a trial runs, its
`RunProgress` adds the sweep's ETA to its own lines.
"""
import contextlib
import os
import sys
import time

import keras
from absl import logging

from sbt_keras import cost, results

# How progress is shown; run.py sets these from --progress_seconds.
SETTINGS = {"every_seconds": 30.0, "bar": None}  # bar None: when stderr is a terminal
_ACTIVE_SWEEP = []  # the SweepProgress whose trial is running in this process, if any
_OPEN_BARS = set()  # RunProgress objects with a bar on screen


def close_all_bars():
    """Closes every bar still drawn (after Ctrl-C, before the line that says so)."""
    for progress in list(_OPEN_BARS):
        progress._close_bar()


def configure(every_seconds=30.0, bar=None):
    SETTINGS.update(every_seconds=every_seconds, bar=bar)


def callbacks_for_run(cfg, steps_per_epoch):
    """[the run's RunProgress], or [] with --progress_seconds=0 and no terminal."""
    bar = SETTINGS["bar"]
    if bar is None:
        bar = sys.stderr.isatty()
    if not bar and not SETTINGS["every_seconds"]:
        return []
    sweep = _ACTIVE_SWEEP[-1] if _ACTIVE_SWEEP else None
    return [RunProgress(steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, bar=bar,
                        every_seconds=SETTINGS["every_seconds"],
                        sweep_remaining=sweep.remaining_seconds if sweep else None)]


class RunProgress(keras.callbacks.Callback):
    """Steps done, steps/s and ETAs of the epoch and the run (and the sweep, when given
    `sweep_remaining(seconds_per_step)`: the seconds the sweep needs after this trial)."""

    # Reads only the step index and the clock: safe for Keras's asynchronous batch hooks.
    async_safe = True

    def __init__(self, *, steps_per_epoch, epochs, every_seconds=30.0, bar=False,
                 sweep_remaining=None, clock=time.monotonic, log=logging.info, file=None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.every_seconds = every_seconds
        self.bar = bar
        self.sweep_remaining = sweep_remaining
        self.clock = clock
        self.log = log
        self.file = file  # the bar's stream (default stderr)
        self._bar = None
        self._train_seconds = 0.0  # compute time of the timed blocks (not the first one)
        self._train_steps = 0
        self._seen_block = False  # the session's first block holds the tracing: not timed
        self._eval_seconds = None  # the last epoch's evaluation
        self._last_line = None

    # -------------------------------------------------------------- Keras hooks
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        # A run resumed mid-epoch fits the rest of that epoch only: Keras counts from 0.
        self._offset = self.steps_per_epoch - int(self.params.get("steps") or
                                                  self.steps_per_epoch)
        self._done = self._offset
        self._mark = self.clock()
        self._eval_start = None
        if self._last_line is None:
            self._last_line = self._mark
        if self.bar:
            from tqdm import tqdm
            self._bar = tqdm(total=self.steps_per_epoch, initial=self._offset,
                             desc=f"epoch {epoch + 1}/{self.epochs}", unit="step",
                             leave=False, dynamic_ncols=True, file=self.file or sys.stderr,
                             mininterval=0.5)
            _OPEN_BARS.add(self)

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        done = self._offset + batch + 1
        new, self._done = done - self._done, done
        if self._seen_block:
            self._train_seconds += now - self._mark
            self._train_steps += new
        self._seen_block = True
        self._mark = now
        if self._bar is not None:
            self._bar.update(new)
            if now - self._last_line >= 1.0:  # the postfix at most once a second
                self._bar.set_postfix_str(self._etas(epoch=False), refresh=False)
                self._last_line = now
        elif self.every_seconds and now - self._last_line >= self.every_seconds:
            self.log(self.line())
            self._last_line = now
        if done == self.steps_per_epoch:  # the epoch's evaluation follows
            self._close_bar()
            self._eval_start = now

    def on_epoch_end(self, epoch, logs=None):
        if self._eval_start is not None:
            self._eval_seconds = self.clock() - self._eval_start
        self._close_bar()

    def on_train_end(self, logs=None):
        self._close_bar()

    # -------------------------------------------------------------- numbers
    @property
    def steps_per_second(self):
        """Training steps per second over this session's timed blocks (None until two
        blocks ran: the first one includes tracing)."""
        if not self._train_steps or self._train_seconds <= 0:
            return None
        return self._train_steps / self._train_seconds

    def epoch_eta(self):
        rate = self.steps_per_second
        return None if rate is None else (self.steps_per_epoch - self._done) / rate

    def run_eta(self):
        """Seconds until the run ends: its steps left at the measured rate, plus an
        evaluation per epoch left (as long as the last one took)."""
        rate = self.steps_per_second
        if rate is None:
            return None
        step = self._epoch * self.steps_per_epoch + self._done
        evals = (self.epochs - self._epoch) * (self._eval_seconds or 0.0)
        return (self.epochs * self.steps_per_epoch - step) / rate + evals

    def line(self):
        """The plain progress line: where the run is, how fast, how long still."""
        rate = self.steps_per_second
        where = f"epoch {self._epoch + 1}/{self.epochs}  step {self._done}/{self.steps_per_epoch}"
        if not rate:
            return f"{where}  (measuring speed)"
        return f"{where}  {rate:.1f} steps/s  {self._etas()}"

    def _etas(self, epoch=True):
        """The ETAs; the bar shows the epoch's itself, so `epoch=False` leaves it out."""
        parts = [f"epoch ETA {cost.duration(self.epoch_eta())}"] if epoch else []
        parts.append(f"run ETA {cost.duration(self.run_eta())}")
        if self.sweep_remaining is not None and self.run_eta() is not None:
            after = self.sweep_remaining(1.0 / self.steps_per_second)
            if after is not None:
                parts.append(f"sweep ETA ~{cost.duration(self.run_eta() + after)}")
        return "  ".join(parts)

    def _close_bar(self):
        _OPEN_BARS.discard(self)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------- sweeps
FINISHED = ("completed", "diverged")


class SweepProgress:
    """Headers and ETAs of a sweep's trials. `valid` is [(point, resolved config)];
    results come from the sweep's results.csv (rewritten after every trial, by every
    worker) and from the trial directories' history.csv."""

    def __init__(self, output_dir, valid, skipped=0, info=None, clock=time.monotonic,
                 log=logging.info):
        self.output_dir = output_dir
        self.valid = list(valid)
        self.skipped = skipped
        self.clock = clock
        self.log = log
        self.started = clock()
        self.info = info or (self.valid[0][1].data_info() if self.valid else None)
        self.model = self.valid[0][1].model if self.valid else None
        self.axes = set(self.valid[0][0].as_dict()) if self.valid else set()
        self._overheads = []  # per-trial seconds outside the timed epochs (build, tracing)
        self._current = None
        self._finished = set()  # names of the finished points, as of the last read
        self._measured = {}  # {(norm, m): seconds per step} of the finished trials

    def wrap(self, run_point):
        """`run_point(point)` with this sweep's header and ETA around each valid point."""
        valid = {p.name for p, _ in self.valid}

        def run(point):
            if point.name not in valid:  # a skipped point: nothing runs
                return run_point(point)
            with self.trial(point):
                return run_point(point)

        return run

    # -------------------------------------------------------------- trials
    @contextlib.contextmanager
    def trial(self, point):
        """Around one trial: its header first; while it runs, its RunProgress can ask for
        the sweep's remaining time."""
        rows = self._rows()
        row = rows.get(point.name, {})
        if row.get("status") in FINISHED:
            self.log(f"{point.name}: already finished ({_result_text(row)})")
            yield
            return
        before = self._history_end(point)
        self._current = point
        self._measured = self._measurements(rows)
        for text in self.header(point, rows):
            self.log(text)
        start = self.clock()
        _ACTIVE_SWEEP.append(self)
        try:
            yield
        finally:
            _ACTIVE_SWEEP.remove(self)
            self._current = None
            after = self._history_end(point)
            if after[0] > before[0]:  # time outside the epochs' own wall clock
                self._overheads.append(max(self.clock() - start - (after[1] - before[1]),
                                           0.0))

    def header(self, point, rows=None):
        """The two lines printed before a trial."""
        rows = self._rows() if rows is None else rows
        done = [r for r in rows.values() if r.get("status") in FINISHED]
        diverged = sum(r.get("status") == "diverged" for r in done)
        failed = sum(r.get("status") == "failed" for r in rows.values())
        title = f"trial {len(done) + 1}/{len(self.valid)}  " + _point_text(point.as_dict())
        status = [f"{len(done)}/{len(self.valid)} done"
                  + (f" ({diverged} diverged)" if diverged else "")]
        if failed:
            status.append(f"{failed} failed")
        if self.skipped:
            status.append(f"{self.skipped} skipped")
        parts = [", ".join(status), f"elapsed {cost.duration(self.clock() - self.started)}"]
        times = self._step_times()
        trial, rest = self._seconds_left(point, times), self.remaining_seconds(None)
        if trial is not None and rest is not None:
            parts.append(f"ETA this trial ~{cost.duration(trial)}, sweep "
                         f"~{cost.duration(trial + rest)} ({self._steps_left():,} steps left; "
                         f"{self._eta_basis(times)})")
        best = self.best(rows)
        if best:
            parts.append(f"best so far {best['test_accuracy'] * 100:.1f}% ("
                         + _point_text({k: v for k, v in best.items() if k in self.axes},
                                       " ") + ")")
        return [title, "  " + " · ".join(parts)]

    def best(self, rows=None):
        """The completed results row with the highest test accuracy, or None."""
        rows = self._rows() if rows is None else rows
        return max((r for r in rows.values() if r.get("status") == "completed"
                    and results.is_finite(r.get("test_accuracy"))),
                   key=lambda r: r["test_accuracy"], default=None)

    def finished(self):
        """The line after the last trial: how long it took, the best result, the table."""
        rows = self._rows()
        done = sum(r.get("status") in FINISHED for r in rows.values())
        best = self.best(rows)
        best_text = (f"; best {best['test_accuracy'] * 100:.1f}% ("
                     + _point_text({k: v for k, v in best.items() if k in self.axes}, " ")
                     + ")" if best else "")
        self.log(f"sweep: {done}/{len(self.valid)} trials finished in this directory, this "
                 f"session {cost.duration(self.clock() - self.started)}{best_text}; table: "
                 f"{os.path.join(self.output_dir, 'results.csv')}")

    def remaining_seconds(self, current_seconds_per_step=None):
        """Estimated seconds of every unfinished trial but the one running now (None when no
        step time is known for them). `current_seconds_per_step`: the running trial's
        measured rate, used for the points that share its norm and m."""
        times = self._step_times(current_seconds_per_step)
        total = 0.0
        for point, cfg in self.valid:
            if point == self._current or point.name in self._finished:
                continue
            seconds = self._seconds_left(point, times, cfg)
            if seconds is None:
                return None
            total += seconds
        return total

    # -------------------------------------------------------------- internals
    def _rows(self):
        path = os.path.join(self.output_dir, "results.csv")
        try:
            rows = results.read_csv(path) if results.exists(path) else []
        except (OSError, ValueError):  # being rewritten by another worker: no header now
            rows = []
        rows = {r.get("trial"): r for r in rows if r.get("trial")}
        self._finished = {name for name, r in rows.items() if r.get("status") in FINISHED}
        return rows

    def _measurements(self, rows):
        """{(norm, m): seconds per step} of the finished trials (their wall clock over their
        steps, evaluations included)."""
        per = {}
        for r in rows.values():
            steps, wall = r.get("steps"), r.get("wall_seconds")
            if (r.get("status") in FINISHED and isinstance(steps, (int, float)) and steps > 0
                    and isinstance(wall, (int, float)) and wall > 0):
                per.setdefault((self._norm(r), int(r["batch_size"])), []).append(wall / steps)
        return {key: sorted(v)[len(v) // 2] for key, v in per.items()}

    def _norm(self, values):
        return values.get("norm") or self.valid[0][1].norm

    def _step_times(self, current_seconds_per_step=None):
        measured = dict(self._measured)
        if self._current is not None and current_seconds_per_step:
            values = self._current.as_dict()
            cfg = self._config(self._current)
            key = (self._norm(values), cfg.batch_size)
            measured.setdefault(key, current_seconds_per_step)
        return cost.StepTimes(self.model, measured)

    def _config(self, point):
        return next(cfg for p, cfg in self.valid if p == point)

    def _seconds_left(self, point, times, cfg=None):
        cfg = cfg or self._config(point)
        per_step = times.seconds(cfg.norm, cfg.batch_size)
        if per_step is None:
            return None
        _, total = cost.run_steps(cfg, self.info)
        steps_done = self._history_end(point)[0] if point == self._current else 0
        overhead = (sorted(self._overheads)[len(self._overheads) // 2]
                    if self._overheads else cost.DOCUMENTED_TRIAL_OVERHEAD_S)
        return (total - steps_done) * per_step + overhead

    def _steps_left(self):
        return sum(cost.run_steps(cfg, self.info)[1] for p, cfg in self.valid
                   if p.name not in self._finished)

    def _eta_basis(self, times):
        sources = {times.source(cfg.norm, cfg.batch_size) for p, cfg in self.valid
                   if p.name not in self._finished}
        if sources <= {"measured"}:
            return "step times measured in this sweep"
        if sources & {"measured", "fitted", "scaled"}:
            return "step times from this sweep's trials so far"
        return "documented CPU step times, docs/bench_cpu.md"

    def _history_end(self, point):
        """(global step, wall seconds) of the trial's last history row; (0, 0) if none."""
        path = os.path.join(self.output_dir, "trials", point.name, results.HISTORY_FILE)
        try:
            rows = results.read_csv(path) if results.exists(path) else []
        except (OSError, ValueError):
            rows = []
        if not rows:
            return 0, 0.0
        return int(rows[-1].get("step") or 0), float(rows[-1].get("wall_seconds") or 0.0)


_SHORT = (("norm", "norm={}"), ("batch_size", "m={}"), ("log2_base_lr", "η̃={}"),
          ("bn_batch_size", "BN batch={}"), ("epochs", "epochs={}"), ("seed", "seed={}"))


def _point_text(values, separator="  "):
    """`m=16  η̃=2⁻⁸` (and the norm, BN batch, epochs, seed when they are given)."""
    parts = []
    for key, fmt in _SHORT:
        value = values.get(key)
        if value is None or value == "":
            continue
        if key == "log2_base_lr":
            value = cost.power_of_two(float(value))
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(fmt.format(value))
    return separator.join(parts)


def _result_text(row):
    if row.get("status") == "diverged":
        return "diverged"
    accuracy = row.get("test_accuracy")
    return (f"{accuracy * 100:.1f}%" if results.is_finite(accuracy)
            else str(row.get("status")))
