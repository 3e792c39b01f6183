"""SubBatchNormalization against float64 numpy references, Keras BN, and MirroredStrategy."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras.errors import ConfigError
from sbt_keras.layers import NORMS, SubBatchNormalization, norm_layer

EPS = 1e-3
MOMENTUM = 0.9
CONV_SHAPE = (8, 4, 4, 3)
DENSE_SHAPE = (8, 5)


def _inputs(shape, seed=0):
    # Non-zero mean and non-unit scale so a wrong mean or variance cannot pass by luck.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2.0 + 1.5).astype(np.float32)


def _affine_params(channels, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)


def _layer(shape, bn_batch_size, **kwargs):
    """A built layer with random gamma/beta; returns (layer, gamma, beta)."""
    layer = SubBatchNormalization(bn_batch_size=bn_batch_size, momentum=MOMENTUM, epsilon=EPS,
                                  **kwargs)
    layer.build((None,) + shape[1:])
    gamma, beta = _affine_params(shape[-1])
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return layer, gamma, beta


def _numpy_group_bn(x, group, gamma, beta):
    """Per-group BN in float64: returns (output, per-group means, per-group biased vars)."""
    x = x.astype(np.float64)
    group = group or x.shape[0]
    axes = tuple(range(x.ndim - 1))
    out, means, variances = np.empty_like(x), [], []
    for start in range(0, x.shape[0], group):
        part = x[start:start + group]
        mu, var = part.mean(axis=axes), part.var(axis=axes)  # np.var is biased (ddof=0)
        out[start:start + group] = gamma * (part - mu) / np.sqrt(var + EPS) + beta
        means.append(mu)
        variances.append(var)
    return out, np.array(means), np.array(variances)


@pytest.mark.parametrize(
    "shape, group",
    [(CONV_SHAPE, 1), (CONV_SHAPE, 2), (CONV_SHAPE, 4), (CONV_SHAPE, 8), (CONV_SHAPE, None),
     (DENSE_SHAPE, 2), (DENSE_SHAPE, 4), (DENSE_SHAPE, None)],
)
def test_training_output_and_moving_stats_match_numpy(shape, group):
    layer, gamma, beta = _layer(shape, group, moving_variance="biased")
    x1, x2 = _inputs(shape, seed=0), _inputs(shape, seed=2)

    y1 = layer(x1, training=True)
    want1, mu1, var1 = _numpy_group_bn(x1, group, gamma, beta)
    np.testing.assert_allclose(y1.numpy(), want1, rtol=1e-4, atol=1e-4)
    # One update per call, from the mean over groups of each group's statistics.
    mean = (1 - MOMENTUM) * mu1.mean(axis=0)
    var = MOMENTUM * 1.0 + (1 - MOMENTUM) * var1.mean(axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)

    layer(x2, training=True)
    _, mu2, var2 = _numpy_group_bn(x2, group, gamma, beta)
    mean = MOMENTUM * mean + (1 - MOMENTUM) * mu2.mean(axis=0)
    var = MOMENTUM * var + (1 - MOMENTUM) * var2.mean(axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE])
@pytest.mark.parametrize("group", [None, 8])
def test_whole_batch_equals_keras_batch_normalization(shape, group):
    # Keras BN's moving variance is the biased batch variance.
    layer, gamma, beta = _layer(shape, group, moving_variance="biased")
    reference = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS)
    reference.build((None,) + shape[1:])
    reference.gamma.assign(gamma)
    reference.beta.assign(beta)
    x = _inputs(shape)

    np.testing.assert_allclose(
        layer(x, training=True).numpy(), reference(x, training=True).numpy(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(layer.moving_mean.numpy(), reference.moving_mean.numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), reference.moving_variance.numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, group", [(CONV_SHAPE, 2), (CONV_SHAPE, 4), (DENSE_SHAPE, 4)])
def test_gradients_equal_keras_bn_applied_per_group(shape, group):
    layer, gamma, beta = _layer(shape, group)
    reference = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS)
    reference.build((None,) + shape[1:])
    reference.gamma.assign(gamma)
    reference.beta.assign(beta)
    x = tf.constant(_inputs(shape))
    # A random linear read-out makes every output element matter to the gradient.
    weights = tf.constant(np.random.default_rng(3).normal(size=shape).astype(np.float32))

    def grads(fn, variables):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x) * weights)
        return tape.gradient(loss, [x] + variables)

    got = grads(lambda t: layer(t, training=True), [layer.gamma.value, layer.beta.value])
    want = grads(
        lambda t: tf.concat(
            [reference(t[i:i + group], training=True) for i in range(0, shape[0], group)], 0
        ),
        [reference.gamma.value, reference.beta.value],
    )
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, group", [(CONV_SHAPE, 2), (CONV_SHAPE, 4), (DENSE_SHAPE, 4)])
def test_moving_statistics_are_the_mean_of_per_group_keras_bn_copies(shape, group):
    # G independent Keras BN layers, copy g fed only group g at every step: our single
    # moving mean/variance must equal the mean over the copies' (Keras takes the biased
    # variance too). Feeding one Keras layer the groups in turn would instead apply G
    # updates per step; the sub-batch convention is one update per step.
    layer, gamma, beta = _layer(shape, group, moving_variance="biased")
    copies = []
    for _ in range(shape[0] // group):
        copy = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS)
        copy.build((None,) + shape[1:])
        copies.append(copy)
    for seed in (0, 2, 5):  # three steps: the averaging must hold through the recursion
        x = _inputs(shape, seed=seed)
        layer(x, training=True)
        for g, copy in enumerate(copies):
            copy(x[g * group:(g + 1) * group], training=True)
        for name in ("moving_mean", "moving_variance"):
            want = np.mean([getattr(c, name).numpy() for c in copies], axis=0)
            np.testing.assert_allclose(getattr(layer, name).numpy(), want, rtol=1e-5,
                                       atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE])
def test_inference_uses_moving_statistics(shape):
    layer, gamma, beta = _layer(shape, 2)
    rng = np.random.default_rng(4)
    mean, var = rng.normal(size=shape[-1]), rng.uniform(0.5, 3.0, shape[-1])
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(var)
    x = _inputs(shape)

    y = layer(x, training=False).numpy()

    want = gamma * (x.astype(np.float64) - mean) / np.sqrt(var + EPS) + beta
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)  # no update


def test_indivisible_batch_raises_statically():
    layer = SubBatchNormalization(bn_batch_size=4)
    with pytest.raises(ValueError, match="not divisible by bn_batch_size=4"):
        layer(_inputs((6, 4, 4, 3)), training=True)


def test_indivisible_batch_raises_with_unknown_batch_dimension():
    layer = SubBatchNormalization(bn_batch_size=4)
    step = tf.function(
        lambda t: layer(t, training=True),
        input_signature=[tf.TensorSpec([None, 4, 4, 3], tf.float32)],
    )
    assert step(_inputs((8, 4, 4, 3))).shape == (8, 4, 4, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not divisible"):
        step(_inputs((6, 4, 4, 3)))


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_invalid_bn_batch_size_rejected(bad):
    with pytest.raises(ValueError, match="bn_batch_size"):
        SubBatchNormalization(bn_batch_size=bad)


def test_get_config_round_trip():
    layer = SubBatchNormalization(bn_batch_size=4, momentum=0.9, epsilon=1e-5, center=False,
                                  scale=True, name="bn7")
    clone = SubBatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.bn_batch_size, clone.momentum, clone.epsilon, clone.center, clone.scale) == (
        4, 0.9, 1e-5, False, True
    )
    clone.build((None, 3))
    assert [v.name for v in clone.trainable_variables] == ["gamma"]


def test_float16_output_and_float32_statistics():
    half, gamma, beta = _layer(CONV_SHAPE, 2, dtype="mixed_float16")
    full, _, _ = _layer(CONV_SHAPE, 2)
    x = _inputs(CONV_SHAPE)

    y16 = half(x.astype(np.float16), training=True)
    y32 = full(x, training=True)

    assert y16.dtype == tf.float16
    assert half.moving_mean.dtype == "float32" and half.gamma.dtype == "float32"
    np.testing.assert_allclose(y16.numpy().astype(np.float32), y32.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(half.moving_variance.numpy(), full.moving_variance.numpy(),
                               rtol=1e-3)


def test_mirrored_strategy_matches_single_device(mirrored):
    strategy = mirrored
    with strategy.scope():
        layer, gamma, beta = _layer(CONV_SHAPE, 2)
    x = _inputs(CONV_SHAPE)
    per_replica = CONV_SHAPE[0] // 2
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(
            x[ctx.replica_id_in_sync_group * per_replica:][:per_replica]
        )
    )

    outputs = strategy.run(tf.function(lambda t: layer(t, training=True)), args=(shards,))

    single, _, _ = _layer(CONV_SHAPE, 2)
    want = single(x, training=True).numpy()
    got = np.concatenate([o.numpy() for o in strategy.experimental_local_results(outputs)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for variable, reference in [(layer.moving_mean, single.moving_mean),
                                (layer.moving_variance, single.moving_variance)]:
        # aggregation="mean" averages the replicas' updates, so every copy holds the
        # statistics of the whole global batch.
        copies = strategy.experimental_local_results(variable.value)
        assert len(copies) == 2
        for copy in copies:
            np.testing.assert_allclose(copy.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)


# Instance norm on dense inputs is an error (tests/test_norms.py), not a layer.
@pytest.mark.parametrize("name, shape", [(n, s) for n in sorted(NORMS)
                                         for s in (CONV_SHAPE, (8, 48))
                                         if not (n == "instance" and len(s) == 2)])
def test_every_registered_norm_builds(name, shape):
    layer = norm_layer(name, bn_batch_size=2, gn_groups=3, channels=shape[-1],
                       layer_name=f"n_{name}")
    if name == "none":
        assert layer is None
        return
    assert layer.name == f"n_{name}"
    y = layer(_inputs(shape), training=True)
    assert y.shape == shape and np.all(np.isfinite(y.numpy()))


def test_batch_norm_registry_passes_settings():
    layer = norm_layer("batch", bn_batch_size=4, momentum=0.5, epsilon=1e-5)
    assert isinstance(layer, SubBatchNormalization)
    assert (layer.bn_batch_size, layer.momentum, layer.epsilon) == (4, 0.5, 1e-5)


def test_group_norm_groups_divide_channels():
    assert norm_layer("group", channels=64).groups == 32
    assert norm_layer("group", channels=48, gn_groups=16).groups == 16
    with pytest.raises(ValueError, match="gn_groups=32 does not divide its 48 channels"):
        norm_layer("group", channels=48)


def test_unknown_norm_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--norm=xyz is unknown; choose one of batch, "
                                          r"batch_renorm, group, instance, layer, mix, none$"):
        norm_layer("xyz")


def test_layer_norm_normalizes_each_example_over_h_w_c():
    x = np.random.RandomState(0).randn(3, 4, 4, 6).astype(np.float32) * 3 + 1
    layer = norm_layer("layer", channels=6, epsilon=1e-5)
    y = layer(x).numpy().astype(np.float64)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=(1, 2, 3), keepdims=True)
    var = x64.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_synchronized_bn_takes_no_sub_batches():
    with pytest.raises(ValueError, match="bn_batch_size must be None"):
        SubBatchNormalization(bn_batch_size=2, synchronized=True)
    layer = SubBatchNormalization(synchronized=True)
    assert SubBatchNormalization.from_config(layer.get_config()).synchronized


# ------------------------------------------------- moving variance, frozen layer, saving


def _numpy_moving_statistics(batches, group, estimate):
    """Moving mean and variance in float64 after one update per batch, from scratch.

    Per group: the mean and the biased (np.var) or Bessel-corrected (np.var, ddof=1)
    variance, a group of one value per channel contributing 0; then the mean over groups,
    then the momentum update from mean 0, variance 1.
    """
    channels = batches[0].shape[-1]
    mean, var = np.zeros(channels), np.ones(channels)
    for x in batches:
        x = x.astype(np.float64)
        size = group or x.shape[0]
        axes = tuple(range(x.ndim - 1))
        parts = [x[start:start + size] for start in range(0, x.shape[0], size)]
        values = parts[0][..., 0].size  # per (group, channel)
        if estimate == "biased":
            variances = [p.var(axis=axes) for p in parts]
        elif values > 1:
            variances = [p.var(axis=axes, ddof=1) for p in parts]
        else:
            variances = [np.zeros(channels) for _ in parts]
        mean = MOMENTUM * mean + (1 - MOMENTUM) * np.mean([p.mean(axis=axes) for p in parts], 0)
        var = MOMENTUM * var + (1 - MOMENTUM) * np.mean(variances, axis=0)
    return mean, var


def _train_calls(layer, shape, fused):
    """layer(., training=True) eagerly (4-D: the fused kernel) or traced with an unknown
    batch dimension (the unfused ops)."""
    if fused:
        return lambda x: layer(x, training=True)
    return tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec((None,) + shape[1:], tf.float32)])


@pytest.mark.parametrize("estimate", ["unbiased", "biased"])
@pytest.mark.parametrize(
    "shape, group, fused",
    [(CONV_SHAPE, 1, True), (CONV_SHAPE, 4, True), (CONV_SHAPE, None, True),
     (CONV_SHAPE, 1, False), (CONV_SHAPE, 4, False), (CONV_SHAPE, None, False),
     ((4, 1, 1, 3), 1, True), ((4, 1, 1, 3), 1, False),  # one value per group
     (DENSE_SHAPE, 1, False), (DENSE_SHAPE, 4, False), (DENSE_SHAPE, None, False)],
)
def test_moving_statistics_match_numpy_estimates(shape, group, fused, estimate):
    layer, _, _ = _layer(shape, group, moving_variance=estimate)
    step = _train_calls(layer, shape, fused)
    batches = [_inputs(shape, seed=0), _inputs(shape, seed=2)]
    for x in batches:
        step(tf.constant(x))
    mean, var = _numpy_moving_statistics(batches, group, estimate)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, group", [(CONV_SHAPE, None), (CONV_SHAPE, 4),
                                          (DENSE_SHAPE, None)])
def test_moving_variance_estimate_leaves_training_outputs_bitwise_unchanged(shape, group):
    x = _inputs(shape)
    outputs = [_layer(shape, group, moving_variance=estimate)[0](x, training=True).numpy()
               for estimate in ("unbiased", "biased")]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_moving_variance_is_unbiased_by_default_and_checked():
    layer = SubBatchNormalization()
    assert layer.get_config()["moving_variance"] == "unbiased"
    clone = SubBatchNormalization.from_config(
        SubBatchNormalization(moving_variance="biased").get_config())
    assert clone.get_config()["moving_variance"] == "biased"
    with pytest.raises(ValueError, match=r"moving_variance must be one of unbiased, biased; "
                                         r"got 'sample'"):
        SubBatchNormalization(moving_variance="sample")


@pytest.mark.parametrize("estimate", ["unbiased", "biased"])
def test_synchronized_moving_variance_counts_the_global_batch(estimate, mirrored):
    with mirrored.scope():
        layer, gamma, beta = _layer(CONV_SHAPE, None, synchronized=True,
                                    moving_variance=estimate)
    x = _inputs(CONV_SHAPE)
    per_replica = CONV_SHAPE[0] // 2
    shards = mirrored.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * per_replica:][:per_replica]))

    outputs = mirrored.run(tf.function(lambda t: layer(t, training=True)), args=(shards,))

    want, _, _ = _numpy_group_bn(x, None, gamma, beta)  # one group: the global batch
    got = np.concatenate([o.numpy() for o in mirrored.experimental_local_results(outputs)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    mean, var = _numpy_moving_statistics([x], None, estimate)
    for variable, reference in [(layer.moving_mean, mean), (layer.moving_variance, var)]:
        for copy in mirrored.experimental_local_results(variable.value):
            np.testing.assert_allclose(copy.numpy(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE])
def test_frozen_layer_trains_on_moving_statistics_and_keeps_them(shape):
    # Keras BatchNormalization: `trainable=False` means inference mode, even in training.
    layer, gamma, beta = _layer(shape, 2)
    rng = np.random.default_rng(6)
    mean = rng.normal(size=shape[-1]).astype(np.float32)
    var = rng.uniform(0.5, 3.0, shape[-1]).astype(np.float32)
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(var)
    layer.trainable = False
    x = _inputs(shape)

    y = layer(x, training=True).numpy()

    want = gamma * (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + EPS) + beta
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), var)


def test_model_with_the_layer_saves_and_loads(tmp_path):
    inputs = keras.Input(CONV_SHAPE[1:])
    layer = SubBatchNormalization(bn_batch_size=2, momentum=MOMENTUM, epsilon=EPS,
                                  moving_variance="biased", name="sbn")
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(7)
    for variable in layer.weights:  # non-trivial gamma, beta and moving statistics
        variable.assign(rng.uniform(0.5, 2.0, variable.shape))
    path = tmp_path / "sbn.keras"
    model.save(path)

    loaded = keras.saving.load_model(path)

    assert type(loaded.get_layer("sbn")) is SubBatchNormalization
    assert loaded.get_layer("sbn").get_config() == layer.get_config()
    x = _inputs(CONV_SHAPE)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                  model(x, training=False).numpy())
    np.testing.assert_array_equal(loaded(x, training=True).numpy(),
                                  model(x, training=True).numpy())
    for a, b in zip(loaded.get_layer("sbn").weights, layer.weights):  # the same update
        np.testing.assert_array_equal(a.numpy(), b.numpy())
