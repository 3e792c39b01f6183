"""The normalization study end to end: its settings, the --grid_norm axis, the mix records."""
import pathlib

import numpy as np
import pytest

from sbt_keras import grid as grid_lib
from sbt_keras import results
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError
from sbt_keras.sweep import run_sweep
from sbt_keras.training import snapshot

SYNTH = dict(model="resnet8", dataset="synthetic", image_size=8, synthetic_train=32,
             synthetic_test=16, batch_size=8, base_lr=2.0 ** -6, epochs=2, median_of=1,
             eval_batch_size=16, deterministic=True)


def _config(**overrides):
    return Config(**{**SYNTH, "output_dir": "unused", **overrides})


# (settings, words the one-line message must contain); docs/bad_input.md lists each.
BAD = [
    (dict(model="alexnet_reduced", norm="batch", bn_batch_size=1),
     ["over BN groups of 1 example", "--norm=layer|group|mix", "--nonorm_dense"]),
    (dict(model="alexnet_reduced", norm="batch_renorm", batch_size=1),
     ["over BN groups of 1 example"]),
    (dict(norm="batch", gn_groups=4), ["--gn_groups does not apply to --norm=batch"]),
    (dict(norm="layer", mix_norms=("batch", "instance")), ["--mix_norms does not apply"]),
    (dict(norm="mix", mix_norms=("batch", "foo")), ["--mix_norms", "unknown", "foo"]),
    (dict(norm="mix", mix_norms=("batch",)), ["--mix_norms", "2 or 3"]),
    (dict(norm="batch_renorm", renorm_r_max=0.5), ["--renorm_r_max=0.5 must be >= 1"]),
    (dict(norm="batch_renorm", renorm_d_max=-1.0), ["--renorm_d_max=-1.0 must be >= 0"]),
    (dict(norm="batch_renorm", renorm_start_step=10, renorm_r_end_step=5),
     ["--renorm_r_end_step=5 must be an integer >= renorm_start_step=10"]),
    (dict(norm="group", gn_groups=32), ["--gn_groups=32 does not divide the 16 channels",
                                        "divisor of 16"]),
    (dict(norm="group", gn_groups=-1), ["--gn_groups=-1 must be >= 1"]),
    (dict(model="alexnet_reduced", norm="instance"), ["--nonorm_dense"]),
    (dict(model="alexnet_reduced", norm="mix", mix_norms=("batch", "instance")),
     ["--nonorm_dense"]),
    (dict(norm="layer", bn_batch_size=2), ["--bn_batch_size only applies", "--norm=layer"]),
]


@pytest.mark.parametrize("overrides, words", BAD)
def test_degenerate_and_inapplicable_norm_settings_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as caught:
        cfg = _config(**overrides).resolve()
        cfg.check_replicas(1)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("overrides", [
    dict(model="alexnet_reduced", norm="batch", bn_batch_size=1, norm_dense=False),
    dict(model="alexnet_reduced", norm="mix", bn_batch_size=1),  # mix is one of the fixes
    dict(model="alexnet_reduced", norm="instance", norm_dense=False),
    dict(norm="group", gn_groups=8),
    dict(norm="mix", mix_norms=("layer", "batch", "instance")),
])
def test_the_named_fixes_are_accepted(overrides):
    _config(**overrides).resolve().check_replicas(1)


def test_defaults_that_depend_on_the_model_and_the_run_length():
    assert _config(norm="group").resolve().gn_groups == 16  # CIFAR ResNets: 16 channels
    assert _config(norm="group", model="resnet50", dataset="synthetic").resolve(
    ).gn_groups == 32  # Wu & He's 32 divides every ResNet-50 width
    renorm = _config(norm="batch_renorm", epochs=40).resolve()  # 4 steps x 40 = 160 steps
    assert (renorm.renorm_start_step, renorm.renorm_d_end_step,
            renorm.renorm_r_end_step) == (8, 40, 64)  # 5%, 25%, 40%
    assert _config(norm="mix", mix_norms=("layer", "batch")).resolve().mix_norms == (
        "batch", "layer")  # stored in the layers' canonical order
    # Options a norm does not read stay at their defaults, so config.yaml is unambiguous.
    assert _config(norm="batch").resolve().renorm_start_step == -1


def test_grid_norm_parses_names_and_names_trials(tmp_path):
    assert grid_lib.parse_axis("norm", "batch,layer,mix") == ["batch", "layer", "mix"]
    with pytest.raises(ConfigError, match="--grid_norm=batch,foo"):
        grid_lib.parse_axis("norm", "batch,foo")
    base = _config(output_dir=str(tmp_path), log2_base_lr=None, base_lr=None)
    grid = grid_lib.Grid.from_flags(base, {"norm": "layer,batch", "bn_batch_size": "2,8",
                                           "log2_base_lr": "-6"}, seeds=1)
    valid, skipped = grid_lib.split_points(base, grid, lambda p: str(tmp_path / p.name))
    assert [p.name for p, _ in valid] == ["norm-batch_lr-6_bn2", "norm-batch_lr-6_bn8"]
    # BN batch sizes mean nothing to layer norm: those points are skipped, with the reason.
    assert [p.name for p, _ in skipped] == ["norm-layer_lr-6_bn2", "norm-layer_lr-6_bn8"]
    assert "--bn_batch_size only applies" in skipped[0][1]


def test_a_norm_point_keeps_only_the_options_its_norm_reads(tmp_path):
    base = _config(output_dir=str(tmp_path), gn_groups=8, norm="group")
    grid = grid_lib.Grid.from_flags(base, {"norm": "batch,group"}, seeds=1)
    configs = dict((p.name, cfg) for p, cfg in grid_lib.split_points(
        base, grid, lambda p: str(tmp_path / p.name))[0])
    assert configs["norm-group"].gn_groups == 8
    assert configs["norm-batch"].gn_groups == 0  # the default: batch norm has no groups


@pytest.fixture(scope="module")
def norm_sweep(tmp_path_factory):
    base = _config(output_dir=str(tmp_path_factory.mktemp("norms") / "sweep"),
                   bn_batch_size=4)
    grid = grid_lib.Grid.from_flags(base, {"norm": "batch,mix"}, seeds=1)
    return base, run_sweep(base, grid)


def test_a_norm_sweep_records_the_norm_and_the_mixing_weight(norm_sweep):
    base, rows = norm_sweep
    by_norm = {r["norm"]: r for r in rows}
    assert set(by_norm) == {"batch", "mix"}
    assert all(r["status"] == "completed" for r in rows)
    assert by_norm["batch"].get("alpha_batch_mean") in (None, "")
    assert 0.0 < by_norm["mix"]["alpha_batch_mean"] < 1.0
    table = results.read_csv(str(pathlib.Path(base.output_dir) / "results.csv"))
    assert {r["norm"] for r in table} == {"batch", "mix"}


def test_recorded_mixing_weights_are_the_sigmoid_of_the_checkpointed_logits(norm_sweep):
    base, rows = norm_sweep
    trial = pathlib.Path(base.output_dir) / [r for r in rows if r["norm"] == "mix"][0][
        "trial_dir"]
    snap = snapshot.load(str(trial))
    history = results.read_csv(str(trial / "history.csv"))
    result = results.read_yaml(str(trial / "result.yaml"))
    layers = [layer for layer in snap.network.layers if layer.name.endswith("_norm")]
    alphas = []
    for layer in layers:
        logit = float(np.asarray(layer.mix_logits.numpy(), np.float64))
        alpha = 1.0 / (1.0 + np.exp(-logit))  # two components: sigmoid, batch first
        alphas.append(alpha)
        assert history[-1][f"alpha_batch/{layer.name}"] == pytest.approx(alpha, rel=1e-6)
        assert history[-1][f"alpha_layer/{layer.name}"] == pytest.approx(1 - alpha, rel=1e-6)
        assert result["mixing_weights"][layer.name]["batch"] == pytest.approx(alpha, rel=1e-6)
    assert result["alpha_batch_mean"] == pytest.approx(np.mean(alphas), rel=1e-6)
    assert len(layers) == 7 and not all(a == 0.5 for a in alphas)  # they trained


def test_the_three_norm_figures_draw_from_the_sweep(norm_sweep):
    from tools import figures

    base, _ = norm_sweep
    rows = figures.load_rows(base.output_dir)
    out = pathlib.Path(base.output_dir)
    for kind, draw in (("norms", figures.plot_norms), ("alpha", figures.plot_alpha),
                       ("norm_lr", figures.plot_norm_lr)):
        png, svg = draw(rows, str(out / f"fig_{kind}"))
        assert pathlib.Path(png).stat().st_size > 0 and pathlib.Path(svg).exists()
    (m, (layers, mean)), = figures.mixing_weights_by_batch(rows).items()
    mix_row = [r for r in rows if r["norm"] == "mix"][0]
    assert m == 8 and len(layers) == 7
    assert mean == pytest.approx(mix_row["alpha_batch_mean"], rel=1e-9)


@pytest.mark.parametrize("overrides, words", [
    (dict(model="resnet50", image_size=32, bn_batch_size=1, batch_size=2, epochs=1),
     ["the 1x1-pixel channels of resnet50's deepest layers"]),
    (dict(model="alexnet_reduced", norm="batch", bn_sync=True, batch_size=1),
     ["over BN groups of 1 example"]),
    (dict(norm="layer", bn_momentum=0.9), ["--bn_momentum does not apply to --norm=layer"]),
    (dict(norm="none", bn_epsilon=1e-5), ["--bn_epsilon does not apply to --norm=none"]),
    (dict(norm="group", bn_moving_variance="biased"), ["--bn_moving_variance does not apply"]),
    (dict(norm="mix", mix_norms=("layer", "instance"), bn_momentum=0.9),
     ["--bn_momentum does not apply to --norm=mix"]),
    (dict(norm="batch_renorm", renorm_start_step=-7), ["--renorm_start_step=-7 must be a step"]),
])
def test_more_inapplicable_and_degenerate_settings(overrides, words):
    with pytest.raises(ConfigError) as caught:
        _config(**{**dict(dataset="synthetic"), **overrides}).resolve().check_replicas(1)
    for word in words:
        assert word in str(caught.value)


def test_renorm_default_steps_round_half_up():
    # 4 steps per epoch; (5%, 40%, 25%) of 40, 28, 36 and 200 steps, by hand:
    # 40: 2, 16, 10;  28: 1.4, 11.2, 7 -> 1, 11, 7;  36: 1.8, 14.4, 9 -> 2, 14, 9;  200: 10, 80, 50
    cases = {10: (2, 16, 10), 7: (1, 11, 7), 9: (2, 14, 9), 50: (10, 80, 50)}
    for epochs, (start, r_end, d_end) in cases.items():
        cfg = _config(norm="batch_renorm", epochs=epochs).resolve()
        assert (cfg.renorm_start_step, cfg.renorm_r_end_step,
                cfg.renorm_d_end_step) == (start, r_end, d_end), epochs
    # 0.05 x 10 steps = 0.5 exactly: a half rounds up, not to even.
    half = _config(norm="batch_renorm", epochs=5, synthetic_train=16).resolve()
    assert half.renorm_start_step == 1  # 2 steps x 5 epochs = 10 steps


def test_a_bn_point_of_a_norm_sweep_drops_options_only_bn_reads(tmp_path):
    base = _config(output_dir=str(tmp_path), bn_momentum=0.9)
    grid = grid_lib.Grid.from_flags(base, {"norm": "batch,layer"}, seeds=1)
    configs = dict((p.name, cfg) for p, cfg in grid_lib.split_points(
        base, grid, lambda p: str(tmp_path / p.name))[0])
    assert configs["norm-batch"].bn_momentum == 0.9
    assert configs["norm-layer"].bn_momentum == 0.99  # layer norm has no moving statistics


@pytest.mark.slow  # ~17 s
def test_mix_trains_the_same_on_two_replicas(tmp_path, mirrored):
    from sbt_keras.train import train

    def run(name, **extra):
        cfg = _config(output_dir=str(tmp_path / name), norm="mix", epochs=1, bn_batch_size=4,
                      synthetic_train=16).resolve()
        train(cfg, **extra)
        return snapshot.load(cfg.output_dir)

    one, two = run("one"), run("two", strategy=mirrored)  # 2 replicas x 4 = one BN group each
    for a, b in zip(one.network.weights, two.network.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-6, err_msg=a.path)
    assert one.step == two.step == 2
