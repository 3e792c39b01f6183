"""Fault injection: kill -9, SIGTERM, truncated checkpoints, divergence, killed sweeps.

Each test compares the interrupted-and-resumed outcome with an uninterrupted reference run
(with --deterministic, so histories must be identical to the bit).
"""
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError, Preempted
from sbt_keras.train import train
from sbt_keras.training.callbacks import DivergenceStop

REPO = pathlib.Path(__file__).resolve().parents[1]
# 256 examples / m=8 = 32 steps per epoch, 3 epochs; checkpoints every 5 steps too.
RUN_FLAGS = ["--dataset=synthetic", "--model=resnet8", "--norm=batch", "--image_size=8",
             "--synthetic_train=256", "--synthetic_test=32", "--batch_size=8",
             "--log2_base_lr=-6", "--epochs=3", "--median_of=1", "--augment",
             "--deterministic", "--checkpoint_every_steps=5"]
STEPS_PER_EPOCH = 32


def _start(args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "sbt_keras.run"] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args):
    proc = _start(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def _resumed_at_steps(log):
    """Global steps of the 'Resuming ... at epoch E, step S.' lines in a run's log."""
    return [int(line.rsplit("step ", 1)[1].rstrip(".")) for line in log.splitlines()
            if "Resuming" in line]


def _checkpoint_steps(output_dir):
    directory = pathlib.Path(output_dir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in directory.glob("ckpt-*.index"))


def _wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended before the fault could be injected: "
                        f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting to inject the fault")


def _table(output_dir):
    rows = results.read_csv(pathlib.Path(output_dir) / "history.csv")
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


def _result(output_dir):
    result = yaml.safe_load((pathlib.Path(output_dir) / "result.yaml").read_text())
    return {k: v for k, v in result.items() if k not in ("wall_seconds", "examples_per_second")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(RUN_FLAGS + [f"--output_dir={out}"])
    return out


@pytest.mark.fault("kill -9 mid-epoch, then resume")
def test_kill_9_mid_epoch_then_resume_gives_identical_history(reference, tmp_path):
    out = tmp_path / "killed"
    proc = _start(RUN_FLAGS + [f"--output_dir={out}"])
    # Kill as soon as a mid-epoch checkpoint exists (a step that is not an epoch end).
    _wait_for(lambda: any(s % STEPS_PER_EPOCH for s in _checkpoint_steps(out)
                          if s > STEPS_PER_EPOCH), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert yaml.safe_load((out / "result.yaml").read_text())["status"] == "running"
    log = _run(RUN_FLAGS + [f"--output_dir={out}"])
    resumed, = _resumed_at_steps(log)
    assert resumed > STEPS_PER_EPOCH and resumed % STEPS_PER_EPOCH, log[-2000:]  # mid-epoch
    assert _table(out) == _table(reference)
    assert _result(out) == _result(reference)


@pytest.mark.fault("SIGTERM mid-training")
def test_sigterm_saves_a_checkpoint_and_exits_143(reference, tmp_path):
    out = tmp_path / "preempted"
    proc = _start(RUN_FLAGS + [f"--output_dir={out}"])
    _wait_for(lambda: _checkpoint_steps(out), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "preempted at step" in err and "re-run the same command" in err
    assert yaml.safe_load((out / "result.yaml").read_text())["status"] == "preempted"
    _run(RUN_FLAGS + [f"--output_dir={out}"])
    assert _table(out) == _table(reference)
    assert _result(out) == _result(reference)


class _Crash(Exception):
    pass


class _CrashAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise _Crash()


def _tiny(tmp_path, name):
    return Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=64,
                  synthetic_test=32, batch_size=8, base_lr=2.0 ** -6, epochs=4, median_of=1,
                  deterministic=True, augment=True, output_dir=str(tmp_path / name)).resolve()


@pytest.mark.fault("truncated newest checkpoint")
def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    reference = train(_tiny(tmp_path, "reference"))
    cfg = _tiny(tmp_path, "truncated")
    with pytest.raises(_Crash):
        train(cfg, extra_callbacks=[_CrashAfterEpoch(3)])
    assert yaml.safe_load((tmp_path / "truncated/result.yaml").read_text())["status"] == "failed"
    steps = _checkpoint_steps(cfg.output_dir)
    assert steps[-1] == 24  # 3 epochs x 8 steps
    data_file = next((tmp_path / "truncated/checkpoints").glob("ckpt-24.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        resumed = train(cfg)
    assert any("ckpt-24 is unreadable" in r.getMessage() for r in caplog.records)
    assert _table(tmp_path / "truncated") == _table(tmp_path / "reference")
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["steps"] == reference["steps"] == 32


class _AtStep(keras.callbacks.Callback):
    """Injects a fault: calls `fault()` from the batch hook at global step `step`."""

    def __init__(self, step, fault):
        super().__init__()
        self.step, self.fault = step, fault

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            self.fault()


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _crash():
    raise _Crash()


class _CrashInEvaluation(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.current = epoch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch + 1

    def on_test_begin(self, logs=None):
        if self.current == self.epoch:
            raise _Crash()


def _blocks_of_4(tmp_path, name):
    # 8 steps per epoch in blocks of 4, interval checkpoints every 4 steps: every epoch's
    # last block ends on a step where an interval checkpoint would be due.
    return Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=64,
                  synthetic_test=32, batch_size=8, base_lr=2.0 ** -6, epochs=3, median_of=1,
                  deterministic=True, checkpoint_every_steps=4, steps_per_execution=4,
                  output_dir=str(tmp_path / name)).resolve()


@pytest.mark.fault("a crash or SIGTERM around an epoch's end (in its evaluation, last block, final block)")
@pytest.mark.parametrize("fault", ["crash_in_evaluation", "sigterm_in_last_block",
                                   "sigterm_in_final_block"])
def test_epoch_end_checkpoint_always_has_its_evaluated_row(tmp_path, fault):
    reference = train(_blocks_of_4(tmp_path, "reference"))
    cfg = _blocks_of_4(tmp_path, fault)
    if fault == "crash_in_evaluation":
        with pytest.raises(_Crash):
            train(cfg, extra_callbacks=[_CrashInEvaluation(2)])
    else:
        step = 12 if fault == "sigterm_in_last_block" else 20  # the epoch ends at 16 / 24
        with pytest.raises(Preempted, match=f"preempted at step {step + 4}"):
            train(cfg, extra_callbacks=[_AtStep(step, _sigterm)])
        assert yaml.safe_load((tmp_path / fault / "result.yaml").read_text())["status"] == \
            "preempted"
    resumed = train(cfg)
    assert _table(tmp_path / fault) == _table(tmp_path / "reference")
    assert resumed["epochs_completed"] == reference["epochs_completed"] == 3
    assert resumed["test_accuracy"] == reference["test_accuracy"]


@pytest.mark.bad_input("a resume whose --steps_per_execution crosses the checkpoint")
def test_resume_with_a_block_that_crosses_the_checkpoint_is_refused(tmp_path):
    # Checkpointed mid-epoch at step 2 in blocks of 2; blocks of 4 cannot start there.
    cfg = dataclasses.replace(_blocks_of_4(tmp_path, "run"), steps_per_execution=2,
                              checkpoint_every_steps=2, unrolled_steps=1)
    with pytest.raises(_Crash):
        train(cfg, extra_callbacks=[_AtStep(2, _crash)])
    assert _checkpoint_steps(cfg.output_dir) == [2]
    with pytest.raises(ConfigError, match="the checkpoint is at step 2, inside a block of "
                                          "--steps_per_execution=4; resume with a divisor"):
        train(_blocks_of_4(tmp_path, "run"))
    assert train(cfg)["steps"] == 24  # the original block size resumes


@pytest.mark.fault("crash, resumed without --deterministic")
def test_resume_without_determinism_matches_to_float_tolerance(tmp_path):
    # Without --deterministic TF may reorder float reductions: same result to tolerance.
    def loose(name):
        return dataclasses.replace(_tiny(tmp_path, name), deterministic=False)
    reference = train(loose("reference"))
    with pytest.raises(_Crash):
        train(loose("resumed"), extra_callbacks=[_CrashAfterEpoch(2)])
    resumed = train(loose("resumed"))
    want, got = _table(tmp_path / "reference"), _table(tmp_path / "resumed")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert resumed["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-5)


class _StubModel:
    class optimizer:
        iterations = keras.Variable(0, dtype="int64")

    stop_training = False


def test_divergence_rule_first_loss_not_finite():
    # The first report of a high-rate trial can already be NaN, with the factor rule on.
    stop = DivergenceStop(3.0)
    model = _StubModel()
    model.optimizer.iterations.assign(32)
    stop.set_model(model)
    stop.on_train_batch_end(0, {"loss": float("nan")})
    assert stop.diverged_at_step == 32 and model.stop_training


def _checkpointed(output_dir, name):
    """The value of checkpoint entry `name` in the newest checkpoint of a run."""
    reader = tf.train.load_checkpoint(str(pathlib.Path(output_dir) / "checkpoints"))
    key, = [k for k in reader.get_variable_to_shape_map() if k.startswith(name + "/")]
    return reader.get_tensor(key)


@pytest.mark.fault("crash after the divergence reference was set")
def test_divergence_reference_survives_a_resume(tmp_path):
    # The factor rule compares with the first loss of the *run*: a run resumed after the
    # loss fell must keep the first session's reference, not take its own first loss.
    def factor_cfg(name):
        return Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=64,
                      synthetic_test=32, batch_size=8, base_lr=2.0 ** -6, epochs=3,
                      median_of=1, deterministic=True, divergence_factor=100.0,
                      steps_per_execution=2, output_dir=str(tmp_path / name)).resolve()
    train(factor_cfg("reference"))
    cfg = factor_cfg("resumed")
    with pytest.raises(_Crash):
        train(cfg, extra_callbacks=[_CrashAfterEpoch(1)])
    first = _checkpointed(cfg.output_dir, "divergence_reference")
    train(cfg)
    assert _checkpointed(cfg.output_dir, "divergence_reference") == first
    assert first == _checkpointed(tmp_path / "reference", "divergence_reference")
    assert np.isfinite(first) and first > 0
    assert _table(tmp_path / "resumed") == _table(tmp_path / "reference")


@pytest.mark.parametrize("losses,factor,step", [
    ([2.3, 2.5, 3.0, 3.6], 1.5, 4),          # 3.6 > 1.5 * 2.3
    ([2.3, 2.5, 3.0, 3.4], 1.5, None),       # never above 3.45
    ([2.3, float("nan")], 0.0, 2),           # NaN always counts
    ([2.3, float("inf")], 0.0, 2),
    ([2.3, 1e9], 0.0, None),                 # finite: only the factor test catches it
])
def test_divergence_rule(losses, factor, step):
    stop = DivergenceStop(factor)
    model = _StubModel()
    model.optimizer.iterations.assign(0)
    stop.set_model(model)
    for i, loss in enumerate(losses):
        model.optimizer.iterations.assign(i + 1)
        stop.on_train_batch_end(i, {"loss": loss})
    assert stop.diverged_at_step == step
    assert model.stop_training == (step is not None)


@pytest.mark.fault("kill -9 of a sweep mid-trial")
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    sweep = ["--grid_batch_size=8,16", "--log2_base_lr=-6", "--checkpoint_every_steps=0"]
    flags = [f for f in RUN_FLAGS if not f.startswith("--checkpoint_every")] + sweep
    reference = tmp_path / "reference"
    _run(flags + [f"--output_dir={reference}"])
    out = tmp_path / "killed"
    proc = _start(flags + [f"--output_dir={out}"])
    first = out / "trials/m8/result.yaml"  # only m is swept, so trials are named by m
    second = out / "trials/m16"
    _wait_for(lambda: first.exists() and "completed" in first.read_text()
              and _checkpoint_steps(second), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_at = (out / "trials/m8/history.csv").stat().st_mtime_ns
    log = _run(flags + [f"--output_dir={out}"])
    assert (out / "trials/m8/history.csv").stat().st_mtime_ns == finished_at
    assert len(_resumed_at_steps(log)) == 1  # m16 went on from its checkpoint, not from 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]
    assert strip(results.read_csv(out / "results.csv")) == \
        strip(results.read_csv(reference / "results.csv"))
