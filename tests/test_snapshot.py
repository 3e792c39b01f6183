"""Loading a run's checkpoint at an epoch: the network and data the instruments measure."""
import csv
import pathlib

import keras
import numpy as np
import pytest

from sbt_keras import models
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import snapshot


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    cfg = Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=48,
                 synthetic_test=24, batch_size=8, base_lr=2.0 ** -6, epochs=2, median_of=1,
                 eval_batch_size=8, keep_checkpoint_every_epochs=1, deterministic=True,
                 output_dir=str(tmp_path_factory.mktemp("kept") / "run")).resolve()
    train(cfg)
    return cfg


def _weights(network):
    return [v.numpy() for v in network.weights]


def test_epoch_0_is_the_initial_network(kept_run):
    snap = snapshot.load(kept_run.output_dir, epoch=0)
    keras.utils.set_random_seed(kept_run.seed)  # as train() does before building
    fresh = models.build("resnet8", input_shape=(8, 8, 3), num_classes=10, norm="batch")
    for a, b in zip(_weights(snap.network), _weights(fresh)):
        np.testing.assert_array_equal(a, b)
    assert snap.step == 0 and snap.epoch == 0


def test_newest_checkpoint_is_the_last_epoch_and_reproduces_its_test_accuracy(kept_run):
    last = snapshot.load(kept_run.output_dir)
    assert last.step == 12 and last.epoch == 2  # 48 // 8 = 6 steps per epoch
    same = snapshot.load(kept_run.output_dir, epoch=2)
    for a, b in zip(_weights(last.network), _weights(same.network)):
        np.testing.assert_array_equal(a, b)
    images, labels = last.test_arrays()
    logits = last.network(images, training=False).numpy()
    with open(pathlib.Path(kept_run.output_dir) / "history.csv") as f:
        recorded = float(list(csv.DictReader(f))[-1]["test_accuracy"])
    assert np.mean(np.argmax(logits, 1) == labels) == pytest.approx(recorded, abs=1e-6)


def test_epochs_differ_and_samples_are_seeded(kept_run):
    one, two = (snapshot.load(kept_run.output_dir, epoch=e) for e in (1, 2))
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(one.network),
                                                        _weights(two.network)))
    a, _ = one.train_arrays(16, seed=3)
    b, _ = two.train_arrays(16, seed=3)
    np.testing.assert_array_equal(a, b)
    assert one.train_arrays()[0].shape == (48, 8, 8, 3)


def test_missing_epoch_and_bad_directories_are_one_line(kept_run, tmp_path):
    with pytest.raises(ConfigError, match=r"no checkpoint at the end of epoch 5 \(kept: "
                                          r"epoch 0, epoch 1, epoch 2\)"):
        snapshot.load(kept_run.output_dir, epoch=5)
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        snapshot.load(str(tmp_path))
    with pytest.raises(ConfigError, match="a sample of 100 training examples"):
        snapshot.load(kept_run.output_dir).train_arrays(100)
