"""The up-front memory check and the out-of-memory report."""
import pathlib
import re

import keras
import pytest
import tensorflow as tf

from sbt_keras import memory, models, results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError, OutOfMemory
from sbt_keras.train import train


def _tiny():
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)  # 4*4*2 = 32 outputs
    x = keras.layers.ReLU()(x)  # 32
    x = keras.layers.GlobalAveragePooling2D()(x)  # 2
    return keras.Model(inputs, keras.layers.Dense(3)(x))  # 3


def test_estimate_counts_every_layer_output_and_the_variables():
    net = _tiny()
    assert memory.activation_elements_per_example(net) == 32 + 32 + 2 + 3
    variables = (3 * 3 * 3 * 2 + 2) + (2 * 3 + 3)  # conv kernel + bias, dense
    assert memory.training_bytes(net, examples=10) == 2 * 4 * variables + 69 * 10 * 4
    assert memory.training_bytes(net, examples=10, compute_bytes=2) == (
        2 * 4 * variables + 69 * 10 * 2)


def test_resnet50_at_224_per_example_is_what_a_hand_count_gives():
    # Hand count of ResNet-50 v1's layer outputs at 224x224 with BN: the stem's padded input
    # (230*230*3), stem conv, BN, ReLU (3 x 112*112*64) and the max-pool (56*56*64); per bottleneck block at output side s and
    # width w: conv1, bn1, relu1, conv2, bn2, relu2 on w channels (v1 strides in conv1, so
    # all at s), conv3, bn3, add, relu on 4w; the first block of a stage adds a projection
    # conv + BN on 4w; then the pool (2048) and the logits (1000).
    net = models.build("resnet50", norm="batch")
    elements = memory.activation_elements_per_example(net)
    total = 230 * 230 * 3 + 3 * 112 * 112 * 64 + 56 * 56 * 64
    for blocks, side, width in ((3, 56, 64), (4, 28, 128), (6, 14, 256), (3, 7, 512)):
        inner = 6 * side * side * width  # conv1, bn1, relu1, conv2, bn2, relu2
        outer = 4 * side * side * 4 * width  # conv3, bn3, add, relu
        total += blocks * (inner + outer) + 2 * side * side * 4 * width
    total += 2048 + 1000  # pool, logits
    assert elements == total


def test_check_fits_refuses_in_one_line_and_allows_what_fits():
    net = _tiny()
    need = memory.training_bytes(net, examples=64)
    memory.check_fits(net, batch_size=64, examples=64, compute_bytes=4, available=need)
    memory.check_fits(net, batch_size=64, examples=64, compute_bytes=4, available=None)
    with pytest.raises(ConfigError, match=r"^--batch_size=64 needs at least .* GiB for one "
                                          r"training step .* lower --batch_size") as err:
        memory.check_fits(net, batch_size=64, examples=64, compute_bytes=4,
                          available=need - 1)
    assert "\n" not in str(err.value)


def test_host_available_bytes_is_the_kernels_memavailable(monkeypatch):
    meminfo = pathlib.Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    kib = int(re.search(r"^MemAvailable:\s+(\d+) kB$", meminfo.read_text(), re.M).group(1))
    # Two readings a moment apart: allow what other processes may allocate meanwhile.
    assert abs(memory.host_available_bytes() - kib * 1024) < 256 * 2 ** 20

    def unknown():
        raise OSError("no memory statistics here")

    monkeypatch.setattr(memory.psutil, "virtual_memory", unknown)
    assert memory.host_available_bytes() is None


def _cfg(tmp_path, **kw):
    return Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                  synthetic_test=8, batch_size=8, base_lr=2.0 ** -6, epochs=1, median_of=1,
                  eval_batch_size=8, output_dir=str(tmp_path / "run"), **kw).resolve()


@pytest.mark.bad_input("a batch that cannot fit in host memory")
def test_a_batch_that_cannot_fit_stops_before_the_first_step(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2 ** 20)  # 1 MiB free
    with pytest.raises(ConfigError, match="--batch_size=8 needs at least"):
        train(_cfg(tmp_path))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert results.read_yaml(tmp_path / "run" / "result.yaml")["status"] == "failed"


class _Exhausted(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")


@pytest.mark.fault("out of memory in a training step")
def test_running_out_of_memory_is_reported_with_what_to_lower(tmp_path):
    with pytest.raises(OutOfMemory, match=r"out of memory at --batch_size=8 \(8 per replica\);"
                                          r" lower --batch_size"):
        train(_cfg(tmp_path), extra_callbacks=[_Exhausted()])
    stored = results.read_yaml(tmp_path / "run" / "result.yaml")
    assert stored["status"] == "failed" and "out of memory" in stored["error"]
