"""Grids: parsing, skipping, a 2x2 keras-tuner sweep, resume, extension and refusal."""
import math
import os
import pathlib
import statistics
import subprocess
import sys

import keras
import pytest

from sbt_keras import grid as grid_lib
from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras import sweep
from sbt_keras.sweep import run_sweep
from sbt_keras.config import EXECUTION_FIELDS


def test_lists_and_ranges():
    assert grid_lib.parse_axis("batch_size", "2,8,32") == [2, 8, 32]
    assert grid_lib.parse_axis("batch_size", "2:2048") == [2 ** k for k in range(1, 12)]
    assert grid_lib.parse_axis("log2_base_lr", "-12:0") == [float(k) for k in range(-12, 1)]
    assert grid_lib.parse_axis("log2_base_lr", "-2:-1:0.5") == [-2.0, -1.5, -1.0]
    assert grid_lib.parse_axis("epochs", "41,82,164") == [41, 82, 164]
    assert grid_lib.parse_axis("epochs", "") == []


@pytest.mark.parametrize("flag,text,words", [
    ("batch_size", "2,,8", "empty item"),
    ("batch_size", "2,x", "not an integer"),
    ("batch_size", "3:64", "3 is not a power of two"),
    ("batch_size", "2:48", "48 is not a power of two"),
    ("batch_size", "64:2", "START must not exceed END"),
    ("log2_base_lr", "-1:0:0.3", "does not reach END"),
    ("log2_base_lr", "a:b", "not a number"),
    ("log2_base_lr", "1:2:3:4", "not a range"),
    ("bn_batch_size", "2,2", "repeats"),
    ("batch_size", "0,4", "0 is not positive"),
    ("bn_batch_size", "-2,4", "-2 is not positive"),
    ("bn_batch_size", "0", "0 is not positive"),
    ("epochs", "0,82", "0 is not positive"),
    ("epochs", "-1:3", "-1 is not positive"),
])
def test_malformed_grids_are_rejected(flag, text, words):
    with pytest.raises(ConfigError, match=f"--grid_{flag}.*{words}"):
        grid_lib.parse_axis(flag, text)


REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_non_positive_grid_value_stops_the_command_before_training(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "sbt_keras.run", "--dataset=synthetic", "--model=resnet8",
         "--log2_base_lr=-6", "--grid_batch_size=0,4", f"--output_dir={out}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --grid_batch_size=0,4: 0 is not positive; every batch_size in a grid must "
        "be >= 1"]
    assert not out.exists()  # not a skipped point: nothing ran


def _base(tmp_path, **overrides):
    values = dict(model="resnet8", norm="batch", dataset="synthetic", image_size=8,
                  synthetic_train=32, synthetic_test=16, epochs=2, median_of=1,
                  eval_batch_size=16, deterministic=True, output_dir=str(tmp_path / "sweep"))
    values.update(overrides)
    return Config(**values)


def _grid(base, **texts):
    return grid_lib.Grid.from_flags(base, texts, seeds=texts.pop("seeds", 1))


def test_invalid_points_are_skipped_and_an_empty_grid_refused(tmp_path):
    base = _base(tmp_path)
    grid = _grid(base, batch_size="2,4", bn_batch_size="4", log2_base_lr="-6")
    valid, skipped = grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name))
    assert [p.name for p, _ in valid] == ["m4_lr-6_bn4"]
    assert [p.name for p, _ in skipped] == ["m2_lr-6_bn4"]
    assert "--batch_size=2 is not divisible by --bn_batch_size=4" in skipped[0][1]
    with pytest.raises(ConfigError, match="no valid point"):
        grid_lib.split_points(base, _grid(base, batch_size="2", bn_batch_size="4",
                                          log2_base_lr="-6"), lambda p: "x")


def test_points_the_replicas_cannot_split_are_skipped(tmp_path):
    # On 8 replicas (a TPU v3-8, 8 GPUs): m = 4 cannot be split, m = 16 with BN over 4
    # cannot either (2 per replica); the sweep runs the rest instead of failing trials.
    base = _base(tmp_path)
    grid = _grid(base, batch_size="4,16,32", bn_batch_size="4", log2_base_lr="-6")
    valid, skipped = grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name),
                                           replicas=8)
    assert [p.name for p, _ in valid] == ["m32_lr-6_bn4"]
    reasons = dict((p.name, reason) for p, reason in skipped)
    assert "is not divisible by the 8 replicas" in reasons["m4_lr-6_bn4"]
    assert "does not divide the per-replica batch 2" in reasons["m16_lr-6_bn4"]
    valid, _ = grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name))
    assert len(valid) == 3  # one replica: all fit


def test_a_single_run_directory_is_refused_for_a_sweep(tmp_path):
    base = _base(tmp_path)
    out = pathlib.Path(base.output_dir)
    out.mkdir()
    (out / "config.yaml").write_text("model: resnet8\n")
    with pytest.raises(ConfigError, match="holds a single run, not a sweep"):
        run_sweep(base, _grid(base, batch_size="4", log2_base_lr="-6"))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_local_workers_get_one_gpu_each_and_the_chief_none():
    envs = sweep.worker_environments(3, 8000, gpus=["0", "1"])
    assert [e["KERASTUNER_TUNER_ID"] for e in envs] == ["chief", "worker0", "worker1",
                                                         "worker2"]
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in envs] == ["", "0", "1", "0"]
    assert all(e["KERASTUNER_ORACLE_PORT"] == "8000" for e in envs)
    shared = sweep.worker_environments(2, 8000, gpus=["0"])  # one GPU: shared by all
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in shared] == ["", None, None]
    cpu = sweep.worker_environments(2, 8000, gpus=[])
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in cpu)


def test_seeds_become_an_axis(tmp_path):
    base = _base(tmp_path, seed=3)
    grid = grid_lib.Grid.from_flags(base, {"batch_size": "4"}, seeds=2)
    assert [p.name for p in grid.points()] == ["m4_s3", "m4_s4"]
    with pytest.raises(ConfigError, match="--seeds=0"):
        grid_lib.Grid.from_flags(base, {}, seeds=0)


class _Interrupt(BaseException):
    """Like Ctrl-C: keras-tuner does not catch it, so the sweep stops."""


def _table(output_dir):
    rows = results.read_csv(pathlib.Path(output_dir) / "results.csv")
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


def _count_fits(monkeypatch):
    calls = []
    original = keras.Model.fit

    def counting_fit(self, *args, **kwargs):
        calls.append(kwargs.get("initial_epoch", 0))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", counting_fit)
    return calls


def test_two_by_two_sweep_then_resume_after_an_interrupted_trial(tmp_path, monkeypatch):
    texts = dict(batch_size="4,8", log2_base_lr="-6,-5")
    reference = _base(tmp_path, output_dir=str(tmp_path / "reference"))
    rows = run_sweep(reference, _grid(reference, **texts))
    assert [(r["batch_size"], r["log2_base_lr"]) for r in rows] == [
        (4, -6.0), (4, -5.0), (8, -6.0), (8, -5.0)]
    assert all(r["status"] == "completed" for r in rows)
    table = _table(reference.output_dir)
    assert len(table) == 4
    for r in table:  # each trial has its own full run directory
        trial = pathlib.Path(reference.output_dir) / r["trial_dir"]
        assert (trial / "result.yaml").exists() and (trial / "history.csv").exists()
    assert any(p.name.startswith("events") for p in pathlib.Path(reference.output_dir).iterdir())

    # Interrupt the third trial (m=8, lr=-6: the first with 32/8 = 4 steps per epoch) at
    # the end of its first epoch, after its checkpoint, like Ctrl-C.
    class StopThirdTrial(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and self.params.get("steps") == 4:
                raise _Interrupt()

    base = _base(tmp_path)
    with pytest.raises(_Interrupt):
        run_sweep(base, _grid(base, **texts), extra_callbacks=[StopThirdTrial()])
    partial = _table(base.output_dir)
    assert [r["status"] for r in partial] == ["completed", "completed"]

    calls = _count_fits(monkeypatch)
    run_sweep(base, _grid(base, **texts))
    # Only the interrupted trial (resumed at epoch 1) and the untouched fourth one train.
    assert calls == [1, 0]
    assert _table(base.output_dir) == table  # same numbers as the uninterrupted sweep


def test_keras_tuner_state_is_written_atomically(tmp_path, monkeypatch):
    # keras-tuner's own save_json writes in place; a kill mid-write would leave truncated
    # JSON that stops the resume. Every state file must go through temp file + rename.
    from keras_tuner.src import utils as kt_utils

    def in_place(path, obj):
        raise AssertionError(f"non-atomic keras-tuner write of {path}")

    monkeypatch.setattr(kt_utils, "save_json", in_place)
    written = []
    atomic = results.write_text_atomic
    monkeypatch.setattr(results, "write_text_atomic",
                        lambda path, text: (written.append(path), atomic(path, text)))
    base = _base(tmp_path)
    rows = run_sweep(base, _grid(base, batch_size="4,8", log2_base_lr="-6"))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    names = {pathlib.Path(p).name for p in written}
    assert {"oracle.json", "trial.json", "tuner0.json"} <= names, names
    run_sweep(base, _grid(base, batch_size="4,8", log2_base_lr="-6"))  # resumes from them


def test_extension_and_refusal(tmp_path, monkeypatch):
    base = _base(tmp_path)
    run_sweep(base, _grid(base, batch_size="4", log2_base_lr="-6"))
    calls = _count_fits(monkeypatch)
    rows = run_sweep(base, _grid(base, batch_size="4,8", log2_base_lr="-6"))
    assert calls == [0]  # only the new point m=8 trains
    assert [r["batch_size"] for r in rows] == [4, 8]
    stored = results.read_yaml(pathlib.Path(base.output_dir) / "sweep.yaml")
    assert stored["grid"]["batch_size"] == [4, 8]
    other = _base(tmp_path, model="resnet20")
    with pytest.raises(ConfigError, match="holds a sweep with other settings .*model"):
        run_sweep(other, _grid(other, batch_size="4", log2_base_lr="-6"))


@pytest.mark.parametrize("change, named", [
    (dict(log2_base_lr=-2), "log2_base_lr: -6.0 -> -2.0"),
    (dict(seed=1), "seed: 0 -> 1"),
    (dict(train_examples=16), "train_examples: 0 -> 16"),
    (dict(test_examples=8), "test_examples: 0 -> 8"),
    (dict(log2_base_lr=-2, seed=1), "log2_base_lr: -6.0 -> -2.0, seed: 0 -> 1"),
])
def test_a_changed_fixed_setting_is_refused_not_answered_with_old_rows(tmp_path, change,
                                                                       named):
    base = _base(tmp_path, log2_base_lr=-6)
    run_sweep(base, _grid(base, batch_size="4"))
    other = _base(tmp_path, **{"log2_base_lr": -6, **change})
    with pytest.raises(ConfigError, match=f"holds a sweep with other settings \\({named}\\)"):
        run_sweep(other, _grid(other, batch_size="4"))


def test_what_a_sweep_directory_is_compared_on(tmp_path):
    base = _base(tmp_path, log2_base_lr=-6)
    fixed = sweep._comparable(base, _grid(base, batch_size="4"))
    assert fixed["log2_base_lr"] == -6 and "base_lr" not in fixed and fixed["seed"] == 0
    assert {"train_examples", "test_examples", "model", "epochs"} <= set(fixed)
    assert not set(fixed) & EXECUTION_FIELDS  # output_dir, eval_batch_size, ...: not results
    assert "batch_size" not in fixed  # swept
    # The same rate given as --base_lr compares equal; a swept rate or seed is not fixed.
    same = _base(tmp_path, base_lr=2.0 ** -6)
    assert sweep._comparable(same, _grid(same, batch_size="4")) == fixed
    swept = sweep._comparable(base, _grid(base, batch_size="4", log2_base_lr="-6,-5",
                                          seeds=2))
    assert not {"log2_base_lr", "base_lr", "seed"} & set(swept)


def test_extending_a_best_lr_sweep_keeps_its_rates_and_skipped_points(tmp_path):
    earlier = tmp_path / "fig08"
    columns = ("batch_size", "log2_base_lr", "status", "test_accuracy")
    results.write_csv(earlier / "results.csv", [
        {"batch_size": 4, "log2_base_lr": -5, "status": "completed", "test_accuracy": 0.7},
        {"batch_size": 8, "log2_base_lr": -7, "status": "completed", "test_accuracy": 0.6},
    ], columns)
    base = _base(tmp_path)

    def best_lr_grid(batch_sizes, bn_batch_sizes):
        return grid_lib.Grid.from_flags(base, {"batch_size": batch_sizes,
                                               "bn_batch_size": bn_batch_sizes}, 1,
                                        best_lr_from=str(earlier))

    run_sweep(base, best_lr_grid("4", "2,8"))  # m4_lr-5_bn8 is skipped
    rows = run_sweep(base, best_lr_grid("4,8", "2"))  # extension: only m8_lr-7_bn2 is new
    assert [(r["trial"], r["status"]) for r in rows] == [
        ("m4_lr-5_bn2", "completed"), ("m4_lr-5_bn8", "skipped"),
        ("m8_lr-7_bn2", "completed")]
    stored = results.read_yaml(pathlib.Path(base.output_dir) / "sweep.yaml")
    assert stored["grid"]["best_log2_base_lr"] == {4: -5.0, 8: -7.0}  # a mapping, not [4, 8]
    assert list(stored["skipped"]) == ["m4_lr-5_bn8"]
    # HParams shows eta_tilde as a trial setting, not the {m: rate} mapping.
    assert sweep._hparam_domains(stored["grid"]) == {
        "batch_size": [4, 8], "bn_batch_size": [2, 8], "log2_base_lr": [-7.0, -5.0]}

    # The earlier sweep was extended and m=4 is now best elsewhere: two rates for one m
    # would be drawn as one curve, so refuse.
    results.write_csv(earlier / "results.csv", [
        {"batch_size": 4, "log2_base_lr": -6, "status": "completed", "test_accuracy": 0.8},
    ], columns)
    with pytest.raises(ConfigError, match="ran batch_size 4 at log2_base_lr -5.0, but "
                                          "--grid_best_lr_from now gives -6.0"):
        run_sweep(base, best_lr_grid("4", "2"))


def test_median_of_final_five_by_hand():
    accuracies = [0.10, 0.30, 0.62, 0.60, 0.64, 0.61, 0.63]
    # The last 5 sorted: 0.60, 0.61, 0.62, 0.63, 0.64 -> 0.62.
    assert results.median_of_final(accuracies, 5) == 0.62
    assert results.median_of_final(accuracies, 5) == statistics.median(accuracies[-5:])
    # One epoch at chance (0.1, a loss spike the run recovered from) among the final five:
    # sorted 0.1, 0.61, 0.62, 0.63, 0.64 -> still 0.62; a mean would say 0.52.
    spiky = [0.50, 0.62, 0.10, 0.64, 0.61, 0.63]
    assert results.median_of_final(spiky, 5) == statistics.median(spiky[-5:]) == 0.62
    # A NaN among them has no place in the order: the median is NaN, not an arbitrary pick
    # (statistics.median says 0.62 for the second order and NaN for the first).
    assert math.isnan(results.median_of_final([0.6, 0.62, float("nan"), 0.64, 0.61], 5))
    assert math.isnan(results.median_of_final([0.6, 0.62, 0.64, 0.61, float("nan")], 5))
    with pytest.raises(ValueError, match="need 5 epochs"):
        results.median_of_final([0.5, 0.6], 5)


def test_a_diverged_run_is_reported_at_chance_not_its_median():
    from sbt_keras.results import summarize
    cfg = _base(pathlib.Path("."), median_of=5)
    rows = [dict(epoch=e, step=e, train_loss=1.0, test_accuracy=a)
            for e, a in enumerate([0.5, 0.6, 0.62, 0.64, 0.61], 1)]
    assert summarize(rows, cfg, 10)["test_accuracy"] == 0.61  # 0.5 0.6 [0.61] 0.62 0.64
    rows[-1]["train_loss"] = float("nan")
    result = summarize(rows, cfg, 10)
    assert result["status"] == "diverged" and result["test_accuracy"] == 0.1


def test_diverged_and_skipped_trials_are_rows(tmp_path):
    base = _base(tmp_path, norm="none", epochs=3)
    rows = run_sweep(base, _grid(base, batch_size="4", log2_base_lr="-6,4",
                                 bn_batch_size=""))
    status = {r["log2_base_lr"]: r["status"] for r in rows}
    assert status == {-6.0: "completed", 4.0: "diverged"}
    diverged = [r for r in rows if r["status"] == "diverged"][0]
    assert diverged["test_accuracy"] == pytest.approx(0.1)

    base = _base(tmp_path, output_dir=str(tmp_path / "with_skips"))
    rows = run_sweep(base, _grid(base, batch_size="2,4", bn_batch_size="4",
                                 log2_base_lr="-6"))
    assert [(r["trial"], r["status"]) for r in rows] == [
        ("m2_lr-6_bn4", "skipped"), ("m4_lr-6_bn4", "completed")]


def test_best_lr_from_an_earlier_sweep(tmp_path):
    earlier = tmp_path / "fig08"
    results.write_csv(earlier / "results.csv", [
        {"batch_size": 4, "log2_base_lr": -6, "status": "completed", "test_accuracy": 0.5},
        {"batch_size": 4, "log2_base_lr": -5, "status": "completed", "test_accuracy": 0.7},
        {"batch_size": 8, "log2_base_lr": -5, "status": "completed", "test_accuracy": 0.4},
        {"batch_size": 8, "log2_base_lr": -4, "status": "diverged", "test_accuracy": 0.9},
        {"batch_size": 8, "log2_base_lr": -7, "status": "completed", "test_accuracy": 0.6},
    ], ("batch_size", "log2_base_lr", "status", "test_accuracy"))
    base = _base(tmp_path)
    grid = grid_lib.Grid.from_flags(base, {"batch_size": "4,8", "bn_batch_size": "2,4"},
                                    seeds=1, best_lr_from=str(earlier))
    assert [p.name for p in grid.points()] == [
        "m4_lr-5_bn2", "m4_lr-5_bn4", "m8_lr-7_bn2", "m8_lr-7_bn4"]
    with pytest.raises(ConfigError, match="no completed trial with batch_size 16"):
        grid_lib.Grid.from_flags(base, {"batch_size": "16"}, 1, best_lr_from=str(earlier))
    with pytest.raises(ConfigError, match="drop --grid_log2_base_lr"):
        grid_lib.Grid.from_flags(base, {"log2_base_lr": "-3"}, 1, best_lr_from=str(earlier))
    rows = run_sweep(base, grid_lib.Grid.from_flags(base, {"batch_size": "4",
                                                           "bn_batch_size": "2"}, 1,
                                                    best_lr_from=str(earlier)))
    assert [(r["trial"], r["log2_base_lr"]) for r in rows] == [("m4_lr-5_bn2", -5.0)]


def _parse_sweep_flags(argv):
    from absl import flags as absl_flags

    from sbt_keras import flags as run_flags
    fv = absl_flags.FlagValues()
    run_flags.define_flags(fv)
    run_flags.define_sweep_flags(fv)
    fv(["prog"] + argv)
    return fv


FIGURES = REPO / "experiments/figures"
# No ImageNet here: its grids expand over stand-in data of the same kind of size.
IMAGENET_STANDIN = ("--dataset=synthetic", "--synthetic_train=4096")
# The m x eta_tilde figures on CIFAR: 2..2048 x 2^-12..2^0.
M_BY_LR_FIGURES = ["fig01", "fig02", "fig03", "fig05", "fig06", "fig07", "fig08", "fig09",
                   "fig10", "fig11", "fig17", "fig18"]
FIXED_RATE_FIGURES = [("fig14_large", -10, 1024), ("fig14_2048", -9, 2048)]  # §3.6, m > 128
# Each m at the eta_tilde that was best for it in an earlier sweep (--grid_best_lr_from).
BEST_LR_FIGURES = [("fig13", ()), ("fig13_cifar100", ()), ("fig14", IMAGENET_STANDIN)]


@pytest.fixture
def earlier_sweep(tmp_path):
    """--grid_best_lr_from pointing at a finished sweep whose best rate is 2^-8 for every m."""
    earlier = tmp_path / "earlier"
    results.write_csv(earlier / "results.csv", [
        {"batch_size": 2 ** k, "log2_base_lr": -8, "status": "completed",
         "test_accuracy": 0.5} for k in range(1, 12)],
        ("batch_size", "log2_base_lr", "status", "test_accuracy"))
    return f"--grid_best_lr_from={earlier}"


def _expand_figure(stem, tmp_path, *extra_flags):
    """(base config, grid axes, valid points, skipped points) of a figure's flagfile."""
    from sbt_keras import flags as run_flags
    fv = _parse_sweep_flags([f"--flagfile={FIGURES / stem}.flags",
                             f"--output_dir={tmp_path / 'out'}", *extra_flags])
    base = run_flags.config_from_flags(fv)
    grid = grid_lib.Grid.from_flags(base, run_flags.grid_texts_from_flags(fv), fv.seeds,
                                    fv.grid_best_lr_from)
    valid, skipped = grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name))
    return base, dict(grid.axes), valid, skipped


def test_every_figure_flagfile_is_checked():
    checked = (M_BY_LR_FIGURES + ["fig04", "fig12", "norms", "fig08_gns"]
               + [stem for stem, _, _ in FIXED_RATE_FIGURES]
               + [stem for stem, _ in BEST_LR_FIGURES])
    assert sorted(checked) == sorted(p.stem for p in FIGURES.glob("*.flags"))


@pytest.mark.parametrize("stem", M_BY_LR_FIGURES)
def test_m_by_lr_figure_flagfiles_expand_to_the_papers_grid(stem, tmp_path):
    _, axes, valid, skipped = _expand_figure(stem, tmp_path)
    assert axes["batch_size"] == tuple(2 ** k for k in range(1, 12))
    assert axes["log2_base_lr"] == tuple(float(k) for k in range(-12, 1))
    assert len(valid) == 143 and not skipped


def test_fig12_flagfile_expands_to_4_to_256_by_the_papers_rates_over_two_seeds(tmp_path):
    base, axes, valid, skipped = _expand_figure("fig12", tmp_path, *IMAGENET_STANDIN)
    assert axes["log2_base_lr"] == tuple(float(k) for k in range(-12, 1))  # §3.1
    assert len(valid) == 7 * 13 * 2 and not skipped
    assert base.epochs == 90 and base.lr_decay_epochs == (30, 60, 80)


@pytest.mark.parametrize("stem, rate, largest", FIXED_RATE_FIGURES)
def test_large_batch_fig14_flagfiles_use_the_papers_fixed_rates(stem, rate, largest,
                                                                tmp_path):
    base, axes, valid, skipped = _expand_figure(stem, tmp_path, *IMAGENET_STANDIN)
    assert base.log2_base_lr == rate
    assert max(axes["batch_size"]) == largest
    assert len(valid) == len(axes["batch_size"]) * 4 and not skipped


def test_fig04_flagfile_expands(tmp_path):
    _, _, valid, _ = _expand_figure("fig04", tmp_path)
    assert valid


@pytest.mark.parametrize("stem, data", BEST_LR_FIGURES)
def test_best_lr_figure_flagfiles_expand(stem, data, tmp_path, earlier_sweep):
    _, _, valid, _ = _expand_figure(stem, tmp_path, *data, earlier_sweep)
    assert valid


def test_the_normalization_study_flagfile_expands_to_every_norm_m_and_rate(tmp_path):
    base, axes, valid, skipped = _expand_figure("norms", tmp_path)
    assert axes["norm"] == ("batch", "group", "layer", "instance", "mix")
    assert axes["batch_size"] == tuple(2 ** k for k in range(1, 11))
    assert axes["log2_base_lr"] == tuple(float(k) for k in range(-12, 1))
    assert len(valid) == 5 * 10 * 13 and not skipped
    assert (base.model, base.augment, base.epochs) == ("resnet32", True, 82)
    group = [cfg for p, cfg in valid if p.as_dict()["norm"] == "group"][0]
    assert group.gn_groups == 16  # 32 groups cannot split ResNet-32's 16-channel layers


def test_fig08_with_gradient_noise_needs_replicas_for_whole_batch_bn(tmp_path):
    # BN over the whole batch: halving a batch would cut its one BN group, so the noise
    # comes from the replicas' gradients; on one device every point is refused.
    from sbt_keras import flags as run_flags
    fv = _parse_sweep_flags([f"--flagfile={FIGURES / 'fig08_gns'}.flags",
                             f"--output_dir={tmp_path / 'out'}"])
    base = run_flags.config_from_flags(fv)
    grid = grid_lib.Grid.from_flags(base, run_flags.grid_texts_from_flags(fv), fv.seeds)
    valid, skipped = grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name),
                                           replicas=2)
    assert len(valid) == 143 and not skipped and base.gns_every_steps == 32
    with pytest.raises(ConfigError, match="a split that breaks a BN group"):
        grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name))
