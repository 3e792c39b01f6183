"""tools/noise.py: lists, one-line errors, and one small end-to-end measurement.

The end-to-end test measures a real Snapshot (a resolved synthetic Config, its data and a
SummedGradientModel) whose network is a tiny conv net with sub-batch BN, so it runs in
about a second; loading from checkpoints is snapshot.load's own business
(tests/test_snapshot.py).
"""
import csv
import os
import subprocess
import sys

import keras
import pytest
from absl import flags

from sbt_keras import models, results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.layers.subbatch_norm import SubBatchNormalization
from sbt_keras.training import snapshot
from sbt_keras.training.summed_sgd import SummedGradientModel
from tools import noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lists_parse_and_bad_lists_are_one_line():
    assert noise.parse_sizes("2:16", "batch_sizes") == (2, 4, 8, 16)
    assert noise.parse_sizes("24,2:4,3", "batch_sizes") == (2, 3, 4, 24)
    assert noise.parse_sizes("", "staleness_m", allow_empty=True) == ()
    assert noise.parse_rates("2^-8,0.5,2**-1", "staleness_lrs") == (2.0 ** -8, 0.5)
    assert noise.parse_epochs("20,0,10") == (0, 10, 20)
    bad = [(noise.parse_sizes, ("2:1000", "batch_sizes"), "powers of two"),
           (noise.parse_sizes, ("8:2", "batch_sizes"), "powers of two"),
           (noise.parse_sizes, ("2,x", "batch_sizes"), "'x' is not an integer"),
           (noise.parse_sizes, ("4,,8", "batch_sizes"), "without empty entries"),
           (noise.parse_sizes, ("0,2", "staleness_n"), "positive integer"),
           (noise.parse_sizes, ("", "batch_sizes"), "without empty entries"),
           (noise.parse_rates, ("0.1,-2", "staleness_lrs"), "not a positive learning rate"),
           (noise.parse_rates, ("2^x", "staleness_lrs"), "not a positive learning rate"),
           (noise.parse_epochs, ("-1",), "epoch number >= 0")]
    for fn, args, message in bad:
        with pytest.raises(ConfigError, match=message):
            fn(*args)


def test_flags_become_settings():
    fv = flags.FlagValues()
    noise.define_flags(fv)
    fv(["noise", "--run=r", "--epochs=0,10", "--batch_sizes=2:8", "--staleness_n=1,2",
        "--staleness_lrs=2^-6"])
    s = noise.settings_from_flags(fv)
    assert (s.run, s.epochs, s.batch_sizes, s.staleness_n) == ("r", (0, 10), (2, 4, 8),
                                                               (1, 2))
    assert s.staleness_lrs == (2.0 ** -6,) and s.staleness_m == () and s.sample == 1024


def test_command_line_errors_exit_2_with_one_line(tmp_path):
    def noise_cli(*args):
        return subprocess.run([sys.executable, "-m", "tools.noise", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    done = noise_cli(f"--run={tmp_path}", "--batch_sizes=2,,4")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --batch_sizes=2,,4: give a comma-separated list without empty entries"]
    done = noise_cli(f"--run={tmp_path}")
    assert done.returncode == 2 and "holds no config.yaml" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _config(tmp_path):
    cfg = Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=48,
                 synthetic_test=16, batch_size=8, base_lr=2.0 ** -6, epochs=2, median_of=1,
                 eval_batch_size=8, output_dir=str(tmp_path / "run")).resolve()
    derived = {"steps_per_epoch": 6, "bn_batch_size": 4}
    results.write_yaml(os.path.join(cfg.output_dir, results.CONFIG_FILE),
                       {**cfg.to_dict(), "derived": derived})
    return cfg, derived


def _tiny_snapshot(cfg, derived):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = SubBatchNormalization(bn_batch_size=derived["bn_batch_size"])(h)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(h))
    network = keras.Model(inputs, keras.layers.Dense(10)(h))
    model = SummedGradientModel(network, weight_decay=cfg.weight_decay,
                                decayed_variables=models.decayed_variables(network))
    return snapshot.Snapshot(run_dir=cfg.output_dir, cfg=cfg, derived=derived,
                             network=network, model=model, step=6, checkpoint="")


def test_run_without_checkpoints_and_oversized_batches_exit_2(tmp_path, capsys):
    cfg, _ = _config(tmp_path)
    settings = noise.Settings(run=cfg.output_dir, sample=32, batch_sizes=(2, 4),
                              staleness_n=())
    assert noise.cli(lambda: settings, log=lambda *_: None) == 2  # the real snapshot.load
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {cfg.output_dir} holds no checkpoint; train it first (or re-run it to "
        f"resume)"]
    too_big = noise.Settings(run=cfg.output_dir, sample=32, batch_sizes=(2, 64))
    assert noise.cli(lambda: too_big, log=lambda *_: None) == 2
    assert "m=64 is larger than --sample=32" in capsys.readouterr().err
    stale = noise.Settings(run=cfg.output_dir, sample=32, batch_sizes=(2,),
                           staleness_n=(1, 8), staleness_m=(8,))
    assert noise.cli(lambda: stale, log=lambda *_: None) == 2
    assert "n*m = 8*8 = 64 examples are larger than --sample=32" in capsys.readouterr().err
    bad_format = noise.Settings(run=cfg.output_dir, sample=32, batch_sizes=(2,),
                              staleness_n=(), formats=("jpg",))
    assert noise.cli(lambda: bad_format, log=lambda *_: None) == 2
    assert "'jpg' is not one of png, svg, pdf" in capsys.readouterr().err


def test_end_to_end_tables_and_cost_first(tmp_path):
    cfg, derived = _config(tmp_path)
    snap = _tiny_snapshot(cfg, derived)
    before = [v.numpy().copy() for v in snap.network.weights]
    lines = []
    settings = noise.Settings(run=cfg.output_dir, sample=32, batch_sizes=(2, 4, 8, 16, 32),
                              draws=200, chunk_size=16, staleness_n=(1, 2, 4),
                              staleness_m=(4, 8), staleness_lrs=(2.0 ** -6, 2.0 ** -4),
                              out=str(tmp_path / "noise"), formats=())  # figures: below
    paths = noise.run(settings, load=lambda run, epoch=None: snap, log=lines.append)
    assert lines[0].startswith("cost per epoch (x1 epochs): N = 32 examples, P = ")
    assert "(1 + 2 rates) x max n 4 x m in [4, 8] = 144 example" in lines[0]
    for name in ("gradient_stats.csv", "update_variance.csv", "staleness.csv"):
        assert str(tmp_path / "noise" / name) in paths and os.path.getsize(
            tmp_path / "noise" / name) > 0
    for a, b in zip(before, snap.network.weights):
        assert (a == b.numpy()).all()

    def rows(name):
        with open(tmp_path / "noise" / name) as f:
            return list(csv.DictReader(f))

    (stats,) = rows("gradient_stats.csv")
    # The run's schedule at step 6 of 12: decayed x0.1 at 50% (in float32, as it runs).
    lr = float(stats["lr"])
    assert lr == pytest.approx(0.1 * 2.0 ** -6, rel=1e-6) and stats["sample"] == "32"
    trace = float(stats["trace_sigma1"])
    assert float(stats["b_simple"]) == pytest.approx(trace / float(stats["mean_grad_sq"]))
    variance = rows("update_variance.csv")
    assert [int(r["m"]) for r in variance] == [2, 4, 8, 16, 32]
    for r in variance:
        m = int(r["m"])
        assert float(r["closed_with"]) == pytest.approx(lr ** 2 * m * trace)
        assert float(r["closed_without"]) == pytest.approx(lr ** 2 * m * (32 - m) / 31 * trace,
                                                           abs=1e-30)
    assert float(variance[-1]["measured_without"]) == 0.0  # m = N: always the whole sample
    assert 0.7 < float(stats["slope_with"]) < 1.3
    staleness = rows("staleness.csv")
    assert len(staleness) == 2 * 2 * 3  # m x lr x n
    for r in staleness:
        assert float(r["nm_lr"]) == pytest.approx(int(r["n"]) * int(r["m"]) * float(r["lr"]))
        assert (float(r["ratio"]) == 0) == (r["n"] == "1")


def test_a_bn_batch_that_does_not_divide_the_staleness_batch_is_refused(tmp_path, capsys):
    cfg, derived = _config(tmp_path)
    snap = _tiny_snapshot(cfg, derived)
    settings = noise.Settings(run=cfg.output_dir, sample=32, batch_sizes=(2,),
                              staleness_n=(1, 2), staleness_m=(6,))
    assert noise.cli(lambda: settings, load=lambda run, epoch=None: snap,
                     log=lambda *_: None) == 2
    assert "BN batch 4 does not divide m=6: a split that breaks a BN group" in (
        capsys.readouterr().err)


def test_figures_are_written_from_the_tables(tmp_path):
    stats = [dict(epoch=e, sample=32, lr=2.0 ** -6, b_simple=3.0, slope_with=1.0,
                  slope_without=0.8) for e in (0, 10)]
    variance = [dict(epoch=e, m=m, closed_with=1e-4 * m, measured_with=1.1e-4 * m,
                     stderr_with=1e-5 * m, closed_without=1e-4 * m * (32 - m) / 31,
                     measured_without=1e-4 * m * (32 - m) / 31)
                for e in (0, 10) for m in (2, 8, 32)]
    staleness = [dict(epoch=e, m=8, lr=lr, n=n, nm_lr=8 * n * lr, ratio=0.1 * (n - 1) * lr)
                 for e in (0, 10) for lr in (2.0 ** -6, 0.01) for n in (1, 2, 4)]
    paths = noise.plot_update_variance(stats, variance, str(tmp_path / "v"), ("png",))
    paths += noise.plot_staleness(staleness, str(tmp_path / "s"), ("png",))
    assert paths == [str(tmp_path / "v.png"), str(tmp_path / "s.png")]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert noise.lr_label(2.0 ** -6) == "$2^{-6}$" and noise.lr_label(0.01) == "0.01"
