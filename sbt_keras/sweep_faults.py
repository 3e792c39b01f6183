"""Sweep trials that fail: retried when the sweep is re-run, and a limit on failures in a row.

keras-tuner marks a trial whose run raised as FAILED for good, and stops the whole search
after 3 FAILED trials in a row (points we skip on purpose count too). Here:
- `requeue_failed`: a re-run of the sweep puts every failed trial of the earlier sessions
  back in the oracle's retry queue, so it runs first and resumes from its own checkpoint
  (its trial directory is a run directory like any other); skipped points stay skipped.
- `FailureLimit`: keras-tuner's own limit is switched off (the oracle gets an unreachable
  one) and this Tuner mixin counts real failures only: a trial that raised, not a skipped
  point. After --sweep_failure_limit of them in a row (0: never) the sweep stops with one
  line (`SweepStopped`, exit 1); a failed trial's error stays in its result.yaml and in
  results.csv's `reason` column either way.

The oracle's retry state (`_retry_queue`, `_run_times`) is private keras-tuner state,
listed in sbt_keras/upstream.py.
"""
import sys

from absl import logging

from sbt_keras.errors import SweepStopped

# keras-tuner's statuses of a trial whose run raised: INVALID until the oracle gives up on
# it (max_retries_per_trial, 0 here), then FAILED; FailedTrialError (a skipped point) goes
# straight to FAILED.
RETRYABLE = ("FAILED", "INVALID")
NO_KERAS_TUNER_LIMIT = sys.maxsize  # max_consecutive_failed_trials that is never reached


def requeue_failed(tuner, skipped_names):
    """Sends every failed trial of earlier sessions back to the oracle's retry queue (not
    the skipped points); returns their point names. Call on the process that owns the
    oracle (a single process, or a keras-tuner chief) before `search`."""
    oracle = tuner.oracle
    names = []
    for trial_id, trial in sorted(oracle.trials.items()):
        if trial.status not in RETRYABLE:
            continue
        name = _point_name(tuner, trial)
        if name in skipped_names:
            continue
        if trial_id not in oracle._retry_queue:
            oracle._retry_queue.insert(0, trial_id)  # popped from the end: grid order
        oracle._run_times[trial_id] = 0
        if trial_id in oracle.end_order:
            oracle.end_order.remove(trial_id)
        names.append(name)
    if names:
        oracle.save()
        logging.info("Retrying %d failed trial(s) of an earlier session first: %s",
                     len(names), ", ".join(names))
    return names


def _point_name(tuner, trial):
    try:
        return tuner._point_of(trial.hyperparameters.values).name
    except (AttributeError, KeyError):
        return f"trial {trial.trial_id}"


def _last_line(message):
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


class FailureLimit:
    """Mixin for a keras_tuner.Tuner: stops the sweep after `failure_limit` trials in a row
    raised (0: never); skipped points (FailedTrialError) and completed trials reset nothing
    and reset the count respectively."""

    def __init__(self, *args, failure_limit=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.failure_limit = failure_limit
        self.failed_in_a_row = []
        self.failed = []  # (point name, error) of this session's failed trials

    def on_trial_end(self, trial):
        status = trial.status
        super().on_trial_end(trial)
        if status == "COMPLETED":
            self.failed_in_a_row = []
        elif status == "INVALID":  # its run raised
            failure = (_point_name(self, trial), _last_line(trial.message))
            self.failed.append(failure)
            self.failed_in_a_row.append(failure)
            logging.warning("Trial %s failed (%s); the sweep goes on, and re-running it "
                            "retries this trial", *failure)
            if self.failure_limit and len(self.failed_in_a_row) >= self.failure_limit:
                name, error = failure
                raise SweepStopped(
                    f"the sweep stopped: {len(self.failed_in_a_row)} trial(s) failed in a row "
                    f"(--sweep_failure_limit={self.failure_limit}), the last {name}: "
                    f"{error}; fix the cause and re-run the same command, which retries "
                    f"the failed trials")


def summary(rows, retried):
    """One line on how a sweep session ended."""
    counts = {}
    for row in rows:
        counts[row.get("status")] = counts.get(row.get("status"), 0) + 1
    shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(),
                                                              key=lambda kv: str(kv[0])))
    return f"sweep: {shown or 'no trials'}; {len(retried)} failed trial(s) retried"
