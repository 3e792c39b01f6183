"""End-to-end runs on tiny synthetic data: every output file, rerun, resume, divergence."""
import csv
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny(tmp_path, name="run", **overrides):
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=64,
                  synthetic_test=40, batch_size=8, base_lr=2.0 ** -6, epochs=3, median_of=2,
                  eval_batch_size=16, output_dir=str(tmp_path / name), deterministic=True,
                  augment=True)
    values.update(overrides)
    return Config(**values).resolve()


def test_run_writes_every_record(tmp_path):
    cfg = tiny(tmp_path)
    result = train(cfg)
    out = pathlib.Path(cfg.output_dir)

    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert Config.from_dict({k: v for k, v in stored.items()
                             if k not in ("derived", "versions")}) == cfg
    assert stored["derived"]["steps_per_epoch"] == 8
    assert stored["derived"]["learning_rate"] == pytest.approx(8 * 2.0 ** -6)

    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    assert list(rows[0]) == list(results.HISTORY_COLUMNS)
    # Default schedule: decay at 50% (step 12) and 75% (step 18) of 24 iterations.
    assert [float(r["base_lr"]) for r in rows] == pytest.approx(
        [2.0 ** -6, 2.0 ** -6 / 10, 2.0 ** -6 / 100])  # each epoch's last update: 7, 15, 23
    assert float(rows[0]["learning_rate"]) == pytest.approx(8 * 2.0 ** -6)

    on_disk = yaml.safe_load((out / "result.yaml").read_text())
    assert on_disk == result
    assert result["status"] == "completed"
    assert result["epochs_completed"] == 3 and result["steps"] == 24
    test_acc = [float(r["test_accuracy"]) for r in rows]
    assert result["test_accuracy"] == pytest.approx(float(np.median(test_acc[-2:])))
    assert result["examples_per_second"] > 0
    # Test accuracy is measured on the full test set: a multiple of 1/40.
    assert all(abs(a * 40 - round(a * 40)) < 1e-4 for a in test_acc)

    tb = out / "tb"
    assert any((tb / "train").iterdir()) and any((tb / "test").iterdir())
    assert any(p.name.startswith("events") for p in tb.iterdir())  # hparams + final scalar
    assert (out / "checkpoints" / "checkpoint").exists()


def test_learns_on_synthetic_data(tmp_path):
    result = train(tiny(tmp_path, epochs=5, base_lr=2.0 ** -5, augment=False, median_of=1))
    assert result["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_mixed_bfloat16_trains_with_float32_weights(tmp_path):
    result = train(tiny(tmp_path, epochs=2, precision="mixed_bfloat16", median_of=1))
    assert result["status"] == "completed"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards


def test_rerun_returns_the_finished_result(tmp_path):
    cfg = tiny(tmp_path, epochs=2)
    first = train(cfg)
    before = (pathlib.Path(cfg.output_dir) / "history.csv").read_text()
    again = train(cfg)
    assert again == first
    assert (pathlib.Path(cfg.output_dir) / "history.csv").read_text() == before


def test_foreign_output_dir_is_refused(tmp_path):
    train(tiny(tmp_path, epochs=2))
    with pytest.raises(ConfigError, match="holds a different run .*batch_size: 8 -> 16"):
        train(tiny(tmp_path, epochs=2, batch_size=16))


class _Interrupt(Exception):
    pass


class _StopAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise _Interrupt()


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    reference = train(tiny(tmp_path, "reference", epochs=4))
    cfg = tiny(tmp_path, "interrupted", epochs=4)
    with pytest.raises(_Interrupt):
        train(cfg, extra_callbacks=[_StopAfterEpoch(2)])
    status = yaml.safe_load((pathlib.Path(cfg.output_dir) / "result.yaml").read_text())
    assert status["status"] == "failed"  # never reported as completed
    resumed = train(cfg)

    def table(name):
        rows = results.read_csv(tmp_path / name / "history.csv")
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]

    assert table("interrupted") == table("reference")  # bit-identical with --deterministic
    for key in ("status", "test_accuracy", "steps", "final_train_loss"):
        assert resumed[key] == reference[key]


def test_divergence_stops_early_at_chance(tmp_path):
    cfg = tiny(tmp_path, norm="none", base_lr=2.0 ** 4, epochs=6, augment=False)
    result = train(cfg)
    assert result["status"] == "diverged"
    assert result["test_accuracy"] == pytest.approx(0.1)
    assert result["epochs_completed"] < 6
    assert 1 <= result["diverged_at_step"] <= result["epochs_completed"] * 8


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "sbt_keras.run", "--dataset=synthetic", "--model=resnet8",
         "--image_size=8", "--synthetic_train=32", "--synthetic_test=16", "--batch_size=8",
         "--log2_base_lr=-6", "--epochs=2", "--median_of=1", f"--output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "result.yaml").read_text())["status"] == "completed"
    assert "epoch 2/2" in proc.stderr


def test_records_and_checkpoints_on_a_url_filesystem(tmp_path):
    # TF's in-memory ram:// filesystem stands in for gs://: every record, checkpoint and
    # TensorBoard file goes through tf.io.gfile, and an interrupted run resumes from it.
    url = f"ram://sbt{abs(hash(str(tmp_path)))}/run"
    reference = train(tiny(tmp_path, "local", epochs=4))
    cfg = tiny(tmp_path, epochs=4, output_dir=url)
    with pytest.raises(_Interrupt):
        train(cfg, extra_callbacks=[_StopAfterEpoch(2)])
    assert results.read_yaml(f"{url}/result.yaml")["status"] == "failed"
    resumed = train(cfg)
    assert resumed["status"] == "completed"
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert [r["epoch"] for r in results.read_csv(f"{url}/history.csv")] == [1, 2, 3, 4]
    assert results.exists(f"{url}/checkpoints/checkpoint")
    assert not pathlib.Path("ram:").exists()  # nothing was written to a local "ram:" dir
    assert train(cfg) == resumed  # finished: read back from the URL, not retrained
