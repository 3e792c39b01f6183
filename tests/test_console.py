"""What a newcomer sees: records' file modes, plain messages, progress, the start summary,
--dry_run, Ctrl-C, and a directory left by a run that never trained."""
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import yaml

from sbt_keras import console, cost, results
from sbt_keras.config import Config
from sbt_keras import grid as grid_lib
from sbt_keras.grid import Point
from sbt_keras.training import progress, resume

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def tiny(tmp_path, name="run", resolve=True, **overrides):
    values = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=64,
                  synthetic_test=40, batch_size=8, base_lr=2.0 ** -6, epochs=3, median_of=2,
                  eval_batch_size=16, output_dir=str(tmp_path / name))
    values.update(overrides)
    return Config(**values).resolve() if resolve else Config(**values)


# ---------------------------------------------------------------------- records
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_records_get_the_mode_the_umask_gives_and_block_style(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "result.yaml"
        results.write_yaml(str(path), {"status": "completed", "steps": [12, 18]})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert path.read_text() == "status: completed\nsteps:\n- 12\n- 18\n"  # no [12, 18]


# ---------------------------------------------------------------------- messages
def _record(message, level=logging.INFO):
    return logging.LogRecord("absl", level, __file__, 1, message, None, None)


def test_log_lines_are_plain_and_warnings_say_so():
    formatter = console.PlainFormatter()
    assert formatter.format(_record("epoch 1/3  train loss 2.3")) == "epoch 1/3  train loss 2.3"
    assert formatter.format(_record("disk full", logging.WARNING)) == "warning: disk full"


def test_only_our_own_retracing_warning_is_dropped():
    quiet = console.QuietRetracing()
    ours = ("5 out of the last 13 calls to <function SummedGradientModel.make_train_function."
            "<locals>.multi_step at 0x7f> triggered tf.function retracing. Tracing is ...")
    assert not quiet.filter(_record(ours, logging.WARNING))
    assert quiet.filter(_record(ours.replace("SummedGradientModel", "Other"), logging.WARNING))


NO_GPU_STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796123135.487713    8849 port.cc:153] oneDNN custom operations are on. ...",
    "I0000 00:00:1796123135.488003    8849 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796123138.885922    8849 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]


def test_tensorflows_no_gpu_startup_lines_are_dropped_and_nothing_else():
    drop = console.LineFilter()
    assert [line for line in NO_GPU_STARTUP if drop.keep(line)] == []
    assert drop.keep("E0000 00:00:1.2 3 some_kernel.cc:1] a real error")
    # With a driver present, a failing cuInit is news: it stays.
    assert console.LineFilter().keep(NO_GPU_STARTUP[-1])


def test_the_filter_sits_on_file_descriptor_2_only_while_tensorflow_starts():
    code = ("import os, sys; from sbt_keras import console\n"
            "with console.quiet_native_startup():\n"
            f"    for line in {NO_GPU_STARTUP!r} + ['kept 1']:\n"
            "        os.write(2, (line + '\\n').encode())\n"
            "os.write(2, b'kept 2\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "kept 1\nkept 2\n", proc.stderr


def test_the_resume_command_is_the_same_command():
    line = console.interrupted_line(["run.py", "--flagfile=experiments/demo.flags",
                                     "--output_dir=runs/my sweep"])
    assert line.startswith("interrupted; resume with: ")
    assert line.endswith("-m sbt_keras.run --flagfile=experiments/demo.flags "
                         "'--output_dir=runs/my sweep'")


# ---------------------------------------------------------------------- progress
class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_run_progress_reports_steps_rate_and_etas_without_the_tracing_block():
    clock, lines = _Clock(), []
    bar = progress.RunProgress(steps_per_epoch=100, epochs=2, every_seconds=30, clock=clock,
                               log=lines.append, sweep_remaining=lambda per_step: 600.0)
    bar.set_params({"steps": 100, "epochs": 2})
    bar.on_epoch_begin(0)
    clock.now += 20.0  # first block of 10 steps: tracing, not timed
    bar.on_train_batch_end(9)
    for end in range(19, 100, 10):  # then 10 steps per second
        clock.now += 1.0
        bar.on_train_batch_end(end)
    assert bar.steps_per_second == pytest.approx(10.0)
    clock.now += 5.0  # the evaluation
    bar.on_epoch_end(0)
    bar.on_epoch_begin(1)
    clock.now += 3.0
    bar.on_train_batch_end(29)
    # 70 steps at 10/s, and one more 5 s evaluation; the sweep's 600 s after this trial.
    assert bar.run_eta() == pytest.approx(12.0)
    assert bar.line() == ("epoch 2/2  step 30/100  10.0 steps/s  epoch ETA 7s  run ETA 12s"
                          "  sweep ETA ~10m12s")
    assert lines == [bar.line()]  # the first line once 30 s had passed, no other


def test_run_progress_counts_a_resumed_epoch_from_where_it_was():
    bar = progress.RunProgress(steps_per_epoch=100, epochs=3, clock=_Clock(), log=print)
    bar.set_params({"steps": 40, "epochs": 2})  # fit was asked for the last 40 steps
    bar.on_epoch_begin(1)
    bar.on_train_batch_end(9)
    assert bar.line().startswith("epoch 2/3  step 70/100")


def _sweep(tmp_path, rows, sizes=(4, 16, 64), rates=(-8, -6)):
    base = tiny(tmp_path, "sweep", False, synthetic_train=256, epochs=2, median_of=1)
    points = [Point((("batch_size", m), ("log2_base_lr", float(lr))))
              for m in sizes for lr in rates]
    valid = [(p, grid_lib.point_config(base, p, str(tmp_path / "sweep" / "trials" / p.name)))
             for p in points]
    if rows:
        results.write_csv(tmp_path / "sweep" / "results.csv", rows, list(rows[0]))
    clock, lines = _Clock(), []
    return progress.SweepProgress(str(tmp_path / "sweep"), valid, skipped=1, clock=clock,
                                  log=lines.append), clock, lines


def test_sweep_header_counts_trials_steps_left_and_the_best_so_far(tmp_path):
    rows = [dict(trial="m4_lr-8", norm="batch", batch_size=4, log2_base_lr=-8,
                 status="completed", test_accuracy=0.41, steps=128, wall_seconds=12.8),
            dict(trial="m4_lr-6", norm="batch", batch_size=4, log2_base_lr=-6,
                 status="diverged", test_accuracy=0.1, steps=20, wall_seconds=2.0)]
    sweep, clock, lines = _sweep(tmp_path, rows)
    point = sweep.valid[2][0]  # m=16, 2^-8
    clock.now += 75
    with sweep.trial(point):
        pass
    title, status = lines[:2]
    assert title == "trial 3/6  m=16  η̃=2⁻⁸"
    assert status.startswith("  2/6 done (1 diverged), 1 skipped · elapsed 1m15s · ETA ")
    assert "best so far 41.0% (m=4 η̃=2⁻⁸)" in status
    # Steps left, not trials left: m=16 makes 32 steps, m=64 8 each: 32+32+8+8 = 80.
    assert "(80 steps left;" in status
    # Measured at m=4 only: 0.1 s/step, scaled to m=16 and 64 by the documented shape.
    times = sweep._step_times()
    assert times.source("batch", 4) == "measured" and times.source("batch", 16) == "scaled"


def test_sweep_eta_uses_the_running_trials_rate_for_its_m(tmp_path):
    sweep, _, _ = _sweep(tmp_path, [], sizes=(16,), rates=(-8, -6, -4))
    sweep._current = sweep.valid[0][0]
    eta = sweep.remaining_seconds(0.5)  # two more m=16 trials of 32 steps at 0.5 s
    assert eta == pytest.approx(2 * (32 * 0.5 + cost.DOCUMENTED_TRIAL_OVERHEAD_S))


# ---------------------------------------------------------------------- a real run
def test_a_run_logs_its_start_summary_and_progress_and_traces_its_step_once(tmp_path,
                                                                          caplog):
    import keras

    from sbt_keras.train import train

    class Traces(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.count = self.model.train_function.experimental_get_tracing_count()

    traces = Traces()
    progress.configure(every_seconds=1e-9)  # a line at every block
    caplog.set_level(logging.INFO)
    try:
        train(tiny(tmp_path), extra_callbacks=[traces])
    finally:
        progress.configure()
    text = caplog.text
    assert "resnet8, norm batch: 75,770 parameters" in text
    assert "data: synthetic (random images), 64 train / 40 test, 8×8×3" in text
    assert "m = 8, η̃ = 2⁻⁶ = 0.015625, η = m·η̃ = 0.125" in text and "BN batch 8" in text
    assert "8 steps/epoch × 3 epochs = 24 steps (lr × 0.1 at steps 12, 18)" in text
    assert "epoch 3/3  step 8/8  " in text and "steps/s" in text
    assert traces.count == 1  # so a sweep's "retracing" warning is about new trials only


# ---------------------------------------------------------------------- dry run
def test_dry_run_lists_every_point_with_its_cost_and_imports_no_tensorflow(tmp_path):
    code = ("import sys; from sbt_keras import run\n"
            "try:\n    run.entry()\nfinally:\n"
            "    print('tensorflow imported:', 'tensorflow' in sys.modules)\n")
    argv = ["--dataset=synthetic", "--model=resnet8", "--epochs=2", "--median_of=1",
            "--grid_batch_size=4,64", "--grid_log2_base_lr=-8,-6", "--grid_bn_batch_size=8",
            "--log2_base_lr=-8", f"--output_dir={tmp_path / 'sweep'}", "--dry_run"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "tensorflow imported: False" in out
    assert re.search(r"m64_lr-8_bn8 +valid +32 ", out)  # 1024 / 64 x 2 epochs
    assert re.search(r"m4_lr-8_bn8 +skipped +— +--batch_size=4 is not divisible by --bn_batch_size=8", out)
    assert "2 valid (0 finished), 2 skipped: 64 steps to run, ~" in out
    assert not (tmp_path / "sweep").exists()


def test_dry_run_of_one_run_prints_its_settings_and_cost(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sbt_keras.run", "--flagfile=experiments/cifar10.flags",
         f"--output_dir={tmp_path / 'run'}", "--dry_run"], cwd=REPO, env=ENV,
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    settings = yaml.safe_load(proc.stdout.split("\n\n")[1])
    assert settings["model"] == "resnet32" and settings["epochs"] == 82
    assert "steps: 6,250 per epoch × 82 epochs = 512,500" in proc.stdout
    assert "output_dir: new" in proc.stdout and "estimated time: ~" in proc.stdout


# ---------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset=synthetic", "--model=resnet8", "--image_size=8",
            "--synthetic_train=64", "--synthetic_test=16", "--batch_size=8",
            "--log2_base_lr=-6", "--epochs=500", "--median_of=1", "--eval_batch_size=16",
            f"--output_dir={out}", "--progress_seconds=0"]
    proc = subprocess.Popen([sys.executable, "-m", "sbt_keras.run", *argv], cwd=REPO,
                            env=ENV,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # wait until it trains
        seen.append(line)
        if line.startswith("epoch 1/500"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read().splitlines()
    assert proc.wait(timeout=60) == 130
    assert not any("Traceback" in line for line in seen + rest)
    assert rest[-1] == console.interrupted_line(["run", *argv]), rest
    assert yaml.safe_load((out / "result.yaml").read_text())["status"] == "interrupted"
    # TensorFlow's start-up on this CPU-only machine printed nothing of its own.
    assert not any("cuInit" in line or "InitializeLog" in line for line in seen), seen[:5]


# ---------------------------------------------------------------------- output dirs
def test_a_directory_whose_run_never_trained_does_not_block_the_corrected_command(tmp_path):
    failed = tiny(tmp_path, train_examples=48)  # say, the full data set was meant
    out = pathlib.Path(failed.output_dir)
    results.write_yaml(str(out / "config.yaml"), {**failed.to_dict(),
                                                  "derived": {"num_train": 50000}})
    results.write_yaml(str(out / "result.yaml"), {"status": "failed", "error": "offline"})
    fixed = tiny(tmp_path)
    stored = resume.stored_config(fixed.output_dir)
    assert resume.check_output_dir(fixed, fixed.data_info(), stored) is None
    # Once it has trained (a history row), the same difference is refused.
    results.write_csv(str(out / "history.csv"), [{"epoch": 1, "step": 8}], ("epoch", "step"))
    with pytest.raises(Exception, match="holds a different run"):
        resume.check_output_dir(fixed, fixed.data_info(), stored)
