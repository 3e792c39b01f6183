"""Gradient noise scale estimators (McCandlish et al. 2018, App. A) against closed forms.

The population is N examples of linear least squares, L_i = 1/2 (x_i^T w - y_i)^2, whose
per-example gradients (x_i^T w - y_i) x_i are exact in numpy: the true mean gradient G and
the per-example (population) covariance Sigma are known exactly, and batches drawn with
replacement make E|G_B|^2 = |G|^2 + tr(Sigma)/B hold exactly.
"""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras import gradient_noise as gn
from sbt_keras.flat_loss import sparse_softmax_cross_entropy
from sbt_keras.layers.subbatch_norm import SubBatchNormalization

N, D = 40, 5


def least_squares(seed=0, offset=0.4):
    """Per-example gradients [N, D], the exact |G|^2 and tr(Sigma)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    w_star = rng.normal(size=D)
    y = x @ w_star + rng.normal(size=N)
    w = w_star + offset * rng.normal(size=D)  # near the fit: noise comparable to signal
    g = (x @ w - y)[:, None] * x
    mean = g.mean(axis=0)
    trace = float(np.mean(np.sum(g ** 2, axis=1)) - mean @ mean)
    return g, float(mean @ mean), trace


def test_estimates_invert_their_expectations_exactly():
    # Plugging in E|G_B|^2 = |G|^2 + tr/B must give back |G|^2 and tr exactly.
    g2, trace = 0.3, 12.0
    for b_small, b_big in [(1, 2), (4, 8), (64, 1024), (3, 5)]:
        est = gn.unbiased_estimates(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
        assert est.grad_sq == pytest.approx(g2, rel=1e-12, abs=1e-12)
        assert est.trace == pytest.approx(trace, rel=1e-12)
        assert est.b_simple == pytest.approx(trace / g2, rel=1e-10)


def test_sums_convert_to_means():
    # S_B = B G_B, so |G_B|^2 = |S_B|^2 / B^2.
    assert gn.mean_gradient_sq(64.0, 4) == 4.0
    with pytest.raises(ValueError, match="positive number of examples"):
        gn.mean_gradient_sq(1.0, 0)


def test_monte_carlo_estimates_converge_to_the_exact_noise_scale():
    g, g2, trace = least_squares()
    b, parts, draws = 4, 2, 4000
    rng = np.random.default_rng(1)
    # Big batch of parts*b drawn with replacement; its parts are the small batches (as the
    # replicas or halves of one global batch are).
    batch = g[rng.integers(0, N, (draws, parts * b))]
    small_sq = np.mean(np.sum(batch.reshape(draws, parts, b, D).mean(axis=2) ** 2, -1), 1)
    big_sq = np.sum(batch.mean(axis=1) ** 2, axis=1)
    scale = gn.GradientNoiseScale(ema=0.999)
    steps = [scale.update(s, l, b, parts * b) for s, l in zip(small_sq, big_sq)]
    est_g2 = np.array([e.grad_sq for e in steps])
    est_tr = np.array([e.trace for e in steps])
    assert np.any(est_g2 < 0)  # single steps can be negative; the averages are not

    # Plain averages: unbiased, tolerance 4 standard errors of the mean.
    se_g2, se_tr = est_g2.std(ddof=1) / math.sqrt(draws), est_tr.std(ddof=1) / math.sqrt(draws)
    assert abs(est_g2.mean() - g2) < 4 * se_g2
    assert abs(est_tr.mean() - trace) < 4 * se_tr

    # The bias-corrected EMAs are weighted means with weights w_t; independent draws give
    # them standard errors std * sqrt(sum w_t^2).
    beta = scale.ema
    weights = (1 - beta) * beta ** np.arange(draws - 1, -1, -1) / (1 - beta ** draws)
    assert weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(scale.grad_sq, weights @ est_g2, rtol=1e-9)
    np.testing.assert_allclose(scale.trace, weights @ est_tr, rtol=1e-9)
    shrink = math.sqrt(weights @ weights)
    tol_g2 = 4 * est_g2.std(ddof=1) * shrink
    tol_tr = 4 * est_tr.std(ddof=1) * shrink
    assert abs(scale.grad_sq - g2) < tol_g2
    assert abs(scale.trace - trace) < tol_tr
    assert tol_g2 < g2 / 2  # the test can tell the ratio apart from noise
    # B_simple = tr/|G|^2; first-order error bound from the two tolerances.
    exact = trace / g2
    bound = (tol_tr + exact * tol_g2) / (g2 - tol_g2)
    assert abs(scale.b_simple - exact) < bound
    assert bound < exact / 2


def test_ema_is_bias_corrected_and_validated():
    scale = gn.GradientNoiseScale(ema=0.9)
    assert scale.steps == 0 and math.isnan(scale.b_simple) and math.isnan(scale.grad_sq)
    for _ in range(3):  # constant input -> exactly that value from the first step on
        scale.update(2.0 + 8.0 / 2, 2.0 + 8.0 / 4, 2, 4)
        assert scale.grad_sq == pytest.approx(2.0) and scale.trace == pytest.approx(8.0)
        assert scale.b_simple == pytest.approx(4.0)
    again = gn.GradientNoiseScale.from_state(scale.get_state())
    assert (again.grad_sq, again.trace, again.steps) == (scale.grad_sq, scale.trace, 3)
    for bad in (0.0, 1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"ema must be in \(0, 1\)"):
            gn.GradientNoiseScale(ema=bad)


def test_noise_scale_is_nan_while_the_gradient_estimate_is_not_positive():
    # |G_small|^2 = |G_big|^2 * (B_big / B_small) makes the |G|^2 estimate exactly 0.
    est = gn.unbiased_estimates(2.0, 1.0, 1, 2)
    assert est.grad_sq == 0.0 and math.isnan(est.b_simple)
    assert math.isnan(gn.unbiased_estimates(3.0, 1.0, 1, 2).b_simple)  # negative
    scale = gn.GradientNoiseScale(ema=0.5)
    scale.update(3.0, 1.0, 1, 2)
    assert scale.grad_sq < 0 and math.isnan(scale.b_simple)
    scale.update(10.0, 8.0, 1, 2)  # smoothed |G|^2 turns positive
    assert scale.grad_sq > 0 and math.isfinite(scale.b_simple)


def test_bad_batch_sizes_and_norms():
    with pytest.raises(ValueError, match="B_small < B_big"):
        gn.unbiased_estimates(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="B_small < B_big"):
        gn.unbiased_estimates(1.0, 1.0, 8, 4)
    with pytest.raises(ValueError, match="b_small must be a positive"):
        gn.unbiased_estimates(1.0, 1.0, 0, 4)
    with pytest.raises(ValueError, match="non-finite"):
        gn.GradientNoiseScale().update(float("inf"), 1.0, 2, 4)
    with pytest.raises(ValueError, match=">= 2 parts"):
        gn.squared_norms_from_parts([[tf.ones(3)]], 2)


def test_split_refuses_a_split_that_breaks_a_bn_group():
    assert gn.check_split(8, None) == 4  # no batch-dependent normalization
    assert gn.check_split(8, 4) == 4 and gn.check_split(8, 2) == 4
    with pytest.raises(ValueError, match="a split that breaks a BN group"):
        gn.check_split(8, 8)  # whole-batch BN: one group across both halves
    with pytest.raises(ValueError, match="a split that breaks a BN group"):
        gn.check_split(12, 4)  # groups 0-3, 4-7, 8-11; the halves meet at 6
    with pytest.raises(ValueError, match="must be even"):
        gn.check_split(7, None)


def test_tensorflow_norms_of_sum_gradients_match_numpy():
    g, _, _ = least_squares(seed=2)
    halves = [g[:4], g[4:8]]
    # Sum-gradients split across two variables, as a network's list of gradients.
    parts = [[tf.constant(h.sum(0)[:2], tf.float32), tf.constant(h.sum(0)[2:], tf.float32)]
             for h in halves]
    small_sq, big_sq, b_small, b_big = (float(t) for t in gn.squared_norms_from_parts(parts, 4))
    assert (b_small, b_big) == (4.0, 8.0)
    expect_small = np.mean([np.sum(h.mean(0) ** 2) for h in halves])
    np.testing.assert_allclose(small_sq, expect_small, rtol=1e-6)
    np.testing.assert_allclose(big_sq, np.sum(g[:8].mean(0) ** 2), rtol=1e-6)


def _bn_network(dtype="float32"):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3,), dtype=dtype)
    h = keras.layers.Dense(4, dtype=dtype)(inputs)
    h = SubBatchNormalization(bn_batch_size=2, dtype=dtype)(h)  # groups of 2 examples
    h = keras.layers.Activation("relu")(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(h))


def test_replica_and_split_batch_estimates_agree(mirrored):
    # Batch of 8, BN groups of 2. Two replicas each get 4 consecutive examples: exactly
    # the two halves of the split batch, so the two sources give the same numbers.
    rng = np.random.default_rng(4)
    images = rng.normal(size=(8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 8).astype(np.int32)
    single = _bn_network()
    with mirrored.scope():
        replicated = _bn_network()
    replicated.set_weights(single.get_weights())
    loss_fn = sparse_softmax_cross_entropy
    first, second, _ = gn.split_batch_sum_gradients(
        single, tf.constant(images), tf.constant(labels), single.trainable_variables,
        bn_batch_size=2, loss_fn=loss_fn)
    split = [float(t) for t in gn.squared_norms_from_parts([first, second], 4)]

    # The halves add up to the whole batch's sum-gradient (no group straddles them).
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(loss_fn(labels, single(images, training=True)))
    whole = tape.gradient(total, single.trainable_variables)
    for a, b, w in zip(first, second, whole):
        np.testing.assert_allclose(a + b, w, rtol=1e-5, atol=1e-6)

    variables = [v.value for v in replicated.trainable_variables]

    @tf.function
    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y, replicated(x, training=True)))
        grads = tape.gradient(loss, variables)
        # Both ways in: with the step's own all-reduced sum, and all-reducing it here.
        summed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, grads)
        given = gn.replica_squared_norms(grads, tf.shape(x)[0], global_sum_grads=summed)
        return given + gn.replica_squared_norms(grads, tf.shape(x)[0])

    def shard(array):
        return mirrored.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * 4:][:4]))

    out = mirrored.run(replica_step, args=(shard(images), shard(labels)))
    per_replica = [[float(t) for t in mirrored.experimental_local_results(o)] for o in out]
    for values in per_replica:  # every replica holds the same estimate
        assert values[0] == pytest.approx(values[1], rel=1e-6)
    replica = [v[0] for v in per_replica[:4]]
    np.testing.assert_allclose([v[0] for v in per_replica[4:]], replica, rtol=1e-6)
    np.testing.assert_allclose(replica, split, rtol=1e-5)
    assert replica[2:] == [4.0, 8.0]
    est = gn.unbiased_estimates(*replica)
    assert math.isfinite(est.trace) and est.trace > 0


def test_replica_source_needs_two_replicas():
    with pytest.raises(ValueError, match=">= 2 replicas"):
        gn.replica_squared_norms([tf.ones(2)], 4)
