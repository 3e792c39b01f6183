"""The benchmark tool: its FLOP count against hand counts and published numbers, and a 2-step
smoke run whose derived columns are checked against hand-computed values."""
import keras
import numpy as np
import pytest

from tools import bench


def _tiny(shape=(8, 8, 3)):
    """Two convs, BN, ReLU, pooling and a dense layer; the counts below are by hand."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8x8x4
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 3, strides=2)(x)  # valid: (8 - 3) // 2 + 1 = 3 -> 3x3x6
    x = keras.layers.GlobalAveragePooling2D()(x)  # 6
    return keras.Model(inputs, keras.layers.Dense(10)(x))


# Forward multiply-adds: output positions x kernel taps x input channels x output channels.
_MACS = (8 * 8) * (3 * 3) * 3 * 4 + (3 * 3) * (3 * 3) * 4 * 6 + 6 * 10  # 6912 + 1944 + 60
# Training = forward + 2x for the backward pass, 2 FLOPs per multiply-add.
_TRAINING_FLOPS = 3 * 2 * _MACS
# Variables: conv 108 + 4, BN 4 x 4 (with moving statistics), conv 216 + 6, dense 60 + 10.
_VARIABLES = 108 + 4 + 16 + 216 + 6 + 70
# Outputs per example: conv, BN and ReLU 8*8*4 each, conv 3*3*6, pool 6, dense 10.
_ACTIVATIONS = 3 * 256 + 54 + 6 + 10


def test_flop_count_of_a_tiny_net_by_hand():
    assert _MACS == 8916 and _TRAINING_FLOPS == 53_496
    assert bench.training_flops_per_example(_tiny()) == _TRAINING_FLOPS


@pytest.mark.parametrize("name,published_macs", [("resnet20", 40.8e6), ("resnet32", 69.1e6)])
def test_flop_count_matches_published_forward_cost(name, published_macs):
    from sbt_keras import models

    net = models.build(name, input_shape=(32, 32, 3), num_classes=10, norm="batch")
    macs = bench.training_flops_per_example(net) / 6  # training = 3 x forward, 2 FLOPs/MAC
    assert macs == pytest.approx(published_macs, rel=0.02)


PEAK = 2e9  # FLOP/s, standing in for the measured matmul peak


@pytest.fixture(scope="module")
def smoke():
    """bench.run over the tiny net at m = 2 and 4, 2 steps, against a fixed peak."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "_network", lambda *args: _tiny())
        patch.setattr(bench, "matmul_peak_flops", lambda: PEAK)
        return bench.run(["resnet8"], ["batch"], [2, 4], steps=2, repeats=1,
                         baselines=("fit",), input_pipeline=True, shape=(8, 8, 3),
                         progress=True)


def test_smoke_rows_have_every_measurement(smoke):
    rows, _ = smoke
    assert [(r["model"], r["norm"], r["m"]) for r in rows] == [("resnet8", "batch", 2),
                                                               ("resnet8", "batch", 4)]
    for row in rows:
        for key in ("sbt_ms", "fit_ms", "sbt_fed_ms", "speedup_vs_fit", "limit_fraction",
                    "fit_limit_fraction", "sbt_examples_per_s", "pipeline_examples_per_s",
                    "pipeline_vs_step", "host_rss_mb", "activation_mb", "progress_ms",
                    "bar_ms"):
            assert row[key] > 0, key
        assert "progress_overhead" in row and "bar_overhead" in row


@pytest.mark.parametrize("index, m", [(0, 2), (1, 4)])
def test_smoke_limit_columns_are_the_hand_counted_ideal_time(smoke, index, m):
    row = smoke[0][index]
    ideal_s = _TRAINING_FLOPS * m / PEAK  # 53496 FLOPs/example at 2 GFLOP/s
    assert row["limit_fraction"] * row["sbt_ms"] / 1e3 == pytest.approx(ideal_s)
    assert row["fit_limit_fraction"] * row["fit_ms"] / 1e3 == pytest.approx(ideal_s)
    assert row["overhead_us"] == pytest.approx(row["sbt_ms"] * 1e3 - ideal_s * 1e6)


@pytest.mark.parametrize("index, m", [(0, 2), (1, 4)])
def test_smoke_step_memory_is_the_hand_counted_floor(smoke, index, m):
    # Variables and their gradients in float32, and every layer output of the m examples.
    floor = 2 * 4 * _VARIABLES + 4 * _ACTIVATIONS * m
    assert _VARIABLES == 420 and _ACTIVATIONS == 838
    assert smoke[0][index]["activation_mb"] == pytest.approx(floor / 2 ** 20)


def test_smoke_markdown(smoke):
    rows, device = smoke
    assert set(device["progress_hook_us"]) == {"lines", "bar"}
    assert all(us > 0 for us in device["progress_hook_us"].values())
    assert device["matmul_peak_gflops"] == pytest.approx(2.0)
    text = bench.markdown(rows, device)
    assert "| resnet8 | batch | 2 |" in text and "| resnet8 | batch | 4 |" in text
    assert "peak 2 GFLOP/s" in text and "unrolled_steps=1" in text


def test_bad_unrolled_steps_is_refused_before_measuring():
    import pathlib
    import subprocess
    import sys
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--unrolled_steps=0"],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unrolled_steps" in proc.stderr and "not a positive integer" in proc.stderr, proc.stderr[-500:]


def test_the_step_measuring_gradient_noise_is_timed_where_the_halves_keep_bn_groups():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "_network", lambda *args: _tiny())
        patch.setattr(bench, "matmul_peak_flops", lambda: PEAK)
        rows, _ = bench.run(["resnet8"], ["batch"], [4], bn_batch_size=2, steps=2,
                            repeats=1, baselines=(), input_pipeline=False, shape=(8, 8, 3),
                            gns=2)
    assert rows[0]["gns_ms"] > 0
    assert bench._splits("batch", 4, 2) and not bench._splits("batch", 4, 0)
    assert bench._splits("layer", 4, 0) and not bench._splits("none", 3, 0)


def test_the_sharpness_cost_is_timed_outside_training():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "_network", lambda *args: _tiny())
        rows = bench.sharpness_costs(["resnet8"], 16, shape=(8, 8, 3), repeats=1)
    (row,) = rows
    assert row["params"] == sum(int(np.prod(v.shape)) for v in _tiny().trainable_variables)
    assert row["eval_s"] > 0 and row["search_bound_s"] == row["eval_s"] * 51  # 5 x 10 + 1
    assert "| resnet8 |" in bench.sharpness_markdown(rows)
