"""The final training-set evaluation (sbt_keras/training/train_eval.py), its columns in a
sweep's results, and tools/gap_table.py."""
import pathlib

import numpy as np
import pytest
import yaml

from sbt_keras import results, sweep
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import snapshot
from tools import gap_table


def tiny(tmp_path, **overrides):
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                  synthetic_test=16, batch_size=8, base_lr=2.0 ** -5, epochs=1, median_of=1,
                  eval_batch_size=8, deterministic=True, augment=True,
                  output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return Config(**values).resolve()


def numpy_accuracy_and_loss(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return (float(np.mean(np.argmax(logits, 1) == labels)),
            float(-log_probs[np.arange(len(labels)), labels].mean()))


def test_result_holds_the_final_networks_training_accuracy_and_the_gap(tmp_path):
    cfg = tiny(tmp_path, train_eval_examples=20)
    result = train(cfg)
    assert yaml.safe_load((pathlib.Path(cfg.output_dir) / "result.yaml").read_text()) == result
    # Independently: the final checkpoint's network on the same 20 un-augmented examples
    # (sorted default_rng(0) draw), inference mode, numpy argmax and cross-entropy.
    snap = snapshot.load(cfg.output_dir)
    images, labels = snap.train_arrays()
    keep = np.sort(np.random.default_rng(0).choice(32, 20, replace=False))
    accuracy, loss = numpy_accuracy_and_loss(
        snap.network(images[keep], training=False).numpy(), labels[keep])
    assert result["train_eval_examples"] == 20
    assert result["train_eval_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["train_eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert result["generalization_gap"] == pytest.approx(
        result["train_eval_accuracy"] - result["final_test_accuracy"], abs=1e-12)


def test_negative_train_eval_examples_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--train_eval_examples=-1 must be >= 0"):
        tiny(tmp_path, train_eval_examples=-1)


def test_sweep_results_carry_the_gap_columns(tmp_path):
    trial = tmp_path / "sweep" / "trials" / "m8_lr-5"
    results.write_yaml(trial / "config.yaml", {"batch_size": 8, "log2_base_lr": -5.0,
                                               "base_lr": 2.0 ** -5, "bn_batch_size": 0,
                                               "epochs": 1, "seed": 0})
    values = dict(status="completed", test_accuracy=0.5, final_test_accuracy=0.5,
                  train_eval_accuracy=0.75, train_eval_loss=0.6, generalization_gap=0.25,
                  sharpness=12.5)
    results.write_yaml(trial / "result.yaml", values)
    row, = sweep.write_results(str(tmp_path / "sweep"))
    on_disk, = results.read_csv(tmp_path / "sweep" / "results.csv")
    for key, value in values.items():
        assert row[key] == value and on_disk[key] == value


ROWS = [  # m=8: two rates (the better one has two seeds); m=64: one rate, one diverged seed
    dict(batch_size=8, log2_base_lr=-5, bn_batch_size=8, epochs=1, status="completed",
         test_accuracy=0.60, final_test_accuracy=0.61, train_eval_accuracy=0.90,
         generalization_gap=0.29, train_eval_loss=0.3),
    dict(batch_size=8, log2_base_lr=-5, bn_batch_size=8, epochs=1, status="completed",
         test_accuracy=0.62, final_test_accuracy=0.63, train_eval_accuracy=0.94,
         generalization_gap=0.31, train_eval_loss=0.1),
    dict(batch_size=8, log2_base_lr=-7, bn_batch_size=8, epochs=1, status="completed",
         test_accuracy=0.50, final_test_accuracy=0.50, train_eval_accuracy=0.70,
         generalization_gap=0.20, train_eval_loss=0.9),
    dict(batch_size=64, log2_base_lr=-5, bn_batch_size=64, epochs=1, status="completed",
         test_accuracy=0.55, final_test_accuracy=0.55, train_eval_accuracy=0.95,
         generalization_gap=0.40, train_eval_loss=0.05),
    dict(batch_size=64, log2_base_lr=-5, bn_batch_size=64, epochs=1, status="diverged",
         test_accuracy=0.1, final_test_accuracy=float("nan")),
    dict(batch_size=64, log2_base_lr=-3, bn_batch_size=64, epochs=1, status="diverged",
         test_accuracy=0.1),
    dict(batch_size=2, status="skipped", reason="not run"),
]


def test_gap_table_shows_each_batch_sizes_best_rate_with_medians_over_seeds():
    lines = gap_table.markdown(ROWS).splitlines()
    assert lines[2:] == [
        "| 8 | -5 | 8 | 1 | 92.0 | 62.0 | 30.0 | 0.2 | 2 |",
        "| 64 | -5 | 64 | 1 | 95.0 | 55.0 | 40.0 | 0.05 | 1 |"]
    every = gap_table.markdown(ROWS, every_point=True).splitlines()[2:]
    assert every[0] == "| 8 | -7 | 8 | 1 | 70.0 | 50.0 | 20.0 | 0.9 | 1 |"
    assert every[-1] == "| 64 | -3 | 64 | 1 | div | div | div | div | 1 |"
    assert len(every) == 4
    # A trial from before these values existed: dashes, not a crash.
    old = [dict(batch_size=4, log2_base_lr=-5, bn_batch_size=4, epochs=1,
                status="completed", test_accuracy=0.5)]
    assert gap_table.markdown(old).splitlines()[2] == "| 4 | -5 | 4 | 1 | — | — | — | — | 1 |"
