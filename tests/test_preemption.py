"""A SIGTERM to one worker of a 2-worker multi_worker run (training/preemption.py).

The real command line on 2 local worker processes (TF_CONFIG), as in test_strategies.py.
Once the chief's history.csv has its first row, worker 1 (not the chief) alone gets
SIGTERM. Both must stop with `preempted`, exit 143, each having saved a checkpoint at the
same step; re-running both resumes to the final checkpoint and history of an
uninterrupted 2-worker run, bit for bit (the stopped epoch's mean training loss to a few
ulp, see below). About 3 minutes on 2 shared CPU cores (six TensorFlow processes start),
hence `slow`.
"""
import re
import signal
import time

import pytest

from processes import finish, killed_if_left
from sbt_keras import results
from test_strategies import RUN, _checkpoint, _history, _mwms_workers

# 24 steps an epoch in blocks of 4, 72 in all: once the first row appears, epoch 2 takes a
# few seconds, time for the agreement (the handler looks at our SIGTERM flag once a second)
# to land at one of its block boundaries, mid-epoch.
VALUES = dict(RUN, synthetic_train=192, epochs=3, steps_per_execution=4, norm="batch")
STEPS_PER_EPOCH, TOTAL_STEPS = 24, 72
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


def _stopped_step(workers):
    """The step both workers name on exiting 143 (it must be one)."""
    steps = []
    for proc in workers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 143, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        steps.append(int(_STOPPED.search(errors[0]).group(1)))
    assert steps[0] == steps[1] and STEPS_PER_EPOCH <= steps[0] < TOTAL_STEPS, steps
    return steps[0]


def _assert_resumed_as_uninterrupted(got_dir, want_dir, step):
    """Bit for bit but for the stopped epoch's mean training loss: Keras keeps a metric's
    running sum per worker (a SUM SyncOnRead variable); the checkpoint holds the total,
    restored as total / 2 on each worker, so the epoch's remaining batches are added in
    another order (a difference of a few ulp; docs/scale_out.md)."""
    assert results.read_yaml(got_dir / results.RESULT_FILE)["steps"] == TOTAL_STEPS
    got, want = _history(got_dir), _history(want_dir)
    stopped_epoch = step // STEPS_PER_EPOCH
    assert got[stopped_epoch]["train_loss"] == pytest.approx(
        want[stopped_epoch]["train_loss"], rel=1e-6)
    if step % STEPS_PER_EPOCH:
        got[stopped_epoch]["train_loss"] = want[stopped_epoch]["train_loss"]
    assert got == want, [(a, b) for a, b in zip(got, want) if a != b]
    got, want = _checkpoint(got_dir), _checkpoint(want_dir)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert (got[name] == value).all(), name


@pytest.mark.slow
@pytest.mark.fault("SIGTERM to one worker of a 2-worker multi_worker run")
def test_sigterm_to_one_worker_stops_every_worker_at_one_step_and_resumes_exactly(tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    with killed_if_left() as started:
        _stop_and_resume(run, reference, started)


def _stop_and_resume(run, reference, started):
    uninterrupted = _mwms_workers(reference, VALUES)  # runs alongside, on other ports
    workers = _mwms_workers(run, VALUES)
    started += uninterrupted + workers
    _wait_for(run / results.HISTORY_FILE, workers)
    workers[1].send_signal(signal.SIGTERM)
    step = _stopped_step(workers)
    # Each worker saved that step: the chief in the run, worker 1 in its scratch copy.
    assert _latest_checkpoint(run / "checkpoints") == step
    assert _latest_checkpoint(run / "workertemp_worker1" / "checkpoints") == step
    assert results.read_yaml(run / "result.yaml")["status"] == "preempted"
    assert results.read_yaml(run / "workertemp_worker1" / "result.yaml")["status"] == "preempted"

    print(f"stopped at step {step} (epoch {step // STEPS_PER_EPOCH + 1}, batch "
          f"{step % STEPS_PER_EPOCH})")
    resumed = _mwms_workers(run, VALUES)
    started += resumed
    for proc in resumed + uninterrupted:
        finish(proc)
    _assert_resumed_as_uninterrupted(run, reference, step)
    assert not list(run.glob("workertemp_*"))


def test_one_sigterm_owner_and_one_save_at_the_agreed_step(tmp_path):
    # In one process, without a cluster (the handler's local mode), at the callback level:
    # our handler keeps SIGTERM, the handler agrees on a later block, and exactly that
    # step is saved, once, with the Preempted that `run` turns into exit status 143.
    import os
    import types

    import keras
    import numpy as np
    import tensorflow as tf

    from sbt_keras import termination
    from sbt_keras.errors import Preempted
    from sbt_keras.training import callbacks
    from sbt_keras.training.preemption import agreed_stop

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    divergence = callbacks.DivergenceStop()
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=model.optimizer), str(tmp_path), 10)
    owners = []

    class _SigtermAtStep6(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            owners.append(signal.getsignal(signal.SIGTERM))
            if int(self.model.optimizer.iterations.numpy()) == 6:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.5)  # the handler looks at our flag once a second

    # pytest.raises outside Preemption: the Preempted passes through its exit, as in a
    # run, which marks the SIGTERM acted on (else it would stop the next run in-process).
    with pytest.raises(Preempted, match="preempted at step 8, checkpoint saved"):
        with callbacks.Preemption() as preemption:
            checkpointer = callbacks.Checkpointer(manager, divergence, None,
                                                  steps_per_epoch=8)
            with agreed_stop(types.SimpleNamespace(cluster_resolver=None), preemption,
                             checkpointer, steps_per_epoch=8) as stop:
                model.fit(np.zeros((16, 2)), np.zeros((16, 1)), batch_size=2, epochs=2,
                          verbose=0, callbacks=[divergence, _SigtermAtStep6(), checkpointer,
                                                stop])
    assert not termination.received()
    # Flag seen at step 6's check: the agreed step is the next block's end, the epoch's
    # (step 8), asked after the epoch-end save, which the agreed save does not repeat.
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-8"]
    assert set(owners) == {preemption._handle}
