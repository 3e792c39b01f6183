"""The statistics-noise instrument against independent numpy computations and the Gaussian
theory; its command line on tiny synthetic data."""
import csv
import dataclasses
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags

from sbt_keras import models, norm_noise, results
from sbt_keras.config import Config
from sbt_keras.layers import SubBatchNormalization
from tools import norm_noise as tool

REPO = pathlib.Path(__file__).resolve().parents[1]


def _input_then_bn(shape):
    """A network whose only normalization sees the raw input: its input is the input."""
    inputs = keras.Input(shape=shape)
    return keras.Model(inputs, SubBatchNormalization(name="bn")(inputs))


def test_iid_gaussian_dense_values_follow_2_over_n_minus_1():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4096, 32)).astype(np.float32)
    (m,) = norm_noise.measure(_input_then_bn((32,)), x, chunk=1000)
    assert m.kind == "dense" and m.pixels == 1
    for n in (2, 4, 16, 64):
        got = m.batch_errors(n)
        theory = 2.0 / (n - 1)  # Gaussian: Var[s^2]/sigma^4 of the unbiased variance
        # Monte-Carlo: within 4 standard errors (over independent groups) and 10 %.
        assert abs(got["var_err"] - theory) < 4 * got["var_err_stderr"], (n, got)
        assert got["var_err"] == pytest.approx(theory, rel=0.1)
        # biased s^2 = (n-1)/n * unbiased: bias^2 1/n^2 + variance 2(n-1)/n^2
        assert got["var_err_biased"] == pytest.approx((2 * n - 1) / n ** 2, rel=0.1)
        assert got["mean_err"] == pytest.approx(1.0 / n, rel=0.1)
        assert got["samples"] == (4096 // n) * 32
    # One value per group: no unbiased variance; the biased one is 0, error exactly 1.
    one = m.batch_errors(1)
    assert np.isnan(one["var_err"]) and one["var_err_biased"] == pytest.approx(1.0 / (1 - 1 / 4096))


def _numpy_errors(stat_mean, stat_var, count, ref_mean, ref_var, share):
    """Squared relative errors as the module defines them, computed directly."""
    unbiased = stat_var * count / (count - 1)
    return dict(var_err=np.mean((unbiased - ref_var) ** 2 / ref_var ** 2) / (1 - share),
                var_err_biased=np.mean((stat_var - ref_var) ** 2 / ref_var ** 2) / (1 - share),
                mean_err=np.mean((stat_mean - ref_mean) ** 2 / ref_var) / (1 - share))


@pytest.fixture(scope="module")
def hand_made():
    """A [E, H, W, C] input far from zero (sums must not cancel) with unequal channels, and
    its LayerMoments collected in chunks that do not divide E."""
    rng = np.random.default_rng(1)
    x = (100.0 + rng.normal(size=(24, 3, 2, 4)) * [0.5, 1.0, 2.0, 4.0]
         + rng.normal(size=(24, 1, 1, 4))).astype(np.float32)
    (m,) = norm_noise.measure(_input_then_bn((3, 2, 4)), x, chunk=5)
    return x.astype(np.float64), m


def test_collected_statistics_equal_numpy(hand_made):
    x, m = hand_made
    assert (m.examples, m.height, m.width, m.channels, m.kind) == (24, 3, 2, 4, "conv")
    mean, var = m.reference()
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-9)
    centred = x - x.mean((0, 1, 2))
    kurtosis = (centred ** 4).mean((0, 1, 2)) / x.var((0, 1, 2)) ** 2
    np.testing.assert_allclose(m.kurtosis(), kurtosis, rtol=1e-8)
    for n in (1, 2, 4, 8):
        groups = x.reshape(24 // n, n, 3, 2, 4)
        want = _numpy_errors(groups.mean((1, 2, 3)), groups.var((1, 2, 3)), n * 6,
                             x.mean((0, 1, 2)), x.var((0, 1, 2)), n / 24)
        got = m.batch_errors(n)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-8), (n, key)
        assert got["values_per_stat"] == n * 6


def test_per_example_norms_equal_numpy_and_do_not_depend_on_n(hand_made):
    x, m = hand_made
    for kind, groups in (("layer", 1), ("instance", 4), ("group", 2)):
        split = x.reshape(24, 3, 2, groups, 4 // groups)  # [E, H, W, G, C/G]
        everything = np.moveaxis(x.reshape(24, 3, 2, groups, 4 // groups), 3, 0).reshape(
            groups, -1)
        want = _numpy_errors(split.mean((1, 2, 4)), split.var((1, 2, 4)),
                             6 * 4 // groups, everything.mean(1), everything.var(1), 1 / 24)
        got = m.example_errors(kind, gn_groups=2)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-8), (kind, key)
        assert got["values_per_stat"] == 6 * 4 // groups
    # Instance norm's statistics are batch norm's with one example per group.
    assert m.example_errors("instance")["var_err"] == pytest.approx(
        m.batch_errors(1)["var_err"], rel=1e-12)
    assert m.example_errors("group", gn_groups=3) is None  # 3 does not divide 4 channels
    # The table: one row per layer and per-example kind, the same whatever sizes are asked.
    few, more = (norm_noise.table_rows([m], sizes, gn_groups=2) for sizes in ([1], [1, 2, 4]))
    pick = lambda rows: [r for r in rows if r["norm"] != "batch"]  # noqa: E731
    assert pick(few) == pick(more) and len(pick(few)) == 2 * 3  # layer rows + means
    assert all(r["n"] == "" for r in pick(few))
    assert len([r for r in more if r["norm"] == "batch"]) == 2 * 3


def test_reference_forward_normalizes_with_the_sample_statistics_and_restores():
    keras.utils.set_random_seed(2)
    inputs = keras.Input(shape=(4, 4, 2))
    first = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
    bn1 = SubBatchNormalization(name="bn1")
    second = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv2")(
        keras.layers.ReLU()(bn1(first)))
    network = keras.Model(inputs, SubBatchNormalization(name="bn2")(second))
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(40, 4, 4, 2)).astype(np.float32)
    m1, m2 = norm_noise.measure(network, x, chunk=16)
    # By hand: conv1, normalized with its statistics over all 40 examples, ReLU, conv2.
    h = keras.Model(inputs, first)(x).numpy().astype(np.float64)
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    np.testing.assert_allclose(m1.reference()[0], mean, rtol=1e-6)
    normalized = np.maximum((h - mean) / np.sqrt(var + bn1.epsilon), 0).astype(np.float32)
    want = network.get_layer("conv2")(normalized).numpy().astype(np.float64)
    np.testing.assert_allclose(m2.reference()[0], want.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m2.reference()[1], want.var((0, 1, 2)), rtol=1e-4)
    for layer in (bn1, network.get_layer("bn2")):  # moving statistics put back
        np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)
    # Inference with the initial moving statistics (0, 1) is a different network.
    _, raw = norm_noise.measure(network, x, forward="inference")
    assert not np.allclose(raw.reference()[1], m2.reference()[1], rtol=1e-2)


def test_sites_without_norms_are_conv_and_hidden_dense_outputs():
    plain = models.build("resnet8", input_shape=(8, 8, 3), norm="none")
    sites = norm_noise.find_sites(plain)
    assert [s.source for s in sites] == ["conv output"] * 7 and "logits" not in [
        s.name for s in sites]
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(5, name="fc1")(inputs)
    net = keras.Model(inputs, keras.layers.Dense(2, name="logits")(hidden))
    assert [(s.name, s.source) for s in norm_noise.find_sites(net)] == [
        ("fc1", "dense output")]
    grouped = models.build("resnet8", input_shape=(8, 8, 3), norm="group", gn_groups=4)
    assert not any(s.calibrate for s in norm_noise.find_sites(grouped))
    assert norm_noise.plan(grouped, 10)["passes"] == 1


def test_parse_sizes():
    assert norm_noise.parse_sizes("1:256", 2048) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert norm_noise.parse_sizes("16,1,4", 32) == [1, 4, 16]
    for text in ("3", "1:6", "8:2", "a:b", ""):
        with pytest.raises(norm_noise.ConfigError):
            norm_noise.parse_sizes(text, 2048)
    with pytest.raises(norm_noise.ConfigError, match="fewer than two groups"):
        norm_noise.parse_sizes("1:64", 64)


def _flags(*args):
    fv = flags.FlagValues()
    tool.define_flags(fv)
    fv(["norm_noise", *args])
    return fv


SYNTHETIC = ("--model=resnet8", "--dataset=synthetic", "--image_size=8",
             "--synthetic_train=64")


def test_cli_writes_table_and_figure(tmp_path):
    out = tmp_path / "out"
    said = []
    paths = tool.run_from_flags(_flags(*SYNTHETIC, "--reference=32", "--sizes=1:8",
                                       "--gn_groups=4", f"--out={out}"), echo=said.append)
    assert sorted(pathlib.Path(p).name for p in paths) == [
        "norm_noise.csv", "norm_noise.md", "norm_noise.png", "norm_noise.svg"]
    assert "32 reference examples x 7 layers" in said[0]
    with open(out / "norm_noise.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(norm_noise.COLUMNS)
    # 7 layers x (4 sizes + layer + instance + group), then the means over layers.
    assert len(rows) == 7 * 7 + 7
    assert (out / "norm_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "norm_noise.md").read_text()
    assert "**Batch norm, mean over layers.**" in text and "| stem_norm | 8×8×16 |" in text


def _run_dir_without_checkpoint(tmp_path):
    cfg = Config(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=64,
                 batch_size=8, base_lr=1.0, epochs=1, median_of=1,
                 output_dir=str(tmp_path / "run")).resolve()
    results.write_yaml(tmp_path / "run" / results.CONFIG_FILE, {
        **dataclasses.asdict(cfg), "derived": {"steps_per_epoch": 8, "bn_batch_size": 8}})
    return str(tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (SYNTHETIC + ("--reference=32", "--sizes=1,3"), "3 not a power of two"),
    (SYNTHETIC + ("--reference=32", "--sizes=1:32"), "fewer than two groups"),
    (SYNTHETIC + ("--reference=100",), "larger than the 64 training examples"),
    (SYNTHETIC + ("--run=x",), "either --run"),
    ("--run=RUN", "holds no checkpoint"),
])
def test_bad_input_is_one_line_with_exit_2(tmp_path, capsys, args, message):
    args = (args,) if isinstance(args, str) else args
    args = tuple(a.replace("RUN", _run_dir_without_checkpoint(tmp_path)) for a in args)
    fv = _flags("--reference=32", "--sizes=1:8", *args, f"--out={tmp_path / 'out'}")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["norm_noise"], fv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_command_line_refuses_bad_sizes_before_tensorflow(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.norm_noise", *SYNTHETIC, "--reference=32",
         "--sizes=1:6", f"--out={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --sizes=1:6: a range LOW:HIGH needs powers of two with LOW <= HIGH, e.g. 1:256"]


def test_group_norm_without_gn_groups_takes_the_models_default(tmp_path):
    # ResNet-8's first stage has 16 channels; its default is one channel per group there.
    settings = tool.check(_flags(*SYNTHETIC, "--norm=group", "--reference=32", "--sizes=1:8",
                                f"--out={tmp_path}"))
    assert settings["gn_groups"] == 16
