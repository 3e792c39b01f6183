"""tools/sharpness.py on a tiny kept run: the record, its merge, interruption, bad input."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.train import train
from sbt_keras.training import snapshot
from tools import sharpness as tool

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """resnet8 on 8x8 synthetic images, 2 epochs, every epoch end kept."""
    cfg = Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
                 synthetic_test=16, batch_size=8, base_lr=2.0 ** -5, epochs=2, median_of=1,
                 eval_batch_size=8, keep_checkpoint_every_epochs=1, deterministic=True,
                 output_dir=str(tmp_path_factory.mktemp("sharp") / "run")).resolve()
    train(cfg)
    return cfg.output_dir


def numpy_mean_cross_entropy(logits, labels):
    """Mean softmax cross-entropy in float64, written out (log-sum-exp)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def read(run_dir):
    return yaml.safe_load((pathlib.Path(run_dir) / tool.SHARPNESS_FILE).read_text())


def test_record_is_phi_of_the_checkpoint_on_its_sample_and_merges(kept_run):
    settings = dict(sample=12, epsilons=(1e-3,), p=5, maxiter=2, seed=3, log=lambda *a: None)
    key, entry = tool.measure(kept_run, epoch=1, **settings)
    record, = entry["sharpness"]
    assert key == 1 and entry["step"] == 4
    # f0 independently: the epoch-1 network's logits on the seeded sample, numpy CE.
    snap = snapshot.load(kept_run, epoch=1)
    images, labels = snap.train_arrays()
    keep = np.sort(np.random.default_rng(3).choice(len(labels), 12, replace=False))
    logits = snap.network(images[keep], training=False).numpy()
    assert record["f0"] == pytest.approx(numpy_mean_cross_entropy(logits, labels[keep]),
                                         rel=1e-5)
    assert record["phi"] == pytest.approx(
        100 * (record["f_max"] - record["f0"]) / (1 + record["f0"]), rel=1e-12)
    assert record["phi"] > 0 and record["evaluations"] <= 11
    assert (record["p"], record["sample"], record["seed"]) == (5, 12, 3)

    # Another epoch is added beside it.
    tool.measure(kept_run, epoch=2, **settings)
    stored = read(kept_run)["epochs"]
    assert sorted(stored) == [1, 2] and stored[1]["sharpness"] == [record]


def test_merge_keeps_other_settings_and_replaces_the_same_ones():
    def entry(step, *records):
        return {"step": step, "sharpness": [dict(epsilon=e, p=p, sample=8, seed=0, maxiter=2,
                                                 phi=phi) for e, p, phi in records]}
    stored = tool.merge(None, 1, entry(4, (1e-3, 5, 1.0)))
    stored = tool.merge(stored, 2, entry(8, (1e-3, 5, 2.0)))
    stored = tool.merge(stored, 1, entry(4, (1e-3, 0, 3.0), (5e-4, 5, 4.0)))
    stored = tool.merge(stored, 1, entry(4, (1e-3, 5, 5.0)))
    assert sorted(stored["epochs"]) == [1, 2]
    assert [(r["epsilon"], r["p"], r["phi"]) for r in stored["epochs"][1]["sharpness"]] == [
        (5e-4, 5, 4.0), (1e-3, 0, 3.0), (1e-3, 5, 5.0)]
    assert stored["epochs"][2]["sharpness"][0]["phi"] == 2.0


def test_interrupted_measurement_leaves_the_file_as_it_was(kept_run):
    tool.measure(kept_run, epoch=2, sample=8, epsilons=(1e-3,), p=3, maxiter=1,
                 log=lambda *a: None)
    before = (pathlib.Path(kept_run) / tool.SHARPNESS_FILE).read_bytes()
    calls = []

    def kill_after_two(epsilon, f):
        calls.append(f)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C mid-search would

    with pytest.raises(KeyboardInterrupt):
        tool.measure(kept_run, epoch=1, sample=8, epsilons=(5e-4,), p=3, maxiter=3,
                     log=lambda *a: None, on_evaluation=kill_after_two)
    assert (pathlib.Path(kept_run) / tool.SHARPNESS_FILE).read_bytes() == before
    assert not [n for n in os.listdir(kept_run) if n.startswith(".tmp-")]


def test_curvature_is_recorded_beside_the_sharpness(kept_run):
    _, entry = tool.measure(kept_run, sample=8, epsilons=(1e-3,), p=3, maxiter=1,
                            curvature=True, eigen_hvps=3, trace_samples=2,
                            hvp_mode="reverse", log=lambda *a: None)
    curvature, = entry["curvature"]
    assert curvature["eigen_hvps_used"] <= 3 and curvature["trace_stderr"] >= 0
    assert np.isfinite(curvature["top_eigenvalue"]) and np.isfinite(curvature["trace"])
    assert read(kept_run)["epochs"][2]["curvature"] == [curvature]


def test_p_above_the_parameter_count_is_refused_before_measuring(kept_run):
    with pytest.raises(ConfigError, match=r"--p=10000000 is larger than the network's "
                                          r"\d+ trainable parameters"):
        tool.measure(kept_run, p=10_000_000, log=lambda *a: None)


@pytest.mark.parametrize("args, message", [
    (["--epsilons=0"], "--epsilons: 0 is not a positive box size"),
    (["--epsilons=1e-3,-1"], "--epsilons: -1 is not a positive box size"),
    (["--p=-1"], "--p=-1 must be >= 0"),
    (["--sample=33"], "--sample=33 must be between 1 and the run's 32 training examples"),
    (["--epoch=7"], "no checkpoint at the end of epoch 7 (kept: epoch 0, epoch 1, epoch 2)"),
])
def test_bad_input_is_one_line_and_exit_2(kept_run, args, message):
    done = subprocess.run([sys.executable, "-m", "tools.sharpness", f"--run={kept_run}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]


def test_a_directory_without_a_checkpoint_is_refused(tmp_path, kept_run):
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "config.yaml").write_text((pathlib.Path(kept_run) / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        tool.check_request(str(empty))
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        tool.check_request(str(tmp_path))
