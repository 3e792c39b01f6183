"""Packed trials: K trials as one program give each trial exactly its unpacked run.

Each pack below is compared with the same trials run alone by `train`: histories (every
column but wall time) and the final weights, loaded back through training/snapshot.py as
the instruments load them. With --deterministic they agree to the bit; the assertions
allow float tolerance. K = 3 with warm-up and both decay steps inside the run. The AlexNet
packs and the separate formulation under MirroredStrategy are marked slow (`make test-all`).
"""
import dataclasses
import logging
import pathlib

import numpy as np
import pytest
import yaml

from sbt_keras import grid as grid_lib
from sbt_keras import packing, results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import snapshot
from sbt_keras.training.packed import train_pack

# 16 examples / m = 4: 4 steps per epoch, 2 epochs: warm-up over step 0-1, decay at 4 and 6.
BASE = dict(dataset="synthetic", image_size=8, synthetic_train=16, synthetic_test=8,
            batch_size=4, epochs=2, median_of=1, eval_batch_size=8, deterministic=True,
            warmup=True, warmup_fraction=0.25, log2_base_lr=-6)


def _configs(root, rates, **settings):
    base = Config(**{**BASE, **settings})
    return [dataclasses.replace(base, log2_base_lr=r,
                                output_dir=str(root / f"lr{r:g}")).resolve() for r in rates]


def _alone(cfg, root):
    """The same trial run by itself, in its own directory under `root`."""
    solo = dataclasses.replace(cfg, output_dir=str(root / pathlib.Path(cfg.output_dir).name))
    train(solo)
    return solo.output_dir


def _history(run_dir):
    return [{k: v for k, v in row.items() if k != "wall_seconds"}
            for row in results.read_csv(pathlib.Path(run_dir) / "history.csv")]


def _result(run_dir):
    return yaml.safe_load((pathlib.Path(run_dir) / "result.yaml").read_text())


def assert_same_run(packed_dir, alone_dir, rel=1e-5, weights_atol=1e-6):
    packed, alone = _history(packed_dir), _history(alone_dir)
    assert [r["epoch"] for r in packed] == [r["epoch"] for r in alone]
    for p, a in zip(packed, alone):
        assert p.keys() == a.keys()
        for key in p:
            assert p[key] == pytest.approx(a[key], rel=rel, abs=1e-6, nan_ok=True), (key, p, a)
    ours, theirs = _result(packed_dir), _result(alone_dir)
    for key in ("status", "steps", "epochs_completed", "diverged_at_step"):
        assert ours.get(key) == theirs.get(key), key
    if ours["status"] == "completed":  # a diverged run's weights hold NaN either way
        a, b = snapshot.load(packed_dir), snapshot.load(alone_dir)
        assert a.step == b.step
        for x, y in zip(a.model.variables, b.model.variables):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=rel, atol=weights_atol,
                                       err_msg=x.path)


RATES = [-8, -6, -4]
# Sub-batch BN (2 groups of 2 per batch); checkpoints every 2 steps for the resume test.
SUBBATCH = dict(model="resnet8", norm="batch", bn_batch_size=2, checkpoint_every_steps=2)


@pytest.fixture(scope="module")
def subbatch_alone(tmp_path_factory):
    """The three ResNet-8 sub-batch BN trials, each run alone: {name: run directory}."""
    root = tmp_path_factory.mktemp("alone")
    return {pathlib.Path(c.output_dir).name: _alone(c, root)
            for c in _configs(root / "configs", RATES, **SUBBATCH)}


def _formulation(run_dir):
    return yaml.safe_load((pathlib.Path(run_dir) / "config.yaml").read_text())["derived"][
        "pack_formulation"]


def _check_pack(cfgs, out, alone, **tolerances):
    assert [r["status"] for r in out] == ["completed"] * 3
    for cfg in cfgs:
        assert_same_run(cfg.output_dir, alone[pathlib.Path(cfg.output_dir).name],
                        **tolerances)
    rates = [row["base_lr"] for row in _history(cfgs[2].output_dir)]
    assert rates[0] != rates[1]  # the decay happened inside the run
    assert _result(cfgs[0].output_dir)["pack"] == [pathlib.Path(c.output_dir).name
                                                    for c in cfgs]


def test_packed_resnet8_subbatch_bn_trials_equal_their_runs_alone(tmp_path, subbatch_alone):
    # The separate formulation (auto would fuse these m = 4 trials on a CPU).
    cfgs = _configs(tmp_path / "pack", RATES, **SUBBATCH, pack_formulation="separate")
    _check_pack(cfgs, train_pack(cfgs), subbatch_alone)
    assert {_formulation(c.output_dir) for c in cfgs} == {"separate"}


@pytest.fixture(scope="module")
def alexnet_alone(tmp_path_factory):
    """Three reduced-AlexNet trials with BN in the dense layers too, each run alone."""
    root = tmp_path_factory.mktemp("alexnet_alone")
    return {pathlib.Path(c.output_dir).name: _alone(c, root)
            for c in _configs(root / "configs", ALEXNET_RATES, **ALEXNET)}


ALEXNET = dict(model="alexnet_reduced", norm="batch", norm_dense=True)
ALEXNET_RATES = [-12, -11, -10]


@pytest.mark.slow
@pytest.mark.parametrize("formulation", ["separate", "grouped"])
def test_packed_alexnet_norm_dense_trials_equal_their_runs_alone(tmp_path, alexnet_alone,
                                                                  formulation):
    # grouped: grouped convs, each trial's features flattened whole, K-way dense layers
    # whose units BN normalizes per trial. One fused step equals the trials' own to float
    # rounding (test_a_fused_network_is_its_trials_side_by_side), but this tiny network
    # (16 examples, BN over 4 in the dense layers) amplifies rounding fast: alone, a
    # relative 1e-7 change of its initial weights moved its epoch-2 training loss by
    # 4e-4, 6e-2 and 5e-2 at eta_tilde = 2^-8, 2^-6, 2^-4 (measured while writing this
    # test). Hence small rates here, and 1e-4 (the pack was 1.2e-5 away at 2^-12).
    cfgs = _configs(tmp_path / "pack", ALEXNET_RATES, **ALEXNET, pack_formulation=formulation)
    _check_pack(cfgs, train_pack(cfgs), alexnet_alone,
                **({} if formulation == "separate" else dict(rel=1e-4, weights_atol=1e-5)))
    assert {_formulation(c.output_dir) for c in cfgs} == {formulation}


@pytest.mark.parametrize("model", ["resnet8", "alexnet_reduced"])
def test_a_fused_network_is_its_trials_side_by_side(model):
    # K = 3 networks with their own initial weights, and one fused network holding them
    # (training/grouped.py's pairing): its logits are theirs, in both modes, and the
    # gradient of its summed loss, in trial k's slice, is trial k's own gradient.
    import keras
    import tensorflow as tf

    from sbt_keras import models
    from sbt_keras.training.grouped import paired_variables, trial_slice

    trials = 3
    settings = dict(input_shape=(8, 8, 3), num_classes=10, norm="batch", norm_dense=True,
                    bn_batch_size=2)
    singles = []
    for seed in range(trials):
        keras.utils.set_random_seed(seed)
        singles.append(models.build(model, **settings))
    fused = models.build(model, trials=trials, **settings)
    pairs = [paired_variables(fused, single, trials) for single in singles]
    for slot, (variable, axis, _) in enumerate(pairs[0]):
        parts = [p[slot][2].numpy() for p in pairs]
        variable.assign(np.stack(parts) if axis == 0 else np.concatenate(parts, axis=-1))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=4)

    def summed_loss(logits):
        return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))

    for training in (False, True):
        logits = fused(images, training=training).numpy()
        for k, single in enumerate(singles):
            np.testing.assert_allclose(logits[:, k], single(images, training=training),
                                       rtol=1e-5, atol=1e-6)
    with tf.GradientTape() as tape:
        logits = fused(images, training=True)
        total = sum(summed_loss(logits[:, k]) for k in range(trials))
    fused_grads = dict(zip([v.path for v in fused.trainable_variables],
                           tape.gradient(total, fused.trainable_variables)))
    for k, single in enumerate(singles):
        with tf.GradientTape() as tape:
            loss = summed_loss(single(images, training=True))
        own = dict(zip([id(v) for v in single.trainable_variables],
                       tape.gradient(loss, single.trainable_variables)))
        # Absolute tolerance on the scale of the largest gradient: a dense bias before BN
        # has a gradient that is zero up to rounding.
        scale = max(np.abs(g.numpy()).max() for g in own.values())
        for variable, axis, twin in pairs[k]:
            if variable.trainable:
                got = trial_slice(fused_grads[variable.path], axis, k, trials).numpy()
                np.testing.assert_allclose(got, own[id(twin)].numpy(), rtol=1e-5,
                                           atol=1e-6 * scale, err_msg=variable.path)


# ResNet-8 without BN; eta_tilde = 2^4 diverges in its first block.
DIVERGING = dict(model="resnet8", norm="none", steps_per_execution=2)
DIVERGING_RATES = [-6, 4, -5]


@pytest.fixture(scope="module")
def diverging_alone(tmp_path_factory):
    root = tmp_path_factory.mktemp("diverging_alone")
    return {pathlib.Path(c.output_dir).name: _alone(c, root)
            for c in _configs(root / "configs", DIVERGING_RATES, **DIVERGING)}


@pytest.mark.parametrize("formulation", ["separate", "grouped"])
def test_a_diverging_trial_is_frozen_and_recorded_the_others_go_on(tmp_path, formulation,
                                                                   diverging_alone):
    cfgs = _configs(tmp_path / "pack", DIVERGING_RATES, **DIVERGING,
                    pack_formulation=formulation)
    out = train_pack(cfgs)
    assert [r["status"] for r in out] == ["completed", "diverged", "completed"]
    assert out[1]["test_accuracy"] == pytest.approx(0.1)  # at chance, as unpacked
    for cfg in cfgs:  # the NaN reached neither neighbour: both equal their runs alone
        assert_same_run(cfg.output_dir, diverging_alone[pathlib.Path(cfg.output_dir).name])
    assert out[1]["diverged_at_step"] < out[0]["steps"] == 8


def test_a_grouped_pack_on_two_replicas_freezes_a_diverging_trial(tmp_path, mirrored,
                                                                 diverging_alone):
    # The NaN-isolating recomputation runs on each replica (no collective inside its
    # branch); the others still equal their runs alone (on one device: no BN, so the
    # replicas' summed gradient is the whole batch's, up to the order of the sum).
    cfgs = _configs(tmp_path / "pack", DIVERGING_RATES, **DIVERGING,
                    pack_formulation="grouped")
    out = train_pack(cfgs, strategy=mirrored)
    assert [r["status"] for r in out] == ["completed", "diverged", "completed"]
    for cfg in (cfgs[0], cfgs[2]):
        assert_same_run(cfg.output_dir, diverging_alone[pathlib.Path(cfg.output_dir).name])
    assert out[1]["diverged_at_step"] < out[0]["steps"] == 8


@pytest.mark.parametrize("formulation", [pytest.param("separate", marks=pytest.mark.slow),
                                         "grouped"])
def test_a_pack_under_mirrored_strategy_equals_its_trials_alone_there(tmp_path, mirrored,
                                                                      formulation):
    # 2 replicas split the shared batch of 4; BN over each replica's 2 examples; a
    # different weight decay per trial (each replica adds its share before the sum).
    a, b = _configs(tmp_path / "pack", [-7, -5], model="resnet8", norm="batch",
                    pack_formulation=formulation)
    cfgs = [a, dataclasses.replace(b, weight_decay=1e-3)]
    train_pack(cfgs, strategy=mirrored)
    assert _formulation(cfgs[1].output_dir) == formulation
    solo = dataclasses.replace(cfgs[1], output_dir=str(tmp_path / "alone" / "lr-5"))
    train(solo, strategy=mirrored)
    assert_same_run(cfgs[1].output_dir, solo.output_dir)
    assert yaml.safe_load((pathlib.Path(solo.output_dir) / "config.yaml").read_text())[
        "derived"]["replicas"] == 2
    # The test can fail: BN over 2 examples per replica, not the batch of 4.
    (one_device,) = _configs(tmp_path / "one", [-5], model="resnet8", norm="batch",
                             weight_decay=1e-3)
    train(one_device)
    with pytest.raises(AssertionError):
        assert_same_run(solo.output_dir, one_device.output_dir)


def _stop_after_epoch(epoch):
    """Ctrl-C at the end of `epoch` (1-based), after every trial's checkpoint."""
    import keras

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, index, logs=None):
            if index + 1 == epoch:
                raise KeyboardInterrupt()

    return Stop()


@pytest.mark.parametrize("formulation", ["separate", "grouped"])
def test_an_interrupted_pack_resumes_from_the_step_every_trial_saved(tmp_path, caplog,
                                                                      subbatch_alone,
                                                                      formulation):
    cfgs = _configs(tmp_path / "pack", RATES, **SUBBATCH, pack_formulation=formulation)
    with pytest.raises(KeyboardInterrupt):
        train_pack(cfgs, extra_callbacks=[_stop_after_epoch(1)])
    assert {_result(c.output_dir)["status"] for c in cfgs} == {"interrupted"}
    # A kill between two trials' saves: the second trial's newest checkpoint (step 4) is
    # gone, so the pack must resume everyone from step 2, mid-epoch, and forget the
    # others' step 4.
    torn = pathlib.Path(cfgs[1].output_dir) / "checkpoints"
    for path in torn.glob("ckpt-4.*"):
        path.unlink()
    (torn / "checkpoint").write_text((torn / "checkpoint").read_text().replace(
        "ckpt-4", "ckpt-2"))
    caplog.set_level(logging.INFO)
    out = train_pack(cfgs)
    assert "Resuming the pack lr-8+lr-6+lr-4 at epoch 0, step 2." in caplog.text
    _check_pack(cfgs, out, subbatch_alone)
    assert train_pack(cfgs) == out  # finished: nothing trains again


# ---------------------------------------------------------------------- sweeps
def _sweep_base(tmp_path, **overrides):
    values = dict(model="resnet8", norm="batch", dataset="synthetic", image_size=8,
                  synthetic_train=16, synthetic_test=8, epochs=2, median_of=1,
                  eval_batch_size=8, deterministic=True, output_dir=str(tmp_path / "sweep"))
    values.update(overrides)
    return Config(**values)


def test_a_packed_sweep_keeps_a_directory_and_a_row_per_trial(tmp_path):
    from sbt_keras.sweep import run_sweep

    base = _sweep_base(tmp_path)
    grid = grid_lib.Grid.from_flags(base, {"batch_size": "2,4", "bn_batch_size": "4",
                                           "log2_base_lr": "-7,-6,-5"}, 1)
    rows = run_sweep(base, grid, pack=2)
    assert {r["trial"]: r["status"] for r in rows} == {
        "m4_lr-7_bn4": "completed", "m4_lr-6_bn4": "completed",
        "m4_lr-5_bn4": "completed", "m2_lr-7_bn4": "skipped",
        "m2_lr-6_bn4": "skipped", "m2_lr-5_bn4": "skipped"}
    trials = pathlib.Path(base.output_dir) / "trials"
    packs = {name: _result(trials / name)["pack"] for name in
             ("m4_lr-7_bn4", "m4_lr-6_bn4", "m4_lr-5_bn4")}
    assert packs == {"m4_lr-7_bn4": ["m4_lr-7_bn4", "m4_lr-6_bn4"],
                     "m4_lr-6_bn4": ["m4_lr-7_bn4", "m4_lr-6_bn4"],
                     "m4_lr-5_bn4": ["m4_lr-5_bn4"]}
    for name in packs:
        assert (trials / name / "history.csv").exists()
        assert any((trials / name / "checkpoints").glob("ckpt-*.index"))
    # Re-running (also unpacked) trains nothing again.
    assert run_sweep(base, grid) == rows


# ---------------------------------------------------------------------- grouping, bad input
def _valid(base, **texts):
    grid = grid_lib.Grid.from_flags(base, texts, texts.pop("seeds", 1))
    return grid_lib.split_points(base, grid, lambda p: f"/tmp/x/{p.name}")[0]


def test_points_differing_only_in_eta_tilde_are_cut_into_packs_of_k(tmp_path):
    base = _sweep_base(tmp_path, seed=3)
    valid = _valid(base, batch_size="4,8", log2_base_lr="-8,-7,-6,-5,-4")
    names = [[p.name for p, _ in pack] for pack in packing.group(valid, 2)]
    assert names == [["m4_lr-8", "m4_lr-7"], ["m4_lr-6", "m4_lr-5"], ["m4_lr-4"],
                     ["m8_lr-8", "m8_lr-7"], ["m8_lr-6", "m8_lr-5"], ["m8_lr-4"]]
    columns = [[p.name for p, _ in pack] for pack in packing.group(valid, packing.AUTO)]
    assert [len(c) for c in columns] == [5, 5]
    seeds = _valid(base, batch_size="4", log2_base_lr="-8,-7", seeds=2)  # data differs
    assert [[p.name for p, _ in pack] for pack in packing.group(seeds, 4)] == [
        ["m4_lr-8_s3", "m4_lr-7_s3"], ["m4_lr-8_s4", "m4_lr-7_s4"]]


@pytest.mark.parametrize("text, message", [
    ("0", "--pack=0 must be >= 1 (1: no packing) or auto"),
    ("-2", "--pack=-2 must be >= 1 (1: no packing) or auto"),
    ("x", "--pack=x is not a number of trials; give K >= 1 (1: no packing) or auto"),
])
def test_a_pack_size_below_one_is_refused(text, message):
    with pytest.raises(ConfigError) as error:
        packing.parse(text)
    assert str(error.value) == message


def test_a_grid_with_nothing_to_pack_is_refused(tmp_path):
    base = _sweep_base(tmp_path, log2_base_lr=-6)
    valid = _valid(base, batch_size="2,4,8")  # every point a different m
    with pytest.raises(ConfigError, match=r"^--pack=4: no two points of this grid differ "
                                          r"only in the base learning rate"):
        packing.check_grid(base, valid, 4)
    packing.check_grid(base, valid, 1)  # no packing asked: fine


@pytest.mark.parametrize("change, named", [
    (dict(batch_size=8), "batch_size 4 vs 8"),
    (dict(model="resnet20"), "model 'resnet8' vs 'resnet20'"),
    (dict(train_examples=8), "train_examples 0 vs 8"),
    (dict(seed=1), "seed 0 vs 1"),
])
def test_trials_that_cannot_share_a_program_are_refused(tmp_path, change, named):
    a, b = _configs(tmp_path, [-6, -5], model="resnet8", norm="none")
    b = dataclasses.replace(b, **change)
    with pytest.raises(ConfigError, match=f"cannot share a program \\({named}"):
        packing.check_pack([a, b])
    with pytest.raises(ConfigError, match="cannot share a program"):
        train_pack([a, b])  # before anything is written
    assert not pathlib.Path(a.output_dir).exists()


def test_weight_decay_may_differ_within_a_pack(tmp_path):
    a, b = _configs(tmp_path, [-6, -6], model="resnet8", norm="none")
    b = dataclasses.replace(b, weight_decay=1e-3, output_dir=str(tmp_path / "wd"))
    packing.check_pack([a, b])
    with pytest.raises(ConfigError, match="same --output_dir"):
        packing.check_pack([a, dataclasses.replace(b, output_dir=a.output_dir)])


@pytest.mark.parametrize("flags, message", [
    (["--grid_log2_base_lr=-7,-6", "--pack=0"],
     "--pack=0 must be >= 1 (1: no packing) or auto"),
    (["--log2_base_lr=-6", "--pack=3"],
     "--pack=3 packs the points of a sweep; give --grid_* flags (e.g. "
     "--grid_log2_base_lr) or drop --pack"),
    (["--log2_base_lr=-6", "--grid_batch_size=2,4,8", "--pack=auto"],
     "--pack=auto: no two points of this grid differ only in the base learning rate, so "
     "nothing can share a program (points differing in m, BN batch, epochs, norm or seed "
     "never do); sweep --grid_log2_base_lr, or drop --pack"),
    (["--grid_log2_base_lr=-7,-6", "--pack=2", "--norm=layer",
      "--pack_formulation=grouped"],
     "--pack_formulation=grouped: --norm=layer is not per channel, so K trials cannot share "
     "its layers (per-channel: none, batch); use --pack_formulation=separate or auto"),
], ids=["zero", "single_run", "nothing_to_pack", "grouped_layer_norm"])
def test_bad_pack_flags_are_one_line_before_anything_runs(tmp_path, flags, message):
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sbt_keras.run", "--dataset=synthetic", "--model=resnet8",
         "--batch_size=4", f"--output_dir={out}", *flags], cwd=repo,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)}, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


# ---------------------------------------------------------------------- real kills
PACK_FLAGS = ["--dataset=synthetic", "--model=resnet8", "--norm=batch", "--image_size=8",
              "--synthetic_train=128", "--synthetic_test=16", "--batch_size=8",
              "--epochs=3", "--median_of=1", "--deterministic", "--warmup",
              "--checkpoint_every_steps=4", "--grid_log2_base_lr=-8,-6,-4", "--pack=3"]


def _sweep_table(out):
    return [{k: v for k, v in r.items() if k != "wall_seconds"}
            for r in results.read_csv(pathlib.Path(out) / "results.csv")]


def _steps(out):
    return sorted(int(p.name.split("-")[1].split(".")[0])
                  for p in (pathlib.Path(out) / "checkpoints").glob("ckpt-*.index"))


@pytest.mark.slow
def test_a_packed_sweep_killed_with_9_or_preempted_resumes_to_the_same_table(tmp_path):
    import signal
    import time

    from processes import finish, start

    def run(out):
        return start(["-m", "sbt_keras.run", *PACK_FLAGS, f"--output_dir={out}"])

    reference = tmp_path / "reference"
    finish(run(reference))
    trials = [f"lr{r}" for r in (-8, -6, -4)]
    for how in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / how.name
        proc = run(out)
        deadline = time.monotonic() + 300  # 16 steps an epoch: kill in the middle of one
        while not any(s % 16 for t in trials for s in _steps(out / "trials" / t)
                      if s > 16):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == (143 if how == signal.SIGTERM else -9), err[-2000:]
        status = {yaml.safe_load((out / "trials" / t / "result.yaml").read_text())["status"]
                  for t in trials}
        assert status == ({"preempted"} if how == signal.SIGTERM else {"running"})
        finish(run(out))
        assert _sweep_table(out) == _sweep_table(reference), how.name
        for t in trials:
            assert _history(out / "trials" / t) == _history(reference / "trials" / t)


# ---------------------------------------------------------------------- grouped formulation
GROUPED = dict(SUBBATCH, pack_formulation="grouped")
# Per-trial weight decay too: lambda differs as much as eta_tilde does.
DECAYS = [0.0, 1e-3, 3e-2]


def _decay_configs(root, **settings):
    return [dataclasses.replace(c, weight_decay=wd)
            for c, wd in zip(_configs(root, RATES, **settings), DECAYS)]


@pytest.fixture(scope="module")
def decay_alone(tmp_path_factory):
    """Three ResNet-8 sub-batch BN trials differing in eta_tilde and lambda, each alone."""
    root = tmp_path_factory.mktemp("decay_alone")
    return {pathlib.Path(c.output_dir).name: _alone(c, root)
            for c in _decay_configs(root / "configs", **SUBBATCH)}


def test_grouped_pack_trials_equal_their_runs_alone(tmp_path, decay_alone, caplog):
    # One fused ResNet-8 (grouped convs, K-way logits) with sub-batch BN, warm-up, both
    # decay steps, a different eta_tilde and weight decay per trial.
    cfgs = _decay_configs(tmp_path / "pack", **GROUPED)
    caplog.set_level(logging.INFO)
    _check_pack(cfgs, train_pack(cfgs), decay_alone)
    assert "Pack of 3 trials: grouped formulation" in caplog.text
    assert {_formulation(c.output_dir) for c in cfgs} == {"grouped"}


@pytest.mark.parametrize("change, message", [
    (dict(norm="layer"), "--pack_formulation=grouped: --norm=layer is not per channel, so K "
                         "trials cannot share its layers (per-channel: none, batch); use "
                         "--pack_formulation=separate or auto"),
    (dict(norm="group"), "--pack_formulation=grouped: --norm=group is not per channel"),
    (dict(norm="mix"), "--pack_formulation=grouped: --norm=mix is not per channel"),
    (dict(model="resnet50", image_size=32),
     "--pack_formulation=grouped: --model=resnet50 has no fused (grouped) network "
     "(the CIFAR ResNets and alexnet_reduced do); use --pack_formulation=separate or auto"),
], ids=["layer", "group", "mix", "resnet50"])
def test_grouped_formulation_refuses_what_it_cannot_fuse(tmp_path, change, message):
    a, b = _configs(tmp_path, [-6, -5], **{"model": "resnet8", "pack_formulation": "grouped",
                                           **change})
    with pytest.raises(ConfigError) as error:
        packing.check_pack([a, b])
    assert str(error.value).startswith(message)
    with pytest.raises(ConfigError):
        train_pack([a, b])  # before anything is written
    assert not pathlib.Path(a.output_dir).exists()
    # auto falls back to the separate formulation, on any device.
    auto = dataclasses.replace(a, pack_formulation="auto")
    assert {packing.formulation(auto, d, 2) for d in ("cpu", "gpu")} == {packing.SEPARATE}


def test_auto_formulation_is_grouped_on_accelerators_and_measured_on_cpu(tmp_path):
    (cfg,) = _configs(tmp_path, [-6], **SUBBATCH)
    assert cfg.pack_formulation == "auto"
    assert packing.formulation(cfg, "gpu", 8) == packing.formulation(cfg, "tpu", 8) == \
        packing.GROUPED
    # On a CPU, as measured (packing.CPU_GROUPED_MAX_BATCH): BN packs fused up to m = 16,
    # packs without a norm up to m = 4.
    for m, norm, expected in [(16, "batch", packing.GROUPED), (32, "batch", packing.SEPARATE),
                              (4, "none", packing.GROUPED), (8, "none", packing.SEPARATE)]:
        other = dataclasses.replace(cfg, batch_size=m, norm=norm, bn_batch_size=0)
        assert packing.formulation(other, "cpu", 8) == expected, (m, norm)
    assert packing.formulation(dataclasses.replace(cfg, norm="none"), "gpu", 8) == \
        packing.GROUPED
    assert packing.formulation(cfg, "gpu", 1) == packing.SEPARATE  # one trial: nothing to fuse
    # AlexNet's crossovers were measured too; ResNet-50 has no fused network.
    alexnet = dataclasses.replace(cfg, model="alexnet_reduced")
    assert packing.formulation(alexnet, "cpu", 8) == packing.GROUPED
    assert packing.formulation(dataclasses.replace(alexnet, batch_size=32), "cpu", 8) == \
        packing.SEPARATE
    assert packing.formulation(dataclasses.replace(cfg, model="resnet50"), "gpu", 8) == \
        packing.SEPARATE
    forced = dataclasses.replace(cfg, pack_formulation="separate")
    assert packing.formulation(forced, "gpu", 8) == packing.SEPARATE


def test_a_nan_trial_stays_out_of_the_others_kernel_gradients_with_and_without_xla():
    # Trial 1's stem holds NaN. TF's own grouped kernel keeps it in group 1 (Keras's
    # Conv2D(groups=K), XLA-wrapped per conv, did not); so does the isolating gradient a
    # non-finite step falls back to, compiled with XLA, and it is exact for the others.
    import keras
    import tensorflow as tf

    from sbt_keras import models
    from sbt_keras.layers import trial_conv

    net = models.build("resnet8", norm="none", input_shape=(8, 8, 3), num_classes=10,
                       trials=3)
    kernel = net.get_layer("stem").kernel
    poisoned = kernel.numpy()
    poisoned[..., 16:32] = np.nan
    kernel.assign(poisoned)
    images = tf.random.stateless_normal((4, 8, 8, 3), seed=(1, 2))
    labels = tf.constant([[1] * 3, [2] * 3, [3] * 3, [4] * 3])

    def gradients():
        with tf.GradientTape() as tape:
            logits = net(images, training=True)
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        return tape.gradient(loss, [net.get_layer("stage2_block1_conv2").kernel])[0]

    def isolated():
        with trial_conv.isolated_gradients():
            return gradients()

    tf_own = gradients().numpy()
    xla_isolated = tf.function(isolated, jit_compile=True)().numpy()
    assert np.isnan(np.split(tf_own, 3, axis=-1)[1]).all()  # the poisoned trial's own
    for grad in (tf_own, xla_isolated):
        slices = np.split(grad, 3, axis=-1)
        assert np.isfinite(slices[0]).all() and np.isfinite(slices[2]).all()
    for k in (0, 2):  # and the others' are their exact gradients
        np.testing.assert_allclose(np.split(xla_isolated, 3, axis=-1)[k],
                                   np.split(tf_own, 3, axis=-1)[k], rtol=1e-4, atol=1e-6)
