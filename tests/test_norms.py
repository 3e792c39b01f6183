"""The normalization study's layers against independent float64 numpy references.

The references below are written from the formulas (docs/normalization.md) with explicit
loops over examples and groups; they share no code with sbt_keras.layers. Gradients are
checked against central finite differences of those references, in which batch
renormalization's r and d are held constant (its stop-gradient).
"""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras import norms
from sbt_keras.errors import ConfigError
from sbt_keras.layers import (
    NORMS, BatchRenormalization, ExampleNormalization, MixedNormalization, norm_layer)

EPS = 1e-3
MOMENTUM = 0.9
CONV = (8, 4, 4, 3)
DENSE = (8, 5)


def _inputs(shape, seed=0):
    # Non-zero mean, non-unit scale: a wrong mean or variance cannot pass by luck.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2.0 + 1.5).astype(np.float32)


def _affine(channels, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)


def _set_affine(layer, channels):
    gamma, beta = _affine(channels)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return gamma, beta


# ----------------------------------------------------------------------------------------
# float64 numpy references


def _pixels(a):
    """[n, ..., C] -> [n * pixels, C]: the rows one channel's batch statistics run over."""
    return a.reshape(-1, a.shape[-1])


def np_example_norm(x, groups, gamma, beta):
    """Per example and channel group: mean and biased variance over pixels x group."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    size = x.shape[-1] // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            block = x[n, ..., g * size:(g + 1) * size]
            out[n, ..., g * size:(g + 1) * size] = (block - block.mean()) / np.sqrt(
                block.var() + EPS)
    return gamma * out + beta


def _group_slices(n, group):
    group = group or n
    return [slice(s, s + group) for s in range(0, n, group)]


def np_renorm(x, group, gamma, beta, mm, mv, r_max, d_max, rd=None):
    """Batch renorm forward. Returns (y, r per group, d per group, mu per group, var per
    group). `rd`: (r, d) to use instead of computing them (held constant for gradients)."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    rs, ds, mus, vs = [], [], [], []
    sigma = np.sqrt(mv + EPS)
    for i, sl in enumerate(_group_slices(x.shape[0], group)):
        rows = _pixels(x[sl])
        mu, var = rows.mean(axis=0), rows.var(axis=0)
        sigma_b = np.sqrt(var + EPS)
        if rd is None:
            r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
            d = np.clip((mu - mm) / sigma, -d_max, d_max)
        else:
            r, d = rd[0][i], rd[1][i]
        out[sl] = gamma * ((x[sl] - mu) / sigma_b * r + d) + beta
        rs.append(r)
        ds.append(d)
        mus.append(mu)
        vs.append(var)
    return out, np.array(rs), np.array(ds), np.array(mus), np.array(vs)


def np_moving_update(mm, mv, mus, vs, count, unbiased=True):
    correction = count / (count - 1) if unbiased and count > 1 else 1.0
    return (MOMENTUM * mm + (1 - MOMENTUM) * mus.mean(axis=0),
            MOMENTUM * mv + (1 - MOMENTUM) * vs.mean(axis=0) * correction)


def np_alpha(logits, k):
    z = np.asarray(logits, np.float64)
    if k == 2:
        a = 1.0 / (1.0 + np.exp(-z))
        return np.stack([a, 1.0 - a])
    e = np.exp(z - z.max(axis=0))
    return e / e.sum(axis=0)


def np_mix(x, components, logits, group, gamma, beta, training=True, mm=None, mv=None):
    """Mixed normalization forward; returns (y, batch group means, batch group vars)."""
    x = x.astype(np.float64)
    alpha = np_alpha(logits, len(components))  # [K] or [K, C]
    out = np.empty_like(x)
    mus, vs = [], []
    for sl in _group_slices(x.shape[0], group if training else None):
        rows = _pixels(x[sl])
        batch_mu, batch_var = (rows.mean(axis=0), rows.var(axis=0)) if training else (mm, mv)
        mus.append(batch_mu)
        vs.append(batch_var)
        for n in range(sl.start, sl.stop):
            stats = {"batch": (batch_mu, batch_var),
                     "layer": (x[n].mean(), x[n].var())}
            if x.ndim > 2:
                pixels = _pixels(x[n])
                stats["instance"] = (pixels.mean(axis=0), pixels.var(axis=0))
            mu = sum(alpha[k] * stats[c][0] for k, c in enumerate(components))
            var = sum(alpha[k] * stats[c][1] for k, c in enumerate(components))
            out[n] = gamma * (x[n] - mu) / np.sqrt(var + EPS) + beta
    return out, np.array(mus), np.array(vs)


def finite_differences(loss, value, h=1e-6):
    """Central differences of scalar loss(value) for every element of `value` (float64)."""
    value = np.array(value, np.float64)
    grad = np.empty_like(value)
    flat, gflat = value.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = loss(value)
        flat[i] = keep - h
        down = loss(value)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * h)
    return grad


def _assert_grad(got, want, what):
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def _tape_gradients(layer, x, readout, variables):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.cast(layer(xt, training=True), tf.float32) * readout)
    return [g.numpy() for g in tape.gradient(loss, [xt] + [v.value for v in variables])]


# ----------------------------------------------------------------------------------------
# The TensorFlow-free table


def test_norms_table_imports_without_tensorflow():
    code = ("import sys, sbt_keras.norms; "
            "assert not {'tensorflow', 'keras'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ),
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_norms_table_facts():
    for name, keys in norms.NORM_OPTIONS.items():
        assert set(keys) <= set(norms.OPTION_NAMES), name
    assert norms.BATCH_STAT_NORMS == {"batch", "batch_renorm", "mix"}
    assert norms.uses_batch_statistics("mix", ("batch", "instance"))
    assert not norms.uses_batch_statistics("mix", ("layer", "instance"))
    assert not norms.uses_batch_statistics("group")
    assert norms.needs_spatial_inputs("instance")
    assert norms.needs_spatial_inputs("mix", ("instance", "layer"))
    assert not norms.needs_spatial_inputs("mix")
    assert norms.mix_components(("layer", "batch")) == ("batch", "layer")
    assert norms.mix_components("layer,instance,batch") == norms.MIX_COMPONENTS


@pytest.mark.parametrize("name, options, match", [
    ("mix", {"mix_norms": ("batch",)}, "2 or 3 different"),
    ("mix", {"mix_norms": ("batch", "batch")}, "2 or 3 different"),
    ("mix", {"mix_norms": ("batch", "group")}, "unknown component"),
    ("group", {"gn_groups": 0}, "gn_groups"),
    ("batch_renorm", {"renorm_r_max": 0.5}, "renorm_r_max"),
    ("batch_renorm", {"renorm_d_max": -1.0}, "renorm_d_max"),
    ("batch_renorm", {"renorm_start_step": 10, "renorm_r_end_step": 5}, "renorm_r_end_step"),
    ("batch_renorm", {"moving_variance": "exact"}, "moving_variance"),
    ("mix", {"bn_batch_size": 0}, "bn_batch_size"),
])
def test_check_options_rejects(name, options, match):
    with pytest.raises(ValueError, match=match):
        norms.check_options(name, **options)
    with pytest.raises(ValueError, match=match):
        norm_layer(name, channels=4, layer_name="n", **options)


def test_options_other_norms_use_are_ignored_and_unknown_keys_rejected():
    everything = dict(norms.DEFAULT_OPTIONS, gn_groups=2, bn_batch_size=2)
    for name in NORMS:
        norm_layer(name, channels=4, layer_name=f"n_{name}", **everything)
    with pytest.raises(TypeError, match="bn_batchsize"):
        norm_layer("batch", channels=4, layer_name="n", bn_batchsize=2)
    with pytest.raises(ConfigError, match="--norm=xyz is unknown"):
        norm_layer("xyz", channels=4, layer_name="n")


# ----------------------------------------------------------------------------------------
# layer / instance / group


@pytest.mark.parametrize("mode, groups, shape", [
    ("layer", 1, CONV), ("layer", 1, DENSE), ("instance", 3, CONV),
    ("group", 2, (4, 4, 4, 4)), ("group", 2, (8, 6)), ("group", 3, (4, 3, 3, 6)),
])
def test_example_norms_match_numpy_in_training_and_inference(mode, groups, shape):
    options = {"gn_groups": groups} if mode == "group" else {}
    layer = norm_layer(mode, channels=shape[-1], layer_name=f"n_{mode}", epsilon=EPS, **options)
    layer.build((None,) + shape[1:])
    gamma, beta = _set_affine(layer, shape[-1])
    x = _inputs(shape)
    want = np_example_norm(x, groups, gamma, beta)
    for training in (True, False):
        np.testing.assert_allclose(layer(x, training=training).numpy(), want, rtol=1e-4,
                                   atol=1e-4)
    assert not layer.non_trainable_weights


def test_group_norm_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"conv3_norm: gn_groups=32 does not divide its 48 "
                                         r"channels"):
        norm_layer("group", channels=48, layer_name="conv3_norm")
    layer = ExampleNormalization("group", groups=4, name="g")
    with pytest.raises(ValueError, match="g: gn_groups=4 does not divide its 6 channels"):
        layer(_inputs((2, 4, 4, 6)))
    assert norm_layer("group", channels=64, layer_name="n").groups == 32


def test_instance_norm_on_dense_inputs_is_an_error():
    layer = norm_layer("instance", channels=5, layer_name="fc1_norm")
    with pytest.raises(ValueError, match=r"fc1_norm: instance normalization needs spatial "
                                         r"inputs.*--nonorm_dense"):
        layer(_inputs(DENSE))
    mix = norm_layer("mix", channels=5, layer_name="fc2_norm", mix_norms=("batch", "instance"))
    with pytest.raises(ValueError, match=r"fc2_norm: mix with an 'instance' component needs "
                                         r"spatial inputs.*--nonorm_dense"):
        mix(_inputs(DENSE))


# ----------------------------------------------------------------------------------------
# batch_renorm

RENORM_SCHEDULE = dict(r_max=2.0, d_max=1.0, start_step=0, r_end_step=4, d_end_step=2)


def _closed_form_limits(step, r_max, d_max, start_step, r_end_step, d_end_step):
    def ramp(lo, hi, end):
        if step <= start_step:
            return lo
        return lo + (hi - lo) * min(1.0, (step - start_step) / (end - start_step))
    return ramp(1.0, r_max, r_end_step), ramp(0.0, d_max, d_end_step)


@pytest.mark.parametrize("step", [0, 5, 10, 11, 17, 30, 40, 41, 1000])
def test_renorm_ramp_matches_closed_form(step):
    schedule = dict(r_max=3.0, d_max=5.0, start_step=10, r_end_step=40, d_end_step=30)
    want = _closed_form_limits(step, **schedule)
    layer = BatchRenormalization(**schedule)
    layer.build((None, 3))
    layer.renorm_step.assign(step)
    got = [float(v) for v in layer.renorm_limits()]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_renorm_defaults_are_ioffes_schedule():
    layer = norm_layer("batch_renorm", channels=3, layer_name="n")
    assert (layer.r_max, layer.d_max, layer.start_step, layer.r_end_step, layer.d_end_step) == (
        3.0, 5.0, 5000, 40000, 25000)
    assert layer.moving_variance_mode == "unbiased"


def _renorm_layer(shape, group, moving_variance="unbiased", step=1, mm=None, mv=None):
    layer = norm_layer("batch_renorm", channels=shape[-1], layer_name="rn",
                       bn_batch_size=group, momentum=MOMENTUM, epsilon=EPS,
                       moving_variance=moving_variance,
                       **{f"renorm_{k}": v for k, v in RENORM_SCHEDULE.items()})
    layer.build((None,) + shape[1:])
    gamma, beta = _set_affine(layer, shape[-1])
    c = shape[-1]
    # Per channel: near the batch statistics (r, d unclipped), far below and far above
    # them (r and d clipped at both ends).
    mm = np.resize([1.3, -3.0, 5.0], c) if mm is None else mm
    mv = np.resize([4.0, 0.3, 40.0], c) if mv is None else mv
    layer.moving_mean.assign(mm)
    layer.moving_variance.assign(mv)
    layer.renorm_step.assign(step)
    return layer, gamma, beta, mm, mv


@pytest.mark.parametrize("shape, group, moving_variance", [
    (CONV, 1, "unbiased"), (CONV, 2, "unbiased"), (CONV, 4, "biased"), (CONV, None, "unbiased"),
    (DENSE, 2, "unbiased"), (DENSE, 4, "biased"), (DENSE, None, "unbiased"),
])
def test_batch_renorm_matches_numpy_over_two_steps_and_at_inference(shape, group,
                                                                    moving_variance):
    layer, gamma, beta, mm, mv = _renorm_layer(shape, group, moving_variance)
    count = (group or shape[0]) * int(np.prod(shape[1:-1]))
    for step, seed in ((1, 0), (2, 2)):
        x = _inputs(shape, seed)
        r_max, d_max = _closed_form_limits(step, **RENORM_SCHEDULE)
        want, _, _, mus, vs = np_renorm(x, group, gamma, beta, mm, mv, r_max, d_max)
        np.testing.assert_allclose(layer(x, training=True).numpy(), want, rtol=1e-4, atol=1e-4)
        mm, mv = np_moving_update(mm, mv, mus, vs, count, moving_variance == "unbiased")
        np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-5, atol=1e-6)
        assert int(layer.renorm_step.numpy()) == step + 1
    x = _inputs((3,) + shape[1:], seed=4)  # inference takes any batch size
    want = gamma * (x.astype(np.float64) - mm) / np.sqrt(mv + EPS) + beta
    np.testing.assert_allclose(layer(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)
    assert int(layer.renorm_step.numpy()) == 3  # inference does not count


def test_batch_renorm_before_the_ramp_is_sub_batch_bn():
    layer, gamma, beta, mm, mv = _renorm_layer(CONV, 2, step=0)
    x = _inputs(CONV)
    want = np.empty(CONV)
    for sl in _group_slices(CONV[0], 2):
        rows = _pixels(x[sl].astype(np.float64))
        want[sl] = gamma * (x[sl] - rows.mean(0)) / np.sqrt(rows.var(0) + EPS) + beta
    np.testing.assert_allclose(layer(x, training=True).numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, group", [(CONV, 2), (DENSE, 4)])
def test_batch_renorm_gradients_match_finite_differences(shape, group):
    x = _inputs(shape)
    # Channel 0's moving statistics are the batch's own, so its r and d stay unclipped.
    rows = _pixels(x.astype(np.float64))
    mm = np.resize([rows[:, 0].mean(), -3.0, 5.0], shape[-1])
    mv = np.resize([rows[:, 0].var(), 0.3, 40.0], shape[-1])
    layer, gamma, beta, mm, mv = _renorm_layer(shape, group, mm=mm, mv=mv)
    readout = np.random.default_rng(3).normal(size=shape)
    r_max, d_max = _closed_form_limits(1, **RENORM_SCHEDULE)
    _, r, d, _, _ = np_renorm(x, group, gamma, beta, mm, mv, r_max, d_max)
    # The regime this test is about: r and d clipped in some channels, free in others.
    assert np.any(np.isclose(r, r_max)) and np.any(np.isclose(r, 1 / r_max))
    assert np.any(np.abs(d) == d_max) and np.any(np.abs(d) < d_max)
    assert np.any((r > 1 / r_max) & (r < r_max))

    def loss(x_=x, g_=gamma, b_=beta):
        return np.sum(np_renorm(x_, group, g_, b_, mm, mv, r_max, d_max, rd=(r, d))[0]
                      * readout)

    got = _tape_gradients(layer, x, readout.astype(np.float32), [layer.gamma, layer.beta])
    _assert_grad(got[0], finite_differences(lambda v: loss(x_=v), x), "inputs")
    _assert_grad(got[1], finite_differences(lambda v: loss(g_=v), gamma), "gamma")
    _assert_grad(got[2], finite_differences(lambda v: loss(b_=v), beta), "beta")


def test_renorm_step_checkpointed_and_agreed_across_replicas(mirrored):
    strategy = mirrored
    with strategy.scope():
        layer, gamma, beta, _, _ = _renorm_layer(CONV, 2, step=1)
    single, _, _, _, _ = _renorm_layer(CONV, 2, step=1)
    x = _inputs(CONV)
    half = CONV[0] // 2
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * half:][:half]))
    step = tf.function(lambda t: layer(t, training=True))
    outputs = strategy.run(step, args=(shards,))
    strategy.run(step, args=(shards,))
    want = single(x, training=True).numpy()
    single(x, training=True)
    got = np.concatenate([o.numpy() for o in strategy.experimental_local_results(outputs)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    counters = strategy.experimental_local_results(layer.renorm_step.value)
    assert [int(c.numpy()) for c in counters] == [3, 3]
    for name in ("moving_mean", "moving_variance"):
        for copy in strategy.experimental_local_results(getattr(layer, name).value):
            np.testing.assert_allclose(copy.numpy(), getattr(single, name).numpy(),
                                       rtol=1e-5, atol=1e-6)
    assert "renorm_step" in [w.name for w in layer.non_trainable_weights]


# ----------------------------------------------------------------------------------------
# mix

MIX_CASES = [
    (("batch", "layer"), False, CONV, 2), (("batch", "layer"), True, CONV, None),
    (("batch", "instance"), True, CONV, 4), (("instance", "layer"), False, CONV, 2),
    (("batch", "instance", "layer"), False, CONV, 2),
    (("batch", "instance", "layer"), True, CONV, 1),
    (("batch", "layer"), False, DENSE, 4), (("batch", "layer"), True, DENSE, None),
]


def _mix_layer(components, per_channel, shape, group, seed=5):
    layer = norm_layer("mix", channels=shape[-1], layer_name="mix", mix_norms=components,
                       mix_per_channel=per_channel, bn_batch_size=group, momentum=MOMENTUM,
                       epsilon=EPS)
    layer.build((None,) + shape[1:])
    gamma, beta = _set_affine(layer, shape[-1])
    logits = np.random.default_rng(seed).normal(size=layer.mix_logits.shape)
    layer.mix_logits.assign(logits)
    return layer, gamma, beta, logits


@pytest.mark.parametrize("components, per_channel, shape, group", MIX_CASES)
def test_mix_matches_numpy_over_two_steps_and_at_inference(components, per_channel, shape,
                                                           group):
    layer, gamma, beta, logits = _mix_layer(components, per_channel, shape, group)
    np.testing.assert_allclose(layer.mixing_weights().numpy(),
                               np_alpha(logits, len(components)), rtol=1e-6)
    mm, mv = np.zeros(shape[-1]), np.ones(shape[-1])
    count = (group or shape[0]) * int(np.prod(shape[1:-1]))
    for seed in (0, 2):
        x = _inputs(shape, seed)
        want, mus, vs = np_mix(x, components, logits, group, gamma, beta)
        np.testing.assert_allclose(layer(x, training=True).numpy(), want, rtol=1e-4, atol=1e-4)
        if "batch" in components:
            mm, mv = np_moving_update(mm, mv, mus, vs, count)
            np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-5, atol=1e-6)
    x = _inputs((3,) + shape[1:], seed=4)  # inference takes any batch size
    want, _, _ = np_mix(x, components, logits, group, gamma, beta, training=False, mm=mm, mv=mv)
    np.testing.assert_allclose(layer(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("components, per_channel, shape, group", [
    (("batch", "layer"), True, CONV, 2), (("batch", "instance", "layer"), False, CONV, 4),
    (("batch", "instance", "layer"), True, (4, 3, 3, 2), 2), (("batch", "layer"), False, DENSE, 4),
])
def test_mix_gradients_match_finite_differences(components, per_channel, shape, group):
    layer, gamma, beta, logits = _mix_layer(components, per_channel, shape, group)
    x = _inputs(shape)
    readout = np.random.default_rng(3).normal(size=shape)

    def loss(x_=x, g_=gamma, b_=beta, z_=logits):
        return np.sum(np_mix(x_, components, z_, group, g_, b_)[0] * readout)

    got = _tape_gradients(layer, x, readout.astype(np.float32),
                          [layer.gamma, layer.beta, layer.mix_logits])
    _assert_grad(got[0], finite_differences(lambda v: loss(x_=v), x), "inputs")
    _assert_grad(got[1], finite_differences(lambda v: loss(g_=v), gamma), "gamma")
    _assert_grad(got[2], finite_differences(lambda v: loss(b_=v), beta), "beta")
    _assert_grad(got[3], finite_differences(lambda v: loss(z_=v), logits), "mix_logits")


@pytest.mark.parametrize("components, per_channel, shape", [
    (("batch", "layer"), False, ()), (("layer", "batch"), True, (3,)),
    (("batch", "instance", "layer"), False, (3,)), (("instance", "layer", "batch"), True, (3, 3)),
])
def test_mix_starts_as_an_equal_mix(components, per_channel, shape):
    layer = norm_layer("mix", channels=3, layer_name="mix", mix_norms=components,
                       mix_per_channel=per_channel)
    layer.build((None, 4, 4, 3))
    assert layer.components == tuple(c for c in norms.MIX_COMPONENTS if c in components)
    assert layer.mix_logits.shape == shape and "mix_logits" in layer.mix_logits.path
    assert layer.mix_logits.trainable
    weights = layer.mixing_weights().numpy()
    k = len(components)
    assert weights.shape == (k,) + shape[len(shape) - (1 if per_channel else 0):]
    np.testing.assert_allclose(weights, 1.0 / k, rtol=1e-6)


def test_mix_without_batch_component_has_no_moving_statistics():
    layer = norm_layer("mix", channels=3, layer_name="mix", mix_norms=("instance", "layer"))
    layer.build((None, 4, 4, 3))
    assert not layer.non_trainable_weights


# ----------------------------------------------------------------------------------------
# Every registered norm in a model


def _tiny_model(name, dtype=None, **options):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), batch_size=4)
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, dtype=dtype)(inputs)
    x = _norm(name, x, 4, "conv_norm", dtype, **options)
    x = keras.layers.ReLU(dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    x = keras.layers.Dense(6, dtype=dtype)(x)
    if not norms.needs_spatial_inputs(name, options.get("mix_norms")):
        x = _norm(name, x, 6, "fc_norm", dtype, **options)
    logits = keras.layers.Dense(2, dtype="float32")(x)
    return keras.Model(inputs, logits)


def _norm(name, x, channels, layer_name, dtype, **options):
    layer = norm_layer(name, channels=channels, layer_name=layer_name, **options)
    if layer is None:
        return x
    if dtype is not None:
        layer = layer.__class__.from_config(dict(layer.get_config(), dtype=dtype))
    return layer(x)


REGISTRY_CASES = [(name, {}) for name in NORMS] + [
    ("mix", {"mix_norms": ("batch", "instance", "layer"), "mix_per_channel": True})]


@pytest.mark.parametrize("name, options", REGISTRY_CASES)
def test_every_norm_trains_one_step_in_a_conv_and_dense_model(name, options):
    model = _tiny_model(name, bn_batch_size=2, gn_groups=2, **options)
    x = _inputs((4, 8, 8, 3))
    labels = tf.constant([0, 1, 1, 0])
    before = [v.numpy().copy() for v in model.trainable_variables]
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, model(x, training=True), from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    optimizer.apply(grads, model.trainable_variables)
    assert np.isfinite(loss.numpy())
    for v, old in zip(model.trainable_variables, before):
        assert np.all(np.isfinite(v.numpy())), v.path
    assert any(not np.array_equal(v.numpy(), old)
               for v, old in zip(model.trainable_variables, before))
    assert np.all(np.isfinite(model(x, training=False).numpy()))


@pytest.mark.parametrize("name", [n for n in NORMS if n not in ("none", "batch")])
def test_bfloat16_output_and_float32_statistics(name):
    x = _inputs(CONV)
    full = norm_layer(name, channels=3, layer_name="n", bn_batch_size=2, gn_groups=3)
    half = full.__class__.from_config(dict(full.get_config(), dtype="mixed_bfloat16"))
    y32 = full(x, training=True).numpy()
    y16 = half(x.astype(keras.backend.standardize_dtype("bfloat16")), training=True)
    assert y16.dtype == tf.bfloat16
    assert all(v.dtype in ("float32", "int64") for v in half.weights), \
        [(v.path, v.dtype) for v in half.weights]
    np.testing.assert_allclose(tf.cast(y16, tf.float32).numpy(), y32, atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("layer", [
    BatchRenormalization(bn_batch_size=2, momentum=0.5, epsilon=1e-4, moving_variance="biased",
                         r_max=2.0, d_max=1.5, start_step=3, r_end_step=9, d_end_step=7,
                         center=False, name="rn"),
    MixedNormalization(mix_norms=("layer", "instance", "batch"), per_channel=True,
                       bn_batch_size=4, momentum=0.8, epsilon=1e-5, moving_variance="biased",
                       scale=False, name="mx"),
    ExampleNormalization("group", groups=3, epsilon=1e-4, name="gn"),
    ExampleNormalization("instance", name="in"),
], ids=lambda layer: layer.name)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is type(layer) and clone.get_config() == config
    assert keras.saving.get_registered_name(type(layer)).startswith("sbt_keras>")


def test_saved_model_keeps_renorm_step_mix_logits_and_moving_statistics(tmp_path):
    inputs = keras.Input((4, 4, 3))
    x = norm_layer("batch_renorm", channels=3, layer_name="rn", bn_batch_size=2,
                   renorm_start_step=0, renorm_r_end_step=2, renorm_d_end_step=2)(inputs)
    x = norm_layer("mix", channels=3, layer_name="mx", bn_batch_size=4,
                   mix_norms=("batch", "instance", "layer"))(x)
    model = keras.Model(inputs, x)
    x = _inputs(CONV)
    model(x, training=True)
    model(x, training=True)
    model.get_layer("mx").mix_logits.assign([0.3, -0.2, 0.5])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert int(loaded.get_layer("rn").renorm_step.numpy()) == 2
    np.testing.assert_allclose(loaded.get_layer("mx").mixing_weights().numpy(),
                               model.get_layer("mx").mixing_weights().numpy())
    np.testing.assert_allclose(loaded(x, training=False).numpy(),
                               model(x, training=False).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["batch_renorm", "mix"])
def test_sub_batches_with_unknown_batch_dimension_in_a_graph(name):
    layer = norm_layer(name, channels=3, layer_name="n", bn_batch_size=4)
    spec = [tf.TensorSpec([None, 4, 4, 3], tf.float32)]
    train = tf.function(lambda t: layer(t, training=True), input_signature=spec)
    infer = tf.function(lambda t: layer(t, training=False), input_signature=spec)
    assert train(_inputs(CONV)).shape == CONV
    assert infer(_inputs((3, 4, 4, 3))).shape == (3, 4, 4, 3)  # inference: no groups
    with pytest.raises(tf.errors.InvalidArgumentError, match="not divisible by bn_batch_size=4"):
        train(_inputs((6, 4, 4, 3)))
    with pytest.raises(ValueError, match="n: batch of 6 examples per replica is not divisible"):
        layer(_inputs((6, 4, 4, 3)), training=True)


@pytest.mark.parametrize("make", [
    lambda: BatchRenormalization(momentum=0.5, r_max=2.0, d_max=1.0, start_step=0,
                                 r_end_step=0, d_end_step=0),
    lambda: MixedNormalization(mix_norms=("batch", "layer"), momentum=0.5)])
def test_frozen_learned_norms_use_and_keep_their_moving_statistics(make):
    # Keras BN's contract: trainable=False means inference behaviour even when training.
    layer = make()
    x = np.random.default_rng(7).normal(2.0, 3.0, size=(4, 3, 3, 2)).astype(np.float32)
    layer(x, training=True)  # one update: the moving statistics are no longer 0 and 1
    moving = [layer.moving_mean, layer.moving_variance]
    before = [v.numpy().copy() for v in moving]
    layer.trainable = False
    np.testing.assert_array_equal(layer(x, training=True).numpy(),
                                  layer(x, training=False).numpy())
    for b, v in zip(before, moving):
        np.testing.assert_array_equal(b, v.numpy())
