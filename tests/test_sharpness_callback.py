"""--sharpness=final / --sharpness_every (sbt_keras/training/sharpness_callback.py): the
records it writes, that measuring changes nothing in training, and resuming a measurement
that was interrupted."""
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import callbacks, sharpness_callback, snapshot
from tools import sharpness as tool

TRAINING_COLUMNS = [c for c in results.HISTORY_COLUMNS if c != "wall_seconds"]


def tiny(tmp_path, name, **overrides):
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                  synthetic_test=16, batch_size=8, base_lr=2.0 ** -5, epochs=2, median_of=1,
                  eval_batch_size=8, deterministic=True, augment=True,
                  keep_checkpoint_every_epochs=1, output_dir=str(tmp_path / name))
    values.update(overrides)
    return Config(**values).resolve()


MEASURED = dict(sharpness="final", sharpness_every=1, sharpness_p=4, sharpness_sample=12,
                sharpness_maxiter=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run without and with a measurement at every epoch end."""
    tmp = tmp_path_factory.mktemp("measured")
    plain, measured = tiny(tmp, "plain"), tiny(tmp, "measured", **MEASURED)
    return {"plain": (plain, train(plain)), "measured": (measured, train(measured))}


def history(cfg):
    return results.read_csv(pathlib.Path(cfg.output_dir) / results.HISTORY_FILE)


def weights(cfg):
    snap = snapshot.load(cfg.output_dir)
    return [v.numpy() for v in snap.model.variables] + [snap.model.optimizer.iterations.numpy()]


def test_measuring_does_not_change_training(runs):
    (plain, _), (measured, _) = runs["plain"], runs["measured"]
    plain_rows, measured_rows = history(plain), history(measured)
    assert [{c: r[c] for c in TRAINING_COLUMNS} for r in measured_rows] == \
        [{c: r[c] for c in TRAINING_COLUMNS} for r in plain_rows]
    for a, b in zip(weights(plain), weights(measured)):
        np.testing.assert_array_equal(a, b)  # bit for bit, BN moving statistics included
    assert list(plain_rows[0]) == list(results.HISTORY_COLUMNS)  # no columns when off


def test_values_go_to_history_tensorboard_and_result(runs):
    cfg, result = runs["measured"]
    rows = history(cfg)
    assert list(rows[0]) == list(results.HISTORY_COLUMNS) + list(sharpness_callback.COLUMNS)
    assert all(r["sharpness"] > 0 and r["sharpness_seconds"] > 0 for r in rows)
    assert result["sharpness"] == rows[-1]["sharpness"]
    assert results.read_yaml(pathlib.Path(cfg.output_dir) / "result.yaml") == result
    scalars = {}
    for path in (pathlib.Path(cfg.output_dir) / "tb" / "train").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "sharpness":
                    scalars[event.step] = float(tf.make_ndarray(value.tensor))
    # TensorBoard logs each epoch's scalars at its global step (the history's `step`).
    assert scalars == {rows[0]["step"]: pytest.approx(rows[0]["sharpness"], rel=1e-6),
                       rows[1]["step"]: pytest.approx(rows[1]["sharpness"], rel=1e-6)}
    # The tool, with the same settings, measures the same number from the kept checkpoint.
    _, entry = tool.measure(cfg.output_dir, epoch=1, sample=12, epsilons=(1e-3,), p=4,
                            maxiter=2, seed=0, log=lambda *a: None)
    assert entry["sharpness"][0]["phi"] == pytest.approx(rows[0]["sharpness"], rel=1e-5)


def test_an_interrupted_measurement_is_redone_on_resume(runs, tmp_path, monkeypatch):
    reference, _ = runs["measured"]
    cfg = tiny(tmp_path, "killed", **MEASURED)
    from sbt_keras import sharpness
    real = sharpness.measure_sharpness
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-measurement
        return real(*args, **kwargs)

    monkeypatch.setattr(sharpness, "measure_sharpness", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(sharpness, "measure_sharpness", real)
    # Epoch 2 has neither a row nor an epoch-end checkpoint: nothing half recorded.
    assert [r["epoch"] for r in history(cfg)] == [1]
    assert max(snapshot.available(cfg.output_dir)) == 4  # 4 steps per epoch

    result = train(cfg)  # resumes: redoes epoch 2 and its measurement
    assert result["status"] == "completed"
    rows, want = history(cfg), history(reference)
    for column in TRAINING_COLUMNS:
        assert [r[column] for r in rows] == [r[column] for r in want]
    assert [r["sharpness"] for r in rows] == pytest.approx([r["sharpness"] for r in want],
                                                           rel=1e-6)
    for a, b in zip(weights(cfg), weights(reference)):
        np.testing.assert_array_equal(a, b)


def test_the_callback_restores_the_weights_bit_for_bit():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    network = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 6)
    before = [w.copy() for w in network.get_weights()]
    callback = sharpness_callback.SharpnessCallback(
        network, images, labels, due=lambda epoch: epoch == 2, epsilon=1e-2, p=0, maxiter=3,
        divergence=callbacks.DivergenceStop())
    logs = {}
    callback.on_epoch_end(0, logs)  # epoch 1: not due
    assert logs == {}
    callback.on_epoch_end(1, logs)
    assert logs["sharpness"] > 0
    for w, w0 in zip(network.get_weights(), before):
        np.testing.assert_array_equal(w, w0)


def test_which_epochs_are_measured_and_bad_settings(tmp_path):
    every = tiny(tmp_path, "a", epochs=5, sharpness_every=2)
    final = tiny(tmp_path, "b", epochs=5, sharpness="final")
    both = tiny(tmp_path, "c", epochs=5, sharpness="final", sharpness_every=2)
    assert [e for e in range(1, 6) if sharpness_callback.measured(every, e)] == [2, 4]
    assert [e for e in range(1, 6) if sharpness_callback.measured(final, e)] == [5]
    assert [e for e in range(1, 6) if sharpness_callback.measured(both, e)] == [2, 4, 5]
    for flag, value, message in [
            ("sharpness_every", -1, "--sharpness_every=-1 must be >= 0"),
            ("sharpness_epsilons", (1e-3, 0.0), "--sharpness_epsilons=0.001,0.0 must be "
                                                "positive box sizes"),
            ("sharpness_p", -2, "--sharpness_p=-2 must be >= 0"),
            ("sharpness_sample", -1, "--sharpness_sample=-1 must be >= 0"),
            ("sharpness_maxiter", 0, "--sharpness_maxiter=0 must be >= 1"),
            ("sharpness", "often", "--sharpness=often is unknown; choose one of none, final")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            tiny(tmp_path, "bad", **{flag: value})
    with pytest.raises(ConfigError, match=r"--sharpness_p=10000000 is larger than the "
                                          r"network's \d+ trainable parameters"):
        train(tiny(tmp_path, "huge_p", sharpness="final", sharpness_p=10_000_000))
