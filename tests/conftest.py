"""Test set-up shared by the whole suite.

Two logical CPU devices are configured before TensorFlow initialises its devices, so the
MirroredStrategy tests can run 2 replicas on one CPU. Everything else uses the first device.
"""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def cifar10_subset_dir():
    """The shared real CIFAR-10 subset: $SBT_CIFAR10_DIR or ../shared/data/cifar10-subset."""
    path = os.environ.get("SBT_CIFAR10_DIR") or str(REPO.parent / "shared/data/cifar10-subset")
    return path if os.path.isdir(path) else None


@pytest.fixture
def cifar10_dir():
    path = cifar10_subset_dir()
    if path is None:
        pytest.skip("CIFAR-10 subset not found; set SBT_CIFAR10_DIR")
    return path


_MIRRORED = []


@pytest.fixture
def mirrored():
    """One 2-replica MirroredStrategy for the whole session.

    Several MirroredStrategy objects over the same devices in one process reuse collective
    instance keys and abort each other's all-reduces, so every test shares this one.
    """
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]
