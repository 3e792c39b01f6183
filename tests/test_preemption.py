"""A SIGTERM to one worker of a 2-worker multi_worker run (training/preemption.py).

The real command line on 2 local worker processes (TF_CONFIG), as in test_strategies.py.
Once the chief's history.csv has its first row, worker 1 (not the chief) alone gets
SIGTERM. Both must stop with `preempted`, exit 143, each having saved a checkpoint at the
same step; re-running both resumes to the history of an uninterrupted 2-worker run.
"""
import re
import signal
import time

import pytest

from processes import finish
from sbt_keras import results
from test_strategies import RUN, _history, _mwms_workers

# 8 steps an epoch, 48 in all: after the first row appears there are 40 steps left, time
# for the agreement (its poll thread looks once a second) to land mid-run.
VALUES = dict(RUN, synthetic_train=64, epochs=6, norm="batch")
TOTAL_STEPS = 48
_STOPPED = re.compile(r"preempted at step (\d+), checkpoint saved by every worker")


def _wait_for(path, procs, timeout=300):
    end = time.monotonic() + timeout
    while not (path.exists() and results.read_csv(path)):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} never got a row"
        time.sleep(0.05)


def _latest_checkpoint(directory):
    steps = [int(p.name[len("ckpt-"):-len(".index")]) for p in directory.glob("ckpt-*.index")]
    return max(steps)


@pytest.mark.fault("SIGTERM to one worker of a 2-worker multi_worker run")
def test_sigterm_to_one_worker_stops_every_worker_at_one_step_and_resumes_exactly(tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    workers = _mwms_workers(run, VALUES)
    _wait_for(run / results.HISTORY_FILE, workers)
    workers[1].send_signal(signal.SIGTERM)
    steps = []
    for proc in workers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 143, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        steps.append(int(_STOPPED.search(errors[0]).group(1)))
    step = steps[0]
    assert steps == [step, step] and 8 <= step < TOTAL_STEPS, steps
    # Each worker saved that step: the chief in the run, worker 1 in its scratch copy.
    assert _latest_checkpoint(run / "checkpoints") == step
    assert _latest_checkpoint(run / "workertemp_worker1" / "checkpoints") == step
    assert results.read_yaml(run / "result.yaml")["status"] == "preempted"

    resumed = _mwms_workers(run, VALUES)
    uninterrupted = _mwms_workers(reference, VALUES)
    for proc in resumed + uninterrupted:
        finish(proc)
    assert results.read_yaml(run / "result.yaml")["steps"] == TOTAL_STEPS
    assert _history(run) == _history(reference)
    assert not list(run.glob("workertemp_*"))
