"""tools/interpolate.py and sbt_keras/bn_statistics.py against numpy."""
import pathlib

import keras
import numpy as np
import pytest

from sbt_keras import bn_statistics, results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.layers import BatchRenormalization, SubBatchNormalization
from sbt_keras.train import train
from sbt_keras.training import snapshot
from tools import interpolate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def numpy_loss_and_accuracy(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return (float(-log_probs[np.arange(len(labels)), labels].mean()),
            float(np.mean(np.argmax(logits, axis=1) == labels)))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """m = 4 and m = 16 on the same data, no normalization (nothing to recompute)."""
    tmp = tmp_path_factory.mktemp("interp")
    dirs = []
    for m in (4, 16):
        cfg = Config(model="resnet8", norm="none", dataset="synthetic", image_size=8,
                     synthetic_train=32, synthetic_test=16, batch_size=m, base_lr=2.0 ** -6,
                     epochs=1, median_of=1, eval_batch_size=8,
                     output_dir=str(tmp / f"m{m}")).resolve()
        train(cfg)
        dirs.append(cfg.output_dir)
    return dirs


def test_endpoints_are_the_two_networks(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "interp"
    rows = interpolate.run(a, b, alphas=[0.0, 0.5, 1.0], sample=20, out=str(out),
                           log=lambda *x: None)
    for alpha, run_dir in ((0.0, a), (1.0, b)):
        snap = snapshot.load(run_dir)
        row, = [r for r in rows if r["alpha"] == alpha]
        train_images, train_labels = snap.train_arrays()
        keep = np.sort(np.random.default_rng(0).choice(32, 20, replace=False))
        loss, accuracy = numpy_loss_and_accuracy(
            snap.network(train_images[keep], training=False).numpy(), train_labels[keep])
        assert row["train_loss"] == pytest.approx(loss, rel=1e-5)
        assert row["train_accuracy"] == pytest.approx(accuracy)
        test_images, test_labels = snap.test_arrays()
        loss, accuracy = numpy_loss_and_accuracy(
            snap.network(test_images, training=False).numpy(), test_labels)
        assert row["test_loss"] == pytest.approx(loss, rel=1e-5)
        assert row["test_accuracy"] == pytest.approx(accuracy)
    on_disk = results.read_csv(out / "interpolation.csv")
    assert [r["alpha"] for r in on_disk] == [0, 0.5, 1]
    assert on_disk[1]["train_loss"] == pytest.approx(rows[1]["train_loss"])
    assert (out / "interpolation.png").read_bytes()[:8] == PNG_MAGIC
    info = results.read_yaml(out / "interpolation.yaml")
    assert (info["batch_size_a"], info["batch_size_b"], info["bn_batches"]) == (4, 16, 0)


def test_weights_are_interpolated_linearly():
    keras.utils.set_random_seed(0)
    network = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                keras.layers.Dense(2)])
    rng = np.random.default_rng(1)
    a = [("w", rng.standard_normal(v.shape)) for v in network.trainable_variables]
    b = [("w", rng.standard_normal(v.shape)) for v in network.trainable_variables]
    x = rng.standard_normal((5, 3)).astype(np.float32)
    for alpha in (-1.0, 0.25, 2.0):
        interpolate.assign(network, interpolate.interpolated(a, b, alpha))
        w = [(1 - alpha) * wa + alpha * wb for (_, wa), (_, wb) in zip(a, b)]
        for variable, want in zip(network.trainable_variables, w):
            np.testing.assert_array_equal(variable.numpy(), want.astype(np.float32))
        hidden = np.tanh(x @ w[0].astype(np.float32) + w[1].astype(np.float32))
        np.testing.assert_allclose(network(x).numpy(), hidden @ w[2].astype(np.float32)
                                   + w[3].astype(np.float32), rtol=1e-5, atol=1e-6)


def test_bn_statistics_are_the_mean_of_per_batch_statistics():
    """BN first, so its input is the images: per batch, per group of 2 examples, the
    channel mean and unbiased variance over (examples, H, W); averaged over groups, then
    over the 3 batches of 4."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 3, 2))
    bn = SubBatchNormalization(bn_batch_size=2, momentum=0.9)
    x = keras.layers.GlobalAveragePooling2D()(bn(inputs))
    network = keras.Model(inputs, keras.layers.Dense(2)(x))
    images = np.random.default_rng(0).normal(1.0, 2.0, (13, 3, 3, 2)).astype(np.float32)
    layers = bn_statistics.bn_layers(network)
    assert layers == [bn] and bn_statistics.batch_size_for(layers, 13, at_most=4) == 4
    trainable = [v.numpy() for v in network.trainable_variables]
    with bn_statistics.Recomputer(network) as recomputer:
        recomputer.recompute(images[::-1].copy(), 4)  # other statistics first: replaced
        assert recomputer.recompute(images, 4) == 3  # the 13th example is not used
    for before, variable in zip(trainable, network.trainable_variables):
        np.testing.assert_array_equal(before, variable.numpy())
    groups = images[:12].astype(np.float64).reshape(3, 2, 2 * 9, 2)  # batch, group, values
    means = groups.mean(axis=2)
    variances = groups.var(axis=2, ddof=1)
    np.testing.assert_allclose(bn.moving_mean.numpy(), means.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variances.mean(axis=(0, 1)),
                               rtol=1e-5)
    assert bn.momentum == 0.9


def test_batch_renorm_is_refused():
    inputs = keras.Input((3, 3, 2))
    network = keras.Model(inputs, BatchRenormalization()(inputs))
    with pytest.raises(ValueError, match="batch renormalization"):
        bn_statistics.bn_layers(network)


def test_different_models_or_data_are_refused(two_runs, tmp_path):
    a, _ = two_runs
    other = tmp_path / "other"
    stored = results.read_yaml(pathlib.Path(a) / "config.yaml")
    results.write_yaml(other / "config.yaml", {**stored, "model": "resnet20"})
    with pytest.raises(ConfigError, match=r"are not the same network on the same data "
                                          r"\(model: 'resnet8' vs 'resnet20'\)"):
        interpolate.check_compatible(a, str(other))
    results.write_yaml(other / "config.yaml", {**stored, "seed": 3})
    with pytest.raises(ConfigError, match=r"seed \(it generates synthetic data\): 0 vs 3"):
        interpolate.check_compatible(a, str(other))


@pytest.mark.parametrize("text, want", [("-1:2:0.5", [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]),
                                        ("-1:2:0.1", None), ("0,0.5,1", [0.0, 0.5, 1.0])])
def test_alphas(text, want):
    alphas = interpolate.parse_alphas(text)
    if want is None:
        assert len(alphas) == 31 and alphas[0] == -1.0 and alphas[-1] == 2.0
        assert alphas[20] == 1.0 and alphas[10] == 0.0
    else:
        assert alphas == want
    for bad in ("1:0:0.1", "0:1:0", "0:1", "a,b"):
        with pytest.raises(ConfigError, match="--alphas="):
            interpolate.parse_alphas(bad)
