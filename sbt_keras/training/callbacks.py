"""Callbacks that turn a `fit` into records: history.csv, TensorBoard, checkpoints, divergence.

Keras calls batch-level hooks once per `steps_per_execution` steps, so nothing here needs a
per-step host round trip: divergence is read from the epoch's running mean loss, which turns
NaN/Inf as soon as any example's loss does and stays so for the epoch.
"""
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from sbt_keras import results

TB_DIR = "tb"


class DivergenceStop(keras.callbacks.Callback):
    """Stops training when the running training loss is NaN/Inf.

    `diverged_at_step` is the first global step at which a non-finite loss was seen (exact to
    within `steps_per_execution` steps).
    """

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.diverged_at_step = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if self.diverged_at_step is None and loss is not None and not math.isfinite(float(loss)):
            self.diverged_at_step = self._epoch * self.steps_per_epoch + batch + 1
            self.model.stop_training = True

    @property
    def diverged(self):
        return self.diverged_at_step is not None


class EpochRecorder(keras.callbacks.Callback):
    """Appends one row per epoch to history.csv (atomically) and mirrors it to TensorBoard."""

    def __init__(self, output_dir, *, steps_per_epoch, batch_size, schedule, history=(),
                 hparams=None, histogram_freq=0, network=None):
        super().__init__()
        self.output_dir = output_dir
        self.steps_per_epoch = steps_per_epoch
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
        self._wall_before = self.rows[-1]["wall_seconds"] if self.rows else 0.0
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()
        if self.hparams and not self.rows:
            from tensorboard.plugins.hparams import api as hp
            with self._root_writer.as_default():
                hp.hparams(self.hparams, trial_id=os.path.basename(
                    os.path.abspath(self.output_dir)))

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
        self.rows.append(row)
        results.write_csv(os.path.join(self.output_dir, results.HISTORY_FILE), self.rows,
                          results.HISTORY_COLUMNS)
        self._write_scalars(epoch + 1, row)

    def _write_scalars(self, epoch, row):
        for split in ("train", "test"):
            with self._writers[split].as_default(step=epoch):
                tf.summary.scalar("loss", row[f"{split}_loss"])
                tf.summary.scalar("accuracy", row[f"{split}_accuracy"])
        with self._writers["train"].as_default(step=epoch):
            tf.summary.scalar("learning_rate", row["learning_rate"])
            tf.summary.scalar("base_lr", row["base_lr"])
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


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model + optimizer state at every epoch end (skipped once training diverged)."""

    def __init__(self, manager, divergence):
        super().__init__()
        self.manager = manager
        self.divergence = divergence

    def on_epoch_end(self, epoch, logs=None):
        if not self.divergence.diverged:
            self.manager.save(checkpoint_number=epoch + 1)


def _float(x):
    return float("nan") if x is None else float(x)
