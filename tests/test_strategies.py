"""Every strategy computes the same 3 training steps as one device.

The same run (global batch m=8, 3 steps, augmentation on, a test set whose last batch is
padded) under: the default strategy; MirroredStrategy on 2 logical CPUs (in this process)
and on 4 (tests/strategy_probe.py); MultiWorkerMirroredStrategy with 2 worker processes on
localhost (the real command line, TF_CONFIG). With BN, R replicas normalize over m/R
examples each, so the reference is one device with bn_batch_size = m/R. Compared: every
variable in the final checkpoint (weights, BN moving statistics, optimizer step, the
evaluation metrics' totals and counts) and every history value.
"""
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from processes import finish, free_port, start
from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train

RUN = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=24,
           synthetic_test=18, batch_size=8, base_lr=2.0 ** -5, weight_decay=1e-3, epochs=1,
           median_of=1, eval_batch_size=4, augment=True, seed=3)


def _flags(values):
    return [f"--{k}={v}" for k, v in values.items()]


def _checkpoint(out):
    reader = tf.train.load_checkpoint(str(pathlib.Path(out) / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name and "save_counter" not in name}


def _history(out):
    return [{k: v for k, v in row.items() if k != "wall_seconds"}
            for row in results.read_csv(pathlib.Path(out) / results.HISTORY_FILE)]


def _assert_same(out, reference):
    got, want = _checkpoint(out), _checkpoint(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
    for a, b in zip(_history(out), _history(reference), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), key


def _mwms_workers(out, values):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    return [start(["-m", "sbt_keras.run", *_flags(values), f"--output_dir={out}",
                   "--strategy=multi_worker"],
                  TF_CONFIG=json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": i}}))
            for i in range(2)]


# Without a norm: slow (~22 s); with BN it is the stricter check (the group size shows).
@pytest.mark.parametrize("norm", [pytest.param("none", marks=pytest.mark.slow), "batch"])
def test_every_strategy_matches_one_device(norm, tmp_path, mirrored):
    values = dict(RUN, norm=norm)
    # The other processes start first and run while this one computes the references.
    probe4 = start(["tests/strategy_probe.py", "4", *_flags(values),
                    f"--output_dir={tmp_path / 'mirrored4'}"])
    workers = _mwms_workers(tmp_path / "multi_worker", values)

    def reference(name, bn):
        extra = {"bn_batch_size": bn} if norm == "batch" else {}
        cfg = Config(**values, **extra, output_dir=str(tmp_path / name)).resolve()
        train(cfg)
        return cfg.output_dir

    ref2, ref4 = reference("one_device_bn4", 4), reference("one_device_bn2", 2)
    train(Config(**values, output_dir=str(tmp_path / "mirrored2")).resolve(),
          strategy=mirrored)
    finish(probe4)
    for w in workers:
        finish(w)

    _assert_same(tmp_path / "mirrored2", ref2)
    _assert_same(tmp_path / "mirrored4", ref4)
    _assert_same(tmp_path / "multi_worker", ref2)
    # Only the chief keeps records; the other worker's scratch copy is gone.
    assert not list((tmp_path / "multi_worker").glob("workertemp_*"))
    # The test can fail: it trained, and the BN group size shows in the weights.
    assert results.read_yaml(tmp_path / "multi_worker" / "result.yaml")["steps"] == 3
    if norm == "batch":
        with pytest.raises(AssertionError):
            _assert_same(ref4, ref2)
    # Each of the 18 test examples counted once, none of the 2 padding copies.
    accuracy = _history(ref2)[0]["test_accuracy"]
    assert abs(accuracy * 18 - round(accuracy * 18)) < 1e-5


def test_bad_tf_config_is_one_clear_error(monkeypatch):
    cfg = Config(**RUN, strategy="multi_worker")
    for text, message in [
        (None, "needs the TF_CONFIG"),
        ("{not json", "not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
         "host:port"),
        ('{"cluster": {"worker": ["h:abc"]}, "task": {"type": "worker", "index": 0}}',
         "host:port"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}}', 'no "task"'),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
         "index 2 is outside"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}',
         "task type 'ps'"),
    ]:
        if text is None:
            monkeypatch.delenv("TF_CONFIG", raising=False)
        else:
            monkeypatch.setenv("TF_CONFIG", text)
        with pytest.raises(ConfigError, match=message):
            cfg.resolve()


def test_tpu_flags_are_checked_up_front():
    with pytest.raises(ConfigError, match="--strategy=tpu needs --tpu"):
        Config(**RUN, strategy="tpu").resolve()
    with pytest.raises(ConfigError, match="only applies to --strategy=tpu"):
        Config(**RUN, tpu="local").resolve()
    # A malformed address is refused at once (the TPU resolver would hang on it).
    for tpu in ("grpc://bad address:8470", "grpc://10.0.0.2", "my tpu", "-x"):
        with pytest.raises(ConfigError, match="is not `local`, a TPU name"):
            Config(**RUN, strategy="tpu", tpu=tpu).resolve()
    for tpu in ("local", "my-tpu_v3.8", "grpc://10.0.0.2:8470", "grpc://host-1.internal:8470"):
        Config(**RUN, strategy="tpu", tpu=tpu).resolve()


def test_replica_count_is_checked_before_any_record(tmp_path, mirrored):
    # m = 5 on 2 replicas: refused before the model is built or anything is written.
    cfg = Config(**{**RUN, "batch_size": 5, "synthetic_train": 25},
                 output_dir=str(tmp_path / "odd")).resolve()
    with pytest.raises(ConfigError, match="--batch_size=5 is not divisible by the 2 replicas"):
        train(cfg, strategy=mirrored)
    assert not (tmp_path / "odd").exists()


def test_resume_with_another_replica_count_keeps_bn_or_is_refused(tmp_path, mirrored):
    # Trained on 2 replicas with --bn_batch_size=0 (BN over the per-replica 4 examples):
    # resuming on one device would silently switch BN to all 8.
    cfg = Config(**{**RUN, "norm": "batch", "epochs": 2},
                 output_dir=str(tmp_path / "run")).resolve()

    class _StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt()

    with pytest.raises(KeyboardInterrupt):
        train(cfg, strategy=mirrored, extra_callbacks=[_StopAfterFirstEpoch()])
    with pytest.raises(ConfigError, match="trained with BN over 4 examples on 2 replicas; "
                                          "on 1 it would be 8: resume with 2 replicas"):
        train(cfg, strategy=tf.distribute.get_strategy())
    resumed = train(cfg, strategy=mirrored)
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 2


def test_unreachable_tpu_is_a_config_error(tmp_path):
    # No TPU on this machine: `local` finds none, a made-up name does not resolve. Both are
    # reported before a model is built, as one line from the command line.
    for tpu in ("local", "no-such-tpu-sbt"):
        proc = start(["-m", "sbt_keras.run", *_flags(RUN), "--strategy=tpu", f"--tpu={tpu}",
                      f"--output_dir={tmp_path / tpu}"])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and f"--tpu={tpu}: no TPU could be reached" in lines[0], err
        assert not (tmp_path / tpu / "checkpoints").exists()


def test_synchronized_bn_over_replicas_matches_whole_batch_bn(tmp_path, mirrored):
    # --bn_sync on 2 replicas: statistics over all m = 8 examples, as BN over the whole
    # batch on one device; the test above shows per-replica BN (over 4) differs from that.
    values = dict(RUN, norm="batch")
    one = Config(**values, output_dir=str(tmp_path / "one_device_bn8")).resolve()
    train(one)
    synced = Config(**values, bn_sync=True, output_dir=str(tmp_path / "sync")).resolve()
    train(synced, strategy=mirrored)
    _assert_same(tmp_path / "sync", tmp_path / "one_device_bn8")
    stored = results.read_yaml(tmp_path / "sync" / "config.yaml")["derived"]
    assert stored["bn_batch_size"] == 8 and stored["per_replica_batch_size"] == 4


def test_bn_sync_needs_whole_batch_bn():
    with pytest.raises(ConfigError, match="--bn_sync normalizes over the whole batch"):
        Config(**RUN, norm="batch", bn_sync=True, bn_batch_size=4).resolve()
    with pytest.raises(ConfigError, match="--bn_sync"):
        Config(**RUN, norm="none", bn_sync=True).resolve()
