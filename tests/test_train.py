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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny 3-epoch run, shared by the checks of what it writes: (config, the result
    train returned, its output directory, the rows of its history.csv)."""
    cfg = tiny(tmp_path_factory.mktemp("records"))
    result = train(cfg)
    out = pathlib.Path(cfg.output_dir)
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return cfg, result, out, rows


def test_config_yaml_round_trips_with_the_derived_values(finished_run):
    cfg, _, out, _ = finished_run
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert Config.from_dict({k: v for k, v in stored.items()
                             if k not in ("derived", "versions")}) == cfg
    assert stored["derived"]["steps_per_epoch"] == 8
    assert stored["derived"]["learning_rate"] == pytest.approx(8 * 2.0 ** -6)


def test_history_has_a_row_per_epoch_with_the_decayed_rates(finished_run):
    _, _, _, rows = finished_run
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    assert list(rows[0]) == list(results.HISTORY_COLUMNS)
    # Default schedule: decay at 50% (step 12) and 75% (step 18) of 24 iterations.
    assert [float(r["base_lr"]) for r in rows] == pytest.approx(
        [2.0 ** -6, 2.0 ** -6 / 10, 2.0 ** -6 / 100])  # each epoch's last update: 7, 15, 23
    assert float(rows[0]["learning_rate"]) == pytest.approx(8 * 2.0 ** -6)


def test_result_yaml_is_the_returned_result_with_the_median_accuracy(finished_run):
    _, result, out, rows = finished_run
    on_disk = yaml.safe_load((out / "result.yaml").read_text())
    assert on_disk == result
    assert result["status"] == "completed"
    assert result["epochs_completed"] == 3 and result["steps"] == 24
    test_acc = [float(r["test_accuracy"]) for r in rows]
    assert result["test_accuracy"] == pytest.approx(float(np.median(test_acc[-2:])))
    assert result["examples_per_second"] > 0


def test_test_accuracy_counts_the_whole_test_set(finished_run):
    _, _, _, rows = finished_run
    # Test accuracy is measured on the full test set: a multiple of 1/40.
    test_acc = [float(r["test_accuracy"]) for r in rows]
    assert all(abs(a * 40 - round(a * 40)) < 1e-4 for a in test_acc)


def test_tensorboard_scalars_match_the_history(finished_run):
    _, _, out, rows = finished_run
    tb = out / "tb"
    train_scalars, test_scalars = _scalars(tb / "train"), _scalars(tb / "test")
    assert {"loss", "accuracy", "learning_rate", "base_lr"} <= set(train_scalars)
    assert {"loss", "accuracy"} <= set(test_scalars)
    for column, scalars, tag in (("train_loss", train_scalars, "loss"),
                                 ("test_accuracy", test_scalars, "accuracy")):
        # One per epoch, at the global step: the x-axis counts SGD updates.
        assert [step for step, _ in scalars[tag]] == [8, 16, 24]
        assert [value for _, value in scalars[tag]] == pytest.approx(
            [float(r[column]) for r in rows])
    # The learning rate also on both sides of each decay (steps 12 and 18 of 24), so the
    # drops are steps in TensorBoard, not ramps between epoch ends.
    rate = 8 * 2.0 ** -6
    steps, rates = zip(*sorted(train_scalars["learning_rate"]))
    assert steps == (8, 12, 13, 16, 18, 19, 24)
    assert rates == pytest.approx([rate, rate, rate / 10, rate / 10, rate / 10, rate / 100,
                                   rate / 100])


def test_tensorboard_hparams_metric_is_the_result(finished_run):
    _, result, out, _ = finished_run
    root = _scalars(out / "tb")  # the HParams dashboard's metric, at the last epoch
    assert [step for step, _ in root["median_test_accuracy"]] == [3]
    assert root["median_test_accuracy"][0][1] == pytest.approx(result["test_accuracy"])


def test_a_checkpoint_is_written(finished_run):
    _, _, out, _ = finished_run
    assert (out / "checkpoints" / "checkpoint").exists()


def _scalars(directory):
    """{tag: [(step, value), ...]} of the scalar summaries in a TensorBoard directory."""
    import tensorflow as tf
    out = {}
    for path in sorted(directory.glob("events*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name in ("scalars", ""):
                    number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                        else value.simple_value
                    out.setdefault(value.tag, []).append((event.step, number))
    return out


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


def _tree(directory):
    return {p: p.read_bytes() for p in sorted(pathlib.Path(directory).rglob("*"))
            if p.is_file()}


def test_foreign_output_dir_is_refused_and_left_untouched(tmp_path):
    cfg = tiny(tmp_path, epochs=2)
    train(cfg)
    before = _tree(cfg.output_dir)
    with pytest.raises(ConfigError, match="holds a different run .*batch_size: 8 -> 16"):
        train(tiny(tmp_path, epochs=2, batch_size=16))
    # Same settings, other data (e.g. a CIFAR subset where the full set was): refused too.
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    stored["derived"]["num_train"] = 50000
    results.write_yaml(str(tmp_path / "run" / "config.yaml"), stored)
    with pytest.raises(ConfigError, match="num_train: 50000 -> 64"):
        train(cfg)
    results.write_yaml(str(tmp_path / "run" / "config.yaml"),
                       yaml.safe_load(before[tmp_path / "run" / "config.yaml"]))
    assert _tree(cfg.output_dir) == before


def test_sweep_directory_is_refused_for_a_single_run(tmp_path):
    sweep_dir = tmp_path / "run"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text("base: {}\n")
    with pytest.raises(ConfigError, match="holds a sweep, not a single run"):
        train(tiny(tmp_path))
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["sweep.yaml"]


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
    # ... and so are the final weights, optimizer state and BN moving statistics.
    final = {name: _checkpoint_tensors(tmp_path / name) for name in ("reference",
                                                                      "interrupted")}
    assert final["reference"].keys() == final["interrupted"].keys()
    for key, value in final["reference"].items():
        np.testing.assert_array_equal(final["interrupted"][key], value, err_msg=key)


def _checkpoint_tensors(output_dir):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(output_dir / "checkpoints"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if "save_counter" not in key and key != "_CHECKPOINTABLE_OBJECT_GRAPH"}


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


def test_a_directory_from_before_a_setting_existed_is_compared_with_its_legacy_value(
        tmp_path):
    cfg = tiny(tmp_path, norm="none", epochs=1, median_of=1)
    train(cfg)
    path = pathlib.Path(cfg.output_dir) / "config.yaml"
    stored = yaml.safe_load(path.read_text())
    for added in ("gn_groups", "mix_norms", "keep_checkpoint_every_epochs"):
        del stored[added]  # as written before these settings existed
    path.write_text(yaml.safe_dump(stored))
    assert train(cfg)["status"] == "completed"  # the same run: no refusal
    del stored["bn_moving_variance"]  # older runs used the biased estimate ...
    path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match="bn_moving_variance: 'biased' -> 'unbiased'"):
        train(cfg)  # ... which this run's config does not
    stored["bn_moving_variance"] = "unbiased"
    stored["derived"].pop("model_revision")  # a ResNet trained before the alignment fix
    path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match=r"resnet8 revision 1 -> 2 \(docs/changes.md\)"):
        train(cfg)
