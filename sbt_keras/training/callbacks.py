"""Callbacks that turn a `fit` into records: history.csv, TensorBoard, checkpoints, divergence.

Keras calls batch-level hooks once per `steps_per_execution` steps, so nothing here adds a
per-step host round trip: divergence is read from the epoch's running mean loss, which turns
NaN/Inf as soon as any example's loss does and stays so for the epoch.
"""
import math
import os
import signal
import threading
import time

import keras
import tensorflow as tf
from absl import logging

from sbt_keras import results, termination
from sbt_keras.errors import Preempted

TB_DIR = "tb"


class Preemption:
    """Context in which SIGTERM (how TPU/VM preemption arrives) requests a clean stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        termination.check()  # a SIGTERM while loading whose exception was lost (issue 15)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the next step boundary")
        self.requested = True
        termination.note()

    def __exit__(self, exc_type, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if exc_type is Preempted:
            termination.acted_on()
        return False


class DivergenceStop(keras.callbacks.Callback):
    """Stops training when the epoch's running training loss is NaN/Inf, or (with
    `factor` > 0) above `factor` times the first finite loss the run reported.

    `diverged_at_step` is the global step at which that was first seen (exact to within
    `steps_per_execution` steps: Keras calls batch hooks once per execution). The first
    loss lives in the variable `reference` (NaN until seen), which the run checkpoints, so
    a resumed run compares against the same value as an uninterrupted one.
    """

    def __init__(self, factor=0.0):
        super().__init__()
        self.factor = factor
        self.reference = tf.Variable(float("nan"), trainable=False, dtype=tf.float64,
                                     name="divergence_reference")
        self.diverged_at_step = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or self.diverged_at_step is not None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self._stop()
        elif math.isnan(self.reference.numpy()):
            self.reference.assign(loss)
        elif self.factor > 0 and loss > self.factor * float(self.reference.numpy()):
            self._stop()

    def _stop(self):
        self.diverged_at_step = int(self.model.optimizer.iterations.numpy())
        self.model.stop_training = True

    @property
    def diverged(self):
        return self.diverged_at_step is not None


class EpochRecorder(keras.callbacks.Callback):
    """Appends one row per epoch to history.csv (atomically) and mirrors it to TensorBoard."""

    def __init__(self, output_dir, *, batch_size, schedule, history=(), hparams=None,
                 histogram_freq=0, network=None, probes=()):
        """`probes`: callables taking the epoch's logs and returning {column: value}, the
        run's extra history columns (mixing weights, gradient noise, a sharpness a callback
        before this one put in the logs); a None value is an empty cell and no TensorBoard
        scalar (train/<column>)."""
        super().__init__()
        self.probes = tuple(probes)
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.schedule = schedule
        self.rows = list(history)  # rows of earlier, resumed sessions
        self.hparams = hparams or {}
        self.histogram_freq = histogram_freq
        self.network = network
        tb = os.path.join(output_dir, TB_DIR)
        self._writers = {name: tf.summary.create_file_writer(os.path.join(tb, name))
                         for name in ("train", "test")}
        self._root_writer = tf.summary.create_file_writer(tb)
        self._start = None

    def on_train_begin(self, logs=None):
        # Wall time counts from the last recorded epoch end (resumed runs keep counting).
        self._wall_before = self.rows[-1]["wall_seconds"] if self.rows else 0.0
        self._start = time.monotonic()
        if self.hparams:  # once per run: the caller passes hparams only on a fresh start
            from tensorboard.plugins.hparams import api as hp
            with self._root_writer.as_default():
                hp.hparams(self.hparams, trial_id=os.path.basename(
                    os.path.abspath(self.output_dir)))
            self.hparams = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        step = int(self.model.optimizer.iterations.numpy())
        base_lr = float(self.schedule(max(step - 1, 0)))  # the rate of the epoch's last update
        row = {
            "epoch": epoch + 1,
            "step": step,
            "learning_rate": self.batch_size * base_lr,
            "base_lr": base_lr,
            "train_loss": _float(logs.get("loss")),
            "train_accuracy": _float(logs.get("accuracy")),
            "test_loss": _float(logs.get("val_loss")),
            "test_accuracy": _float(logs.get("val_accuracy")),
            "wall_seconds": self._wall_before + time.monotonic() - self._start,
        }
        extra = {k: v for probe in self.probes for k, v in probe(logs).items()}
        row.update(extra)
        self.rows.append(row)
        self._wall_before, self._start = row["wall_seconds"], time.monotonic()
        columns = results.HISTORY_COLUMNS + tuple(
            k for r in self.rows for k in r if k not in results.HISTORY_COLUMNS)
        results.write_csv(os.path.join(self.output_dir, results.HISTORY_FILE), self.rows,
                          tuple(dict.fromkeys(columns)))
        self._write_scalars(epoch + 1, row, extra)

    def _write_scalars(self, epoch, row, extra=None):
        # TensorBoard's x-axis is the global step (SGD updates done), so a learning-rate
        # drop shows as a step at the iteration where it happens, not a ramp across an epoch.
        step = int(row["step"])
        for split in ("train", "test"):
            with self._writers[split].as_default(step=step):
                tf.summary.scalar("loss", row[f"{split}_loss"])
                tf.summary.scalar("accuracy", row[f"{split}_accuracy"])
        first = self.rows[-2]["step"] if len(self.rows) > 1 else 0
        for x in _rate_change_points(self.schedule, first, step):  # x updates done
            with self._writers["train"].as_default(step=x):
                tf.summary.scalar("learning_rate", self.batch_size * float(self.schedule(x - 1)))
                tf.summary.scalar("base_lr", float(self.schedule(x - 1)))
        with self._writers["train"].as_default(step=step):
            tf.summary.scalar("learning_rate", row["learning_rate"])
            tf.summary.scalar("base_lr", row["base_lr"])
            for name, value in (extra or {}).items():
                if value is not None:
                    tf.summary.scalar(name, value)
            if self.histogram_freq and epoch % self.histogram_freq == 0 and self.network:
                for v in self.network.trainable_variables:
                    tf.summary.histogram(v.path, v.value)
        for writer in self._writers.values():
            writer.flush()

    def write_final(self, name, value, step):
        """A scalar for the HParams dashboard (e.g. the median-of-final-5 accuracy)."""
        with self._root_writer.as_default(step=step):
            tf.summary.scalar(name, value)
        self._root_writer.flush()


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch (fit runs with verbose=0, so logs stay readable on clusters)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        nan = float("nan")
        logging.info("epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f",
                     epoch + 1, self.epochs, logs.get("loss", nan), logs.get("accuracy", nan),
                     logs.get("val_loss", nan), logs.get("val_accuracy", nan))


class Checkpointer(keras.callbacks.Callback):
    """Saves model, optimizer and the epoch's running metrics: at every epoch end, every
    `every_steps` steps (0: epoch ends only), and at the next step boundary once SIGTERM
    was received (then raises Preempted). Checkpoints are numbered by global step. Nothing
    is saved once training diverged.

    The last step of an epoch is only ever saved in `on_epoch_end`, after the epoch's
    evaluation and history row: a checkpoint at an epoch's end always has its row, so a
    resumed run never skips an epoch's evaluation. SIGTERM during that last block or
    during the evaluation therefore stops after the evaluation.

    `preemption` None: something else acts on SIGTERM (a multi-worker run's workers agree
    on the step to stop at, training/preemption.py, and save through `save`).
    """

    def __init__(self, manager, divergence, preemption, steps_per_epoch, every_steps=0):
        super().__init__()
        self.manager = manager
        self.divergence = divergence
        self.preemption = preemption
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self._last = None

    def step(self):
        """The global step: the model's optimizer's (what a checkpoint is numbered by)."""
        return int(self.model.optimizer.iterations.numpy())

    def save(self):
        """Saves the current step unless it is saved already (or training diverged);
        returns the step."""
        step = self.step()
        if step != self._last and not self.divergence.diverged:
            self.manager.save(checkpoint_number=step)
            self._last = step
        return step

    def _stop_if_preempted(self):
        if (self.preemption is not None and self.preemption.requested
                and not self.divergence.diverged):
            raise Preempted(f"preempted at step {self.save()}; checkpoint saved")

    def on_train_begin(self, logs=None):
        if self.every_steps and self._last is None:  # interval saves at multiples of N
            step = self.step()
            self._last = step - step % self.every_steps

    def on_train_batch_end(self, batch, logs=None):
        step = self.step()
        if step % self.steps_per_epoch == 0:
            return  # the epoch's end: saved by on_epoch_end, after the evaluation
        self._stop_if_preempted()
        if self.every_steps and step - self._last >= self.every_steps:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()
        self._stop_if_preempted()


class EpochSnapshots(keras.callbacks.Callback):
    """Keeps the initial weights and every `every_epochs`-th epoch end as a checkpoint of
    its own (`prefix(epoch)`), beside the rolling ones: what warm starts, interpolation and
    the instruments load an earlier epoch from. Nothing is kept once training diverged."""

    def __init__(self, checkpoint, prefix, every_epochs, divergence):
        super().__init__()
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.every_epochs = every_epochs
        self.divergence = divergence

    def on_train_begin(self, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 0:
            self.checkpoint.write(self.prefix(0))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs == 0 and not self.divergence.diverged:
            self.checkpoint.write(self.prefix(epoch + 1))


class RestoreMetrics(keras.callbacks.Callback):
    """Puts back the running metric sums of a checkpoint taken mid-epoch.

    Keras resets metrics at every epoch start; this runs right after that reset, once, so
    the resumed epoch's mean train loss and accuracy cover the whole epoch.
    """

    def __init__(self, variables, values):
        super().__init__()
        self.variables = variables
        self.values = values

    def on_epoch_begin(self, epoch, logs=None):
        if self.values is not None:
            for variable, value in zip(self.variables, self.values):
                variable.assign(value)
            self.values = None


def _rate_change_points(schedule, first, last):
    """The x values (updates done) in (first, last) around each decay boundary b of the
    epoch: x = b, the last update at the old rate, and x = b + 1, the first at the new one
    (the epoch's end, x = last, is written with its row)."""
    points = set()
    for b in getattr(schedule, "boundaries", ()):
        points |= {x for x in (b, b + 1) if first < x < last}
    return sorted(points)


def _float(x):
    return float("nan") if x is None else float(x)
