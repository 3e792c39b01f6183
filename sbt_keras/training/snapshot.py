"""A run's network at one of its checkpoints, with the run's own data: what the instruments
(sharpness, interpolation, gradient noise, statistics noise) and warm starts measure.

    snap = snapshot.load("runs/m8", epoch=10)   # epoch None: the newest checkpoint
    images, labels = snap.train_arrays(1024)     # standardized, un-augmented

A run keeps its newest 3 checkpoints; `--keep_checkpoint_every_epochs=K` also keeps the
initial weights and every K-th epoch end under checkpoints/epochs/, which is what loading
an earlier epoch needs.
"""
import dataclasses
import os
import re

import numpy as np

from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.training.resume import CHECKPOINT_DIR

EPOCHS_DIR = "epochs"  # under checkpoints/: epoch-<e> for kept epoch ends, epoch-0 initial
_STEP_CHECKPOINT = re.compile(r"^ckpt-(\d+)\.index$")
_EPOCH_CHECKPOINT = re.compile(r"^epoch-(\d+)\.index$")


def epoch_checkpoint_prefix(output_dir, epoch):
    """Where the kept checkpoint of epoch end `epoch` (0: initial weights) is written."""
    return os.path.join(output_dir, CHECKPOINT_DIR, EPOCHS_DIR, f"epoch-{epoch}")


def available(run_dir):
    """{global step: checkpoint prefix} of every checkpoint the run directory holds."""
    found = {}
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    for name in results.listdir(directory) if results.isdir(directory) else []:
        match = _STEP_CHECKPOINT.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(directory, name[:-len(".index")])
    config = read_config(run_dir)
    steps_per_epoch = config["derived"]["steps_per_epoch"]
    epochs = os.path.join(directory, EPOCHS_DIR)
    for name in results.listdir(epochs) if results.isdir(epochs) else []:
        match = _EPOCH_CHECKPOINT.match(name)
        if match:
            found.setdefault(int(match.group(1)) * steps_per_epoch,
                             os.path.join(epochs, name[:-len(".index")]))
    return dict(sorted(found.items()))


def read_config(run_dir):
    """config.yaml of a run directory; ConfigError naming the directory if it is not one."""
    path = os.path.join(run_dir, results.CONFIG_FILE)
    if not results.exists(path):
        raise ConfigError(f"{run_dir} holds no {results.CONFIG_FILE}; give a run's "
                          f"--output_dir (a sweep's trials are under its trials/)")
    return results.read_yaml(path) or {}


@dataclasses.dataclass
class Snapshot:
    """A run's Config, network and summed-gradient model with a checkpoint restored."""
    run_dir: str
    cfg: Config
    derived: dict
    network: object
    model: object
    step: int
    checkpoint: str

    @property
    def epoch(self):
        return self.step / self.derived["steps_per_epoch"]

    def _splits(self):
        if not hasattr(self, "_cached_splits"):
            self._cached_splits = load_arrays(self.cfg)
        return self._cached_splits

    def train_arrays(self, n=None, seed=0):
        """(images float32 standardized, labels int32) of the un-augmented training set, or a
        seeded sample of `n` of them (in data order)."""
        return _sample(self._splits()[0], n, seed, "training")

    def test_arrays(self, n=None, seed=0):
        return _sample(self._splits()[1], n, seed, "test")


def load(run_dir, epoch=None, strategy=None):
    """The Snapshot of `run_dir` at the end of `epoch` (None: its newest checkpoint)."""
    import tensorflow as tf

    from sbt_keras.training import schedules
    from sbt_keras.training.builder import build_model

    stored = read_config(run_dir)
    derived = stored.get("derived") or {}
    values = {k: v for k, v in stored.items() if k not in ("derived", "versions")}
    cfg = Config.from_dict(values)
    if cfg.dataset == "imagenet2012":
        raise ConfigError(f"{run_dir}: the instruments need in-memory data (CIFAR or "
                          f"synthetic), not streamed imagenet2012")
    checkpoints = available(run_dir)
    if not checkpoints:
        raise ConfigError(f"{run_dir} holds no checkpoint; train it first (or re-run it to "
                          f"resume)")
    if epoch is None:
        step = max(checkpoints)
    else:
        step = int(epoch) * derived["steps_per_epoch"]
        if step not in checkpoints:
            kept = ", ".join(_epoch_names(checkpoints, derived["steps_per_epoch"]))
            raise ConfigError(f"{run_dir} has no checkpoint at the end of epoch {epoch} "
                              f"(kept: {kept}); train with --keep_checkpoint_every_epochs "
                              f"to keep earlier epochs")
    info = cfg.data_info()
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        network, model = build_model(cfg, info, derived["bn_batch_size"],
                                     schedules.from_config(cfg, derived["steps_per_epoch"]))
    model.optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(
        checkpoints[step]).expect_partial()
    return Snapshot(run_dir=run_dir, cfg=cfg, derived=derived, network=network, model=model,
                    step=step, checkpoint=checkpoints[step])


def load_arrays(cfg):
    """((train images, labels), (test images, labels)) of `cfg`'s data, standardized with
    the training set's channel statistics exactly as the run's input pipeline does."""
    from sbt_keras import data
    from sbt_keras.data import augment

    splits = data.load_for(cfg)
    mean, std = augment.channel_stats(splits.train.images)

    def standardized(arrays):
        images = augment.standardize(arrays.images.astype(np.float32), mean, std)
        return np.asarray(images, np.float32), arrays.labels

    return standardized(splits.train), standardized(splits.test)


def _sample(arrays, n, seed, what):
    images, labels = arrays
    if n is None or n == len(labels):
        return images, labels
    if not 0 < n <= len(labels):
        raise ConfigError(f"a sample of {n} {what} examples was asked for; there are "
                          f"{len(labels)}")
    keep = np.sort(np.random.default_rng(seed).choice(len(labels), n, replace=False))
    return images[keep], labels[keep]


def _epoch_names(checkpoints, steps_per_epoch):
    return [f"epoch {s // steps_per_epoch}" if s % steps_per_epoch == 0 else f"step {s}"
            for s in checkpoints]
