"""Failures that are not kills (issue 15): failed sweep trials, full disks, two processes on
one directory, damaged data and records, bad inputs, SIGTERM while loading.

Every test is marked `fault(...)` (a fault injected, which must be survived) or
`bad_input(...)` (an input that must be refused with one line); tools/fault_table.py turns
their outcomes into the README's reliability table.
"""
import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import keras
import pytest
import tensorflow as tf
import yaml

from sbt_keras import claim, distribute, results, sweep, termination
from sbt_keras import grid as grid_lib
from sbt_keras.config import Config
from sbt_keras.data import cifar_binary, tfds_source
from sbt_keras.errors import (ConfigError, DamagedRecord, DirectoryInUse, Preempted,
                              StorageError, SweepStopped)
from sbt_keras.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SYNTH = ["--dataset=synthetic", "--model=resnet8", "--image_size=8", "--synthetic_train=32",
         "--synthetic_test=16", "--batch_size=8", "--epochs=2", "--median_of=1"]


def _cfg(out, **overrides):
    """32 examples / m=8 = 4 steps per epoch, checkpoints every 2 steps, 2 epochs."""
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                  synthetic_test=16, batch_size=8, base_lr=2.0 ** -6, epochs=2, median_of=1,
                  deterministic=True, eval_batch_size=16, checkpoint_every_steps=2,
                  steps_per_execution=2, output_dir=str(out))
    values.update(overrides)
    return Config(**values).resolve()


def _table(output_dir):
    rows = results.read_csv(pathlib.Path(output_dir) / "history.csv")
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


def _yaml(path):
    return yaml.safe_load(pathlib.Path(path).read_text())


def _steps(output_dir):
    return sorted(int(p.name[5:-6]) for p in (pathlib.Path(output_dir) / "checkpoints")
                  .glob("ckpt-*.index"))


def _cli(args, poison=None, timeout=120, **env):
    """`python -m sbt_keras.run ARGS`; with `poison` (a tmp dir), importing TensorFlow fails,
    proving that the refusal came before it."""
    path = str(REPO)
    if poison is not None:
        (poison / "tensorflow").mkdir(parents=True, exist_ok=True)
        (poison / "tensorflow" / "__init__.py").write_text(
            "raise ImportError('tensorflow was imported')\n")
        path = f"{poison}{os.pathsep}{REPO}"
    full = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    return subprocess.run([sys.executable, "-m", "sbt_keras.run", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc, code=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), \
        (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def _final_error_line(proc, code):
    """The closing `error:` line of a command that got as far as TensorFlow's own logs."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and lines[-1].startswith("error: "), \
        (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


# ---------------------------------------------------------------------- 1. failed trials
class _Transient(Exception):
    pass


class _FailOnce(keras.callbacks.Callback):
    """Raises _Transient at the end of the first epoch of the trial with `steps` steps per
    epoch: a passing failure, after that epoch's checkpoint."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0 and self.params.get("steps") == self.steps:
            raise _Transient("the input pipeline crashed (injected)")


def _sweep_base(out, **overrides):
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                  synthetic_test=16, epochs=2, median_of=1, eval_batch_size=16,
                  deterministic=True, log2_base_lr=-6, output_dir=str(out))
    values.update(overrides)
    return Config(**values)


@pytest.mark.fault("a sweep trial fails once (input pipeline crash)")
def test_a_failed_trial_is_retried_on_rerun_and_resumes_from_its_checkpoint(
        tmp_path, monkeypatch, caplog):
    # One point keeps it cheap; that the sweep goes on past a failure is checked below.
    base = _sweep_base(tmp_path / "sweep")
    grid = grid_lib.Grid.from_flags(base, {"batch_size": "8"}, seeds=1)
    row, = sweep.run_sweep(base, grid, extra_callbacks=[_FailOnce(steps=4)])  # m8: 4 steps
    assert row["status"] == "failed" and "input pipeline crashed" in row["reason"]
    assert results.read_csv(tmp_path / "sweep/results.csv")[0]["status"] == "failed"

    fits = []
    original = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, **k: (
        fits.append(k.get("initial_epoch")), original(self, *a, **k))[1])
    with caplog.at_level("INFO"):
        row, = sweep.run_sweep(base, grid)
    assert row["status"] == "completed" and not row.get("reason")
    assert fits == [1]  # trained again from its epoch-1 checkpoint, not from scratch
    assert any("Retrying 1 failed trial(s)" in r.getMessage() and "m8" in r.getMessage()
               for r in caplog.records)
    assert any("1 failed trial(s) retried" in r.getMessage() for r in caplog.records)


def _fake_train(calls, fail):
    """A stand-in for train(): records the call, writes the records a failing run writes,
    and raises when `fail(name)` says so."""
    def fake(cfg, extra_callbacks=()):
        name = pathlib.Path(cfg.output_dir).name
        calls.append(name)
        results.write_yaml(os.path.join(cfg.output_dir, "config.yaml"), cfg.to_dict())
        if fail(name):
            results.write_yaml(os.path.join(cfg.output_dir, "result.yaml"),
                               {"status": "failed", "error": "RuntimeError: disk hiccup"})
            raise RuntimeError("disk hiccup")
        result = {"status": "completed", "test_accuracy": 0.5}
        results.write_yaml(os.path.join(cfg.output_dir, "result.yaml"), result)
        return result
    return fake


@pytest.mark.fault("every trial of a sweep fails (beyond keras-tuner's limit of 3)")
def test_failures_in_a_row_stop_only_at_the_configured_limit(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "train", _fake_train(calls, fail=lambda name: True))
    texts = {"batch_size": "1,2,4,8", "bn_batch_size": "2"}  # m1_bn2 is a skipped point
    base = _sweep_base(tmp_path / "sweep", sweep_failure_limit=0)
    rows = sweep.run_sweep(base, grid_lib.Grid.from_flags(base, texts, seeds=1))
    status = {r["trial"]: r["status"] for r in rows}
    assert status == {"m1_bn2": "skipped", "m2_bn2": "failed", "m4_bn2": "failed",
                      "m8_bn2": "failed"}
    assert all("disk hiccup" in r["reason"] for r in rows if r["status"] == "failed")
    assert calls == ["m2_bn2", "m4_bn2", "m8_bn2"]

    # Re-run with a limit of 2: the failed trials go first and fail again; it stops.
    calls.clear()
    limited = _sweep_base(tmp_path / "sweep", sweep_failure_limit=2)
    with pytest.raises(SweepStopped, match=r"2 trial\(s\) failed in a row "
                                           r"\(--sweep_failure_limit=2\), the last m4_bn2: "
                                           r"RuntimeError: disk hiccup"):
        sweep.run_sweep(limited, grid_lib.Grid.from_flags(limited, texts, seeds=1))
    assert calls == ["m2_bn2", "m4_bn2"]
    rows = {r["trial"]: r for r in results.read_csv(tmp_path / "sweep/results.csv")}
    assert rows["m4_bn2"]["status"] == "failed" and "disk hiccup" in rows["m4_bn2"]["reason"]

    # The cause is gone: everything still failed is retried and completes.
    calls.clear()
    monkeypatch.setattr(sweep, "train", _fake_train(calls, fail=lambda name: False))
    rows = sweep.run_sweep(limited, grid_lib.Grid.from_flags(limited, texts, seeds=1))
    assert sorted(calls) == ["m2_bn2", "m4_bn2", "m8_bn2"]
    assert sorted(r["status"] for r in rows) == ["completed"] * 3 + ["skipped"]


# ---------------------------------------------------------------------- 2. full disk
def _failing_save(step, error):
    """tf.train.CheckpointManager.save raising `error` at global step `step`."""
    original = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number == step:
            raise error
        return original(self, checkpoint_number=checkpoint_number, **kwargs)
    return save


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    train(_cfg(out))
    return out


@pytest.fixture(scope="module")
def disk_filled(tmp_path_factory):
    """A run whose checkpoint at step 6 (mid-epoch 2) hit a full disk; the returned error."""
    out = tmp_path_factory.mktemp("faults") / "full"
    enospc = tf.errors.ResourceExhaustedError(
        None, None, f"{out}/checkpoints/ckpt-6_temp/part-00000-of-00001.data-00000-of-00001"
                    f".tempstate123; No space left on device")
    patch = pytest.MonkeyPatch()
    patch.setattr(tf.train.CheckpointManager, "save", _failing_save(6, enospc))
    try:
        with pytest.raises(StorageError) as info:
            train(_cfg(out))
    finally:
        patch.undo()
    return out, info.value


@pytest.mark.fault("disk full while writing a checkpoint (TF's ResourceExhausted)")
def test_a_full_disk_is_reported_as_such_and_the_run_resumes(disk_filled, reference,
                                                             tmp_path):
    out, error = disk_filled
    message = str(error)
    assert "\n" not in message and "out of memory" not in message
    assert f"could not write {out}/checkpoints/ckpt-6: the disk is full (" in message
    assert " free of " in message and "resume from ckpt-4" in message
    assert _yaml(out / "result.yaml") == {"status": "failed", "error": message}
    assert len(_table(out)) == 1  # the records before the failed write are intact
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    train(_cfg(copy))
    assert _table(copy) == _table(reference)


@pytest.mark.fault("permission denied writing a checkpoint")
def test_a_permission_error_names_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    denied = tf.errors.PermissionDeniedError(None, None, "ckpt-2_temp: Permission denied")
    monkeypatch.setattr(tf.train.CheckpointManager, "save", _failing_save(2, denied))
    with pytest.raises(StorageError) as info:
        train(_cfg(out, epochs=1))
    message = str(info.value)
    assert f"could not write {out}/checkpoints/ckpt-2: permission denied " \
           f"(PermissionDeniedError" in message and "\n" not in message, message
    assert "no checkpoint was written yet" in message
    assert _yaml(out / "result.yaml") == {"status": "failed", "error": message}


@pytest.mark.fault("disk full (OSError ENOSPC) writing result.yaml")
def test_a_full_disk_writing_records_keeps_the_earlier_ones(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = results._write_text_atomic

    def write(path, text):
        if str(path).endswith("result.yaml"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, text)
    monkeypatch.setattr(results, "_write_text_atomic", write)
    with pytest.raises(StorageError, match=f"could not write {out}/result.yaml: the disk is "
                                           f"full \\(.* free of .*\\); free some space"):
        train(_cfg(out, epochs=1))
    assert _yaml(out / "config.yaml")["batch_size"] == 8  # written before, still whole


def test_what_a_failed_write_is_called():
    # TF raises ResourceExhausted for a full disk and for exhausted memory alike: a step
    # that runs out of memory stays out of memory (test_memory.py checks the whole path).
    from sbt_keras import storage
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    assert storage.kind(oom, writing=False) is None and storage.kind(oom) is None
    full = tf.errors.ResourceExhaustedError(None, None, "x; No space left on device")
    assert storage.kind(full, writing=False) == "full" and storage.kind(full) == "full"
    gone = tf.errors.NotFoundError(None, None, "bucket gs://b does not exist")
    assert ("its directory or bucket is gone or unreachable (NotFoundError: bucket gs://b "
            "does not exist)") in str(storage.explain("gs://b/run/history.csv", gone))
    assert storage.kind(OSError(errno.EDQUOT, "quota"), writing=False) == "full"
    assert storage.kind(OSError(errno.ENOENT, "x"), writing=False) is None


# ---------------------------------------------------------------------- 5. damaged records
@pytest.mark.fault("half-written last history.csv row + garbage checkpoint state file")
def test_damaged_history_and_checkpoint_state_are_recovered(disk_filled, reference,
                                                            tmp_path, caplog):
    out = tmp_path / "damaged"
    shutil.copytree(disk_filled[0], out)
    assert _steps(out) == [2, 4] and len(_table(out)) == 1
    history = (out / "history.csv").read_text()
    (out / "history.csv").write_text(history[:len(history) - 25])  # row 1 cut short
    (out / "checkpoints/checkpoint").write_bytes(b"\x00\xffgarbage{{{")
    with caplog.at_level("WARNING"):
        train(_cfg(out))
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 1 damaged row(s) after epoch 0" in logged
    assert "checkpoint state file" in logged and "ckpt-4 are past them" in logged
    assert _table(out) == _table(reference)  # row 1 recomputed from ckpt-2, not from scratch


@pytest.mark.bad_input("unreadable {name}")
@pytest.mark.parametrize("name", ["result.yaml", "config.yaml"])
def test_an_unreadable_record_is_one_line_naming_the_file(disk_filled, tmp_path, name):
    out = tmp_path / "damaged"
    shutil.copytree(disk_filled[0], out)
    (out / name).write_bytes(b"status: [completed\n\xff")
    with pytest.raises(DamagedRecord) as info:
        train(_cfg(out))
    message = str(info.value)
    assert "\n" not in message and f"{out / name} is damaged" in message
    assert ("delete it and re-run" if name == "result.yaml" else "restore it") in message
    assert _steps(out) == [2, 4]  # nothing touched


@pytest.mark.bad_input("a damaged history no kept checkpoint can rebuild")
def test_a_damaged_history_past_every_checkpoint_is_refused_not_retrained(disk_filled,
                                                                         tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(disk_filled[0], out)
    history = (out / "history.csv").read_text()
    (out / "history.csv").write_text(history[:len(history) - 25])
    for stale in (out / "checkpoints").glob("ckpt-2.*"):
        stale.unlink()  # only ckpt-4, past the rows left, remains
    with pytest.raises(DamagedRecord, match=r"history.csv holds 0 epochs, but the only "
                                            r"readable checkpoints \(ckpt-4, ...\) are past "
                                            r"them.*restore history.csv from a copy"):
        train(_cfg(out))
    assert _steps(out) == [4]  # not retrained from scratch over it


@pytest.mark.fault("a garbage result.yaml in one trial of a sweep")
def test_a_damaged_trial_record_is_a_row_not_a_stopped_sweep(tmp_path):
    trial = tmp_path / "trials" / "m4"
    results.write_yaml(trial / "config.yaml", {"batch_size": 4})
    (trial / "result.yaml").write_text("status: [")
    row, = sweep.write_results(str(tmp_path))
    assert row["status"] == "damaged" and "result.yaml is damaged" in row["reason"]


# ---------------------------------------------------------------------- 3. one process
def _holder(directory):
    """A process holding the claim on `directory` until killed."""
    code = ("import sys, time; from sbt_keras import claim; claim.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.bad_input("a second process on a live run's --output_dir")
def test_a_second_process_is_refused_and_a_dead_holders_claim_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        line = _one_error_line(_cli(SYNTH + ["--base_lr=0.1", f"--output_dir={out}"],
                                    poison=tmp_path / "poison"))
        assert f"is in use by pid {holder.pid} on " in line and "(run)" in line, line
        with pytest.raises(DirectoryInUse):  # a sweep on it too
            claim.acquire(str(out), "sweep")
    finally:
        holder.kill()
        holder.wait()
    assert (out / claim.CLAIM_FILE).exists()  # kill -9 left it behind
    with caplog.at_level("WARNING"):
        claim.acquire(str(out))
    assert any(f"claimed by pid {holder.pid}" in r.getMessage() and "taking it over" in
               r.getMessage() for r in caplog.records)
    claim.acquire(str(out))  # re-entrant in one process
    claim.release(str(out))
    assert (out / claim.CLAIM_FILE).exists()
    claim.release(str(out))
    assert not (out / claim.CLAIM_FILE).exists()


@pytest.mark.fault("an error, Ctrl-C or SIGTERM while holding a directory's claim")
def test_the_claim_is_released_on_every_exit_path(tmp_path):
    for error in (RuntimeError, KeyboardInterrupt, Preempted):
        with pytest.raises(error):
            with claim.claimed(str(tmp_path / "run")):
                assert (tmp_path / "run" / claim.CLAIM_FILE).exists()
                raise error("stop")
        assert not (tmp_path / "run" / claim.CLAIM_FILE).exists()


@pytest.mark.bad_input("a claimed --output_dir on a filesystem without flock")
def test_without_flock_the_claim_file_decides(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    holder = _holder(tmp_path / "elsewhere")  # just a live pid on this host
    try:
        results.write_yaml(out / claim.CLAIM_FILE, {"host": os.uname().nodename,
                                                     "pid": holder.pid, "started": "t"})
        with pytest.raises(DirectoryInUse, match=f"pid {holder.pid} .* if that process is "
                                                 f"gone, delete"):
            claim.acquire(str(out))
    finally:
        holder.kill()
        holder.wait()
    claim.acquire(str(out))  # its pid is dead now: taken over
    claim.release(str(out))
    assert not (out / claim.CLAIM_FILE).exists()
    results.write_yaml(out / claim.CLAIM_FILE, {"host": "another-host", "pid": 1})
    with pytest.raises(DirectoryInUse, match="on another-host"):
        claim.acquire(str(out))


@pytest.mark.fault("kill -9 of a --sweep_workers parent (its children must stop)")
def test_children_of_sweep_workers_die_with_their_parent(tmp_path):
    marker = tmp_path / "child_got_sigterm"
    child = ("import signal, sys, time, pathlib; from sbt_keras import children; "
             "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).touch(), "
             "sys.exit(143))); children.follow_parent(); print('ready', flush=True); "
             "time.sleep(60)")
    parent = ("import subprocess, sys, os; from sbt_keras import children; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, sys.argv[1]], "
              "env={**os.environ, **children.parent_environment()}, stdout=subprocess.PIPE, "
              "text=True); print(p.pid, p.stdout.readline().strip(), flush=True); "
              "import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent, str(marker)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    pid, ready = proc.stdout.readline().split()
    assert ready == "ready"
    proc.kill()  # kill -9: no chance to stop its children itself
    proc.wait()
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()


# ---------------------------------------------------------------------- 4. data and devices
def _cifar_files(directory, dataset, labels):
    """A tiny CIFAR binary layout with the given label bytes per record (train and test)."""
    subdir, train_names, test_names, label_bytes = cifar_binary._LAYOUTS[dataset]
    root = directory / subdir
    root.mkdir(parents=True)
    pixels = bytes(cifar_binary.PIXEL_BYTES)
    for name in train_names + test_names:
        records = labels.get(name, [(1,) * label_bytes] * 2)
        (root / name).write_bytes(b"".join(bytes(label) + pixels for label in records))
    return root


@pytest.mark.bad_input("a CIFAR {dataset} file with an out-of-range label")
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_every_label_byte_is_checked_at_load(tmp_path, dataset):
    from sbt_keras import data
    if dataset == "cifar10":
        root = _cifar_files(tmp_path, dataset, {"test_batch.bin": [(3,), (9,), (10,), (200,)]})
        words = "test_batch.bin record 2 (of 4) has label 10, but cifar10 has 10 classes"
    else:
        root = _cifar_files(tmp_path, dataset, {"train.bin": [(3, 30), (19, 99), (4, 100)]})
        words = "train.bin record 2 (of 3) has fine label 100, but cifar100 has 100 fine"
    with pytest.raises(ConfigError) as info:
        data.load(dataset, cifar_dir=str(tmp_path))
    assert words in str(info.value) and str(root) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.bad_input("a TPU address that never answers")
def test_a_silent_tpu_is_one_line_after_the_timeout(monkeypatch):
    monkeypatch.setattr(distribute, "_connect_tpu", lambda tf, tpu: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"--tpu=grpc://10.0.0.2:8470: the TPU did not answer"
                                          r" within 0.5 s \(--tpu_timeout\)"):
        distribute.make_strategy("tpu", "grpc://10.0.0.2:8470", 0.5)
    assert time.monotonic() - started < 5


@pytest.mark.bad_input("an offline tfds download")
def test_an_offline_download_fails_in_seconds_naming_the_flags(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    with socket_closed() as port:
        monkeypatch.setitem(tfds_source.DOWNLOAD_HOSTS, "cifar10", ("127.0.0.1", port))
        monkeypatch.setattr(tfds, "load", lambda *a, **k: pytest.fail("tfds.load was called"))
        started = time.monotonic()
        with pytest.raises(ConfigError) as info:
            tfds_source.load_tfds("cifar10", str(tmp_path), download=True)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "cannot be downloaded" in message and "--cifar_dir" in message
    assert "--data_dir" in message and "\n" not in message


class socket_closed:
    """A local port nothing listens on."""

    def __enter__(self):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------- 6. bad input
def _read_only(tmp_path):
    """A directory this process cannot write: chmod, or (as root, which ignores modes) a
    sitecustomize that makes every write under it fail with EROFS."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro, {}
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        f"_RO = {str(ro)!r}\n"
        "_open, _mkdir = os.open, os.mkdir\n"
        "def _check(path):\n"
        "    if os.path.abspath(str(path)).startswith(_RO + os.sep):\n"
        "        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))\n"
        "def _os_open(path, flags, *a, **k):\n"
        "    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT): _check(path)\n"
        "    return _open(path, flags, *a, **k)\n"
        "def _os_mkdir(path, *a, **k):\n"
        "    _check(path); return _mkdir(path, *a, **k)\n"
        "os.open, os.mkdir = _os_open, _os_mkdir\n")
    return ro, {"SBT_SITE": str(hook)}


BAD_CLI = {
    "--output_dir that is a file": (["--base_lr=0.1"], "is a file, not a directory"),
    "--output_dir under a file": (["--base_lr=0.1"], "cannot be created: "),
    "read-only --output_dir": (["--base_lr=0.1"], "is not writable ("),
    "--seed=-1": (["--base_lr=0.1", "--seed=-1"], "--seed=-1 must be in [0, 2**32)"),
    "--seed=2**32": (["--base_lr=0.1", "--seed=4294967296"], "--seed=4294967296 must be in"),
    "--log2_base_lr=5000": (["--log2_base_lr=5000"], "--log2_base_lr=5000.0 gives eta_tilde"),
    "--base_lr=1e308 (eta overflows)": (["--base_lr=1e308"], "beyond the float range"),
    "a binary flagfile": (["--base_lr=0.1"], "is not a text file (byte 3 is not UTF-8)"),
    "--sweep_workers=2 without a grid": (["--base_lr=0.1", "--sweep_workers=2"],
                                         "no --grid_* flag (or --seeds > 1)"),
}


@pytest.mark.bad_input("{case}")
@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_input_is_one_line_exit_2_before_tensorflow(tmp_path, case):
    args, words = BAD_CLI[case]
    out, env = tmp_path / "out", {}
    if case == "--output_dir that is a file":
        out.write_text("not a directory")
    elif case == "--output_dir under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif case == "read-only --output_dir":
        ro, env = _read_only(tmp_path)
        out = ro / "run"
    elif case == "a binary flagfile":
        flagfile = tmp_path / "binary.flags"
        flagfile.write_bytes(b"--m\xff\xfe\x00\x01")
        args = args + [f"--flagfile={flagfile}"]
    if "SBT_SITE" in env:  # sitecustomize is imported from the path at start-up
        poison = tmp_path / "poison"
        proc = _cli(SYNTH + args + [f"--output_dir={out}"], poison=poison,
                    PYTHONPATH=f"{env['SBT_SITE']}{os.pathsep}{poison}{os.pathsep}{REPO}")
    else:
        proc = _cli(SYNTH + args + [f"--output_dir={out}"], poison=tmp_path / "poison")
    line = _one_error_line(proc)
    assert words in line, line
    assert "tensorflow was imported" not in proc.stderr


@pytest.mark.bad_input("an unreachable URL --output_dir")
def test_an_unreachable_url_output_dir_is_one_line():
    with pytest.raises(ConfigError, match=r"--output_dir=nosuchfs://bucket/run cannot be "
                                          r"reached \(UnimplementedError"):
        claim.acquire("nosuchfs://bucket/run")


# ---------------------------------------------------------------------- 7. SIGTERM
def _probe(module, marker, mode, args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, str(REPO / "tests/term_probe.py"), module,
                             str(marker), "1.5", mode, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# (module whose import is slowed, how): before run.main (flags still loading), while
# TensorFlow loads inside train(), and while the data loads with the SIGTERM landing in a
# destructor, where its exception is lost (the race that let a run train to its end).
MOMENTS = {"starting": ("sbt_keras.flags", "plain"),
           "importing TensorFlow": ("keras", "plain"),
           "loading data, signal lost in a destructor": ("sbt_keras.data.synthetic",
                                                        "destructor")}
SLOW_MOMENTS = ("loading data, signal lost in a destructor",)  # loads TensorFlow: ~15 s


@pytest.mark.fault("SIGTERM while {moment}")
@pytest.mark.parametrize("moment", [pytest.param(m, marks=pytest.mark.slow)
                                    if m in SLOW_MOMENTS else m for m in MOMENTS])
def test_sigterm_at_any_moment_of_loading_exits_143_preempted(tmp_path, moment):
    module, mode = MOMENTS[moment]
    marker, out = tmp_path / "moment", tmp_path / "run"
    proc = _probe(module, marker, mode, SYNTH + ["--base_lr=0.1", f"--output_dir={out}"])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    time.sleep(0.2)  # inside the slow moment
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 143, err[-3000:]
    assert lines[-1] == "error: preempted by SIGTERM; re-run the same command to resume"
    if moment.startswith("loading"):
        assert _yaml(out / "result.yaml")["status"] == "preempted"
        assert not list(out.glob("checkpoints/ckpt-*"))  # stopped before any step
    assert not (out / claim.CLAIM_FILE).exists()


class _SleepsWhenDropped:
    """Sends SIGTERM and waits inside __del__, where the handler's exception is lost."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


@pytest.mark.fault("SIGTERM while loading data, in-process: {how}")
@pytest.mark.parametrize("how", ["raised", "lost in a destructor"])
def test_sigterm_while_loading_records_preempted(tmp_path, monkeypatch, how):
    from sbt_keras import data
    original = data.load_for

    def load_then_sigterm(cfg):
        loaded = original(cfg)
        if how == "raised":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises in here
        else:
            _SleepsWhenDropped()  # "Exception ignored in ...__del__": the run would go on
        return loaded
    monkeypatch.setattr(data, "load_for", load_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    termination._state["installed"] = False
    try:
        termination.start()
        with pytest.raises(Preempted, match="preempted by SIGTERM"):
            train(_cfg(tmp_path / "run", epochs=1))
    finally:
        signal.signal(signal.SIGTERM, previous)
        termination._state.update(installed=False, raising=False)
        termination.acted_on()
    assert _yaml(tmp_path / "run/result.yaml")["status"] == "preempted"
    assert not list((tmp_path / "run").glob("checkpoints/ckpt-*"))  # not one step trained


# ---------------------------------------------------------------------- 9. the table
def test_the_fault_table_counts_recorded_outcomes(tmp_path):
    from tools import fault_table
    log = {
        "tests/test_a.py::test_x[1]": dict(kind="fault", what="disk full", outcome="passed",
                                           test="tests/test_a.py::test_x"),
        "tests/test_a.py::test_x[2]": dict(kind="fault", what="disk full", outcome="failed",
                                           test="tests/test_a.py::test_x"),
        "tests/test_b.py::test_y": dict(kind="fault", what="kill -9", outcome="skipped",
                                        test="tests/test_b.py::test_y"),
        "tests/test_b.py::test_z": dict(kind="bad_input", what="--seed=-1 | 2**32",
                                        outcome="passed", test="tests/test_b.py::test_z"),
    }
    text = fault_table.table(log)
    assert "**3 faults injected (2 kinds): 1 survived, 1 not run.**" in text
    assert "**1 bad inputs tried (1 kinds): 1 refused with one line.**" in text
    assert "| disk full | 2 | 1 (1 FAILED) | test_a.py::test_x |" in text
    assert "| kill -9 | 1 | 0 (1 skipped) | test_b.py::test_y |" in text
    assert "| --seed=-1 \\| 2**32 | 1 | 1 | test_b.py::test_z |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{fault_table.BEGIN}\nold\n{fault_table.END}\nb\n")
    fault_table.replace_in(readme, text)
    assert readme.read_text() == f"a\n{fault_table.BEGIN}\n{text}{fault_table.END}\nb\n"


# ---------------------------------------------------------------------- real devices, slow
@pytest.mark.slow
@pytest.mark.bad_input("a TPU address that accepts connections but never answers (real gRPC)")
def test_a_real_silent_tpu_address_is_one_line_after_the_timeout(tmp_path):
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(8)],
                     daemon=True).start()
    port = server.getsockname()[1]
    started = time.monotonic()
    proc = _cli(SYNTH + ["--base_lr=0.1", "--strategy=tpu", f"--tpu=grpc://127.0.0.1:{port}",
                         "--tpu_timeout=3", f"--output_dir={tmp_path / 'run'}"], timeout=180)
    line = _final_error_line(proc, code=2)
    assert "the TPU did not answer within 3 s (--tpu_timeout)" in line, line
    assert time.monotonic() - started < 120  # TensorFlow's import included; it hung > 150 s
    server.close()


@pytest.mark.slow
@pytest.mark.fault("a real full disk (a 200 KiB tmpfs) under a run")
def test_a_real_full_disk_is_reported_and_resumed_elsewhere(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(tiny)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        out = tiny / "run"
        proc = _cli(SYNTH + ["--base_lr=0.1", f"--output_dir={out}"], timeout=300)
        line = _final_error_line(proc, code=1)
        assert f"could not write {out}/checkpoints/ckpt-4: the disk is full (" in line, line
        assert "out of memory" not in line
        assert _yaml(out / "result.yaml")["status"] == "failed"
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", str(tiny)], capture_output=True)
    proc = _cli(SYNTH + ["--base_lr=0.1", f"--output_dir={moved}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _yaml(moved / "result.yaml")["status"] == "completed"
