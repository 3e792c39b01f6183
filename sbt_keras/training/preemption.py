"""Preemption of a multi-worker run: a SIGTERM to any one worker stops every worker at one step.

A single process stops by itself on SIGTERM (callbacks.Checkpointer: save at the next block
boundary, raise Preempted). Under MultiWorkerMirroredStrategy that is not enough: a worker
that saved and stopped alone would leave the others blocked in the next step's all-reduce,
and they would save nothing. Here TensorFlow's PreemptionCheckpointHandler does the
agreeing: the worker that got the SIGTERM publishes "save after block k+1" through the
cluster's coordination service and waits until every worker has acknowledged it; every
worker then saves at that block boundary (the same global step, since the workers run in
lockstep) and stops with Preempted, which `run` reports as `preempted`, exit status 143.

How the pieces fit:
- SIGTERM is still owned by callbacks.Preemption (installed once for the whole run, so a
  SIGTERM while loading still ends as `preempted`); the handler polls its flag through
  `TerminationConfig.termination_watcher_fn` instead of installing a signal handler of its
  own (it would replace ours), so exactly one handler owns SIGTERM.
- The save is ours (`save_fn`: Checkpointer.save, the same manager, the same ckpt-<step>
  files the resume reads; the chief writes the run's checkpoints, the others their scratch
  copies, as at every other save). The handler is given an empty checkpoint of its own:
  given ours it would add its run counter to it and restore it a second time.
- The handler's counter counts calls of `save_checkpoint_if_preempted`, one per block of
  `steps_per_execution` steps on every worker; a session starts it at 0 on all of them.
  The last block of an epoch is checked after the epoch's evaluation and history row (as
  Checkpointer saves it), so a checkpoint at an epoch's end always has its row.

TPU: TPUStrategy is driven by one client process, which the single-process path covers;
TensorFlow's handler does nothing on Cloud TPU VMs (nor on GCP CPU VMs: it logs "does not
support usage with TPU or CPU device on GCP"), see docs/scale_out.md.
"""
import contextlib

import keras
import tensorflow as tf

from sbt_keras.errors import Preempted


class AgreedStop(keras.callbacks.Callback):
    """Asks the handler at every block boundary whether the cluster agreed to stop there;
    if so it has saved through `checkpointer` and this raises Preempted. `step()` is the
    global step."""

    def __init__(self, handler, steps_per_epoch, step):
        super().__init__()
        self.handler = handler
        self.steps_per_epoch = steps_per_epoch
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if self.step() % self.steps_per_epoch:
            self.handler.save_checkpoint_if_preempted()
        # else: the epoch's last block, checked in on_epoch_end after its row

    def on_epoch_end(self, epoch, logs=None):
        self.handler.save_checkpoint_if_preempted()


@contextlib.contextmanager
def agreed_stop(strategy, preemption, checkpointer, steps_per_epoch):
    """Yields the callback that stops every worker of a multi-worker cluster at one agreed
    step, saving there (see the module docstring); stops the handler's watcher threads when
    training ends without a preemption. `checkpointer`: a callbacks.Checkpointer, or what
    a pack saves through (training/packed.py): its `save()`, `step()` (the global step)
    and `manager.directory` are used."""
    def exit_fn():  # every worker, right after its save at the agreed step
        raise Preempted(f"preempted at step {checkpointer.step()}, checkpoint saved by "
                        f"every worker")

    config = tf.distribute.experimental.TerminationConfig(
        termination_watcher_fn=lambda: preemption.requested, exit_fn=exit_fn,
        save_fn=checkpointer.save, grace_period=0)
    # Never written (save_fn saves) and its directory never made: the handler only
    # restores from it, finds nothing, and starts its counter at 0.
    unused = tf.train.CheckpointManager(
        tf.train.Checkpoint(), directory=checkpointer.manager.directory + "/unused",
        max_to_keep=1)
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, unused, termination_config=config)
    yield AgreedStop(handler, steps_per_epoch, checkpointer.step)
    # A normal end (after a preemption the handler has stopped its threads before exit_fn;
    # after an error they are daemons, left to die with the process, since stopping them
    # talks to a coordination service that may be gone). Its __del__ would stop them, but
    # nothing says when that runs: a thread still blocked on the coordination service when
    # the chief (which hosts it) exits logs errors.
    handler._stop_cluster_wise_termination_watcher_thread()
    handler._stop_poll_termination_signal_thread()
