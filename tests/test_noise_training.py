"""The gradient noise scale measured during training: it never changes training, the two
sources agree, and its settings are checked before compute."""
import numpy as np
import pytest

from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import snapshot

RUN = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=16,
           synthetic_test=16, batch_size=8, base_lr=2.0 ** -6, epochs=2, median_of=1,
           eval_batch_size=16, bn_batch_size=4, deterministic=True)


def _run(tmp_path, name, strategy=None, **overrides):
    cfg = Config(**{**RUN, **overrides}, output_dir=str(tmp_path / name)).resolve()
    result = train(cfg, strategy=strategy)
    return cfg, result, results.read_csv(str(tmp_path / name / "history.csv"))


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gns")
    return _run(tmp, "plain"), _run(tmp, "measured", gns_every_steps=2)


def test_measuring_does_not_change_training(with_and_without):
    (plain_cfg, _, plain), (measured_cfg, result, measured) = with_and_without
    keep = [c for c in plain[0] if c != "wall_seconds"]
    assert [{k: r[k] for k in keep} for r in measured] == [
        {k: r[k] for k in keep} for r in plain]  # bit for bit under --deterministic
    a, b = (snapshot.load(c.output_dir) for c in (plain_cfg, measured_cfg))
    for x, y in zip(a.network.weights, b.network.weights):  # moving statistics included
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


def test_the_noise_columns_and_results(with_and_without):
    _, (_, result, measured) = with_and_without
    for row in measured:  # a few measurements can make |G|^2 negative: B_simple is then NaN
        assert np.isfinite(row["gns_grad_sq"]) and np.isfinite(row["gns_trace"])
        assert np.isfinite(row["gns_b_simple"]) == (row["gns_grad_sq"] > 0)
        if row["gns_grad_sq"] > 0:
            assert row["gns_b_simple"] == pytest.approx(row["gns_trace"] / row["gns_grad_sq"])
    finite = [r["gns_b_simple"] for r in measured if np.isfinite(r["gns_b_simple"])]
    assert result.get("gns_b_simple") == (finite[-1] if finite else None)
    if finite:
        assert result["gns_b_simple_mean"] == pytest.approx(np.mean(finite))


@pytest.mark.slow  # ~19 s; the estimators agree in test_gradient_noise
def test_replica_and_split_batch_sources_agree(tmp_path, mirrored):
    # One device splits each batch of 8 into halves of 4; two replicas get the same halves.
    _, _, split = _run(tmp_path, "split", gns_every_steps=2, epochs=1)
    _, _, replicas = _run(tmp_path, "replicas", strategy=mirrored, gns_every_steps=2,
                          epochs=1)
    for column in ("gns_grad_sq", "gns_trace", "gns_b_simple"):
        assert replicas[-1][column] == pytest.approx(split[-1][column], rel=1e-4,
                                                     nan_ok=True), column


@pytest.mark.parametrize("overrides, words", [
    (dict(gns_every_steps=-1), "--gns_every_steps=-1 must be >= 1"),
    (dict(gns_every_steps=2, gns_ema=1.0), "--gns_ema=1.0 must be in (0, 1)"),
    (dict(gns_every_steps=2, gns_ema=0.0), "--gns_ema=0.0 must be in (0, 1)"),
    (dict(gns_every_steps=2, bn_batch_size=8), "a split that breaks a BN group"),
    (dict(gns_every_steps=2, bn_sync=True, bn_batch_size=0), "with --bn_sync it is not"),
    (dict(gns_every_steps=3, steps_per_execution=2), "does not divide --gns_every_steps=3"),
])
def test_bad_noise_settings_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as caught:
        Config(**{**RUN, **overrides}, output_dir="unused").resolve().check_replicas(1)
    assert words in str(caught.value) and "\n" not in str(caught.value)
