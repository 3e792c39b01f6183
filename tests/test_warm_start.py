"""--init_from=RUN_DIR[:EPOCH] (sbt_keras/training/warm_start.py)."""
import pathlib
import shutil

import numpy as np
import pytest

from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import snapshot, warm_start


def tiny(output_dir, **overrides):
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                  synthetic_test=16, batch_size=8, base_lr=2.0 ** -5, epochs=2, median_of=1,
                  eval_batch_size=8, keep_checkpoint_every_epochs=1, deterministic=True,
                  output_dir=str(output_dir))
    values.update(overrides)
    return Config(**values).resolve()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("warm") / "source")
    train(cfg)
    return cfg.output_dir


def network_values(run_dir, epoch):
    return [v.numpy() for v in snapshot.load(run_dir, epoch).network.weights]


def test_a_warm_started_run_starts_from_the_sources_epoch(source, tmp_path):
    cfg = tiny(tmp_path / "warm", init_from=f"{source}:1", batch_size=16, epochs=1)
    result = train(cfg)
    assert result["status"] == "completed"
    start = snapshot.load(cfg.output_dir, epoch=0)
    assert start.model.optimizer.iterations.numpy() == 0  # a fresh optimizer
    # Every network variable, BN moving statistics included, bit for bit.
    for mine, theirs in zip(network_values(cfg.output_dir, 0), network_values(source, 1)):
        np.testing.assert_array_equal(mine, theirs)
    assert any(not np.array_equal(a, b) for a, b in zip(network_values(source, 0),
                                                        network_values(source, 1)))
    row, = results.read_csv(pathlib.Path(cfg.output_dir) / "history.csv")
    assert row["step"] == 2  # its own step count, from 0 (32 examples / m = 16)


def test_only_a_fresh_start_is_warm_started(source):
    snap = snapshot.load(source, epoch=0)
    before = [v.numpy() for v in snap.network.weights]
    cfg = dataclass_with(snap.cfg, init_from=f"{source}:2")
    assert warm_start.apply(cfg, snap.network, start_step=4) is None  # resuming: untouched
    for a, v in zip(before, snap.network.weights):
        np.testing.assert_array_equal(a, v.numpy())
    assert warm_start.apply(cfg, snap.network, start_step=0).step == 8
    for mine, theirs in zip(snap.network.weights, network_values(source, 2)):
        np.testing.assert_array_equal(mine.numpy(), theirs)


def dataclass_with(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_parse():
    assert warm_start.parse("runs/a:3") == ("runs/a", 3)
    assert warm_start.parse("runs/a") == ("runs/a", None)
    assert warm_start.parse("gs://bucket/run") == ("gs://bucket/run", None)
    assert warm_start.parse("gs://bucket/run:12") == ("gs://bucket/run", 12)


def test_another_network_or_a_missing_checkpoint_is_refused(source, tmp_path):
    for overrides, message in [
            (dict(model="resnet20"), "is another network: source model 'resnet8' here "
                                     "'resnet20'"),
            (dict(norm="none"), "source norm 'batch' here 'none'"),
            (dict(image_size=16), r"source image shape \[8, 8, 3\] here \[16, 16, 3\]"),
            (dict(num_classes=5), "source 10 classes here 5"),
            (dict(init_from=f"{source}:5"), r"has no checkpoint at the end of epoch 5 \(kept: "
                                            r"epoch 0, epoch 1, epoch 2\)"),
            (dict(init_from=str(tmp_path)), "holds no config.yaml")]:
        values = dict(init_from=source, output_dir=tmp_path / "new")
        values.update(overrides)
        with pytest.raises(ConfigError, match=message):
            tiny(**values)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(pathlib.Path(source) / "config.yaml", untrained / "config.yaml")
    with pytest.raises(ConfigError, match="holds no checkpoint to start from"):
        tiny(tmp_path / "new", init_from=str(untrained))
