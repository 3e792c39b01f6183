"""Update variance and staleness (Masters & Luschi 2018, eq. 5-9) against closed forms.

Linear least squares: a Keras Dense(1, use_bias=False) network w with per-example loss
L_i = 1/2 (x_i^T w - y_i)^2, whose per-example gradients (x_i^T w - y_i) x_i, mean and
covariance are exact in numpy. With y = 0 the loss is the quadratic L_i = 1/2 w^T H_i w,
H_i = x_i x_i^T, for which the staleness ratio has a closed form polynomial in eta_tilde.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras import update_noise as un
from sbt_keras.flat_loss import FlatLoss
from sbt_keras.layers.subbatch_norm import SubBatchNormalization

N, D = 24, 4


def half_squared_error(labels, outputs):
    return 0.5 * tf.square(outputs[:, 0] - tf.cast(labels, outputs.dtype))


def linear_problem(dtype="float32", seed=0, targets=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    y = x @ rng.normal(size=D) + rng.normal(size=N) if targets else np.zeros(N)
    w = rng.normal(size=D)
    network = keras.Sequential([keras.Input((D,), dtype=dtype),
                                keras.layers.Dense(1, use_bias=False, dtype=dtype)])
    network.layers[0].kernel.assign(w[:, None].astype(dtype))
    w = network.layers[0].kernel.numpy()[:, 0].astype(np.float64)  # as stored
    return network, x.astype(dtype), y.astype(dtype), w


def exact_gradients(x, y, w):
    x, y = x.astype(np.float64), y.astype(np.float64)
    return (x @ w - y)[:, None] * x


@pytest.mark.parametrize("method", un.PER_EXAMPLE_METHODS)
def test_per_example_gradients_equal_numpys(method):
    network, x, y, w = linear_problem()
    # chunk 5 does not divide 24: the last chunk is padded and the padding dropped.
    grads = un.per_example_gradients(network, x, y, loss_fn=half_squared_error, chunk_size=5,
                                     method=method)
    assert grads.shape == (N, D) and grads.dtype == np.float32
    exact = exact_gradients(x, y, w)
    np.testing.assert_allclose(grads, exact, rtol=1e-5, atol=1e-5)

    # Their moments from the Gram matrix are the exact ones, and the mean is FlatLoss's
    # gradient of the mean loss (the same inference-mode loss).
    stats = un.gradient_statistics(un.gram_matrix(grads, block=7))
    mean = exact.mean(0)
    assert stats.mean_grad_sq == pytest.approx(mean @ mean, rel=1e-5)
    trace = np.trace(np.cov(exact.T, bias=True))  # population covariance
    assert stats.trace_sigma1 == pytest.approx(trace, rel=1e-5)
    assert stats.b_simple == pytest.approx(trace / (mean @ mean), rel=1e-4)
    with FlatLoss(network, x, y, loss_fn=half_squared_error) as flat:
        _, grad = flat.value_and_grad(flat.x0)
    np.testing.assert_allclose(grad, mean, rtol=1e-5, atol=1e-6)


def test_both_methods_agree_through_batch_norm_in_inference_mode():
    rng = np.random.default_rng(8)
    images = rng.normal(size=(6, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 6).astype(np.int32)
    network = _bn_network(bn_batch_size=2)
    network(images, training=True)  # moving statistics away from their initial values
    jac, loop = (un.per_example_gradients(network, images, labels, chunk_size=4, method=m)
                 for m in un.PER_EXAMPLE_METHODS)
    np.testing.assert_allclose(jac, loop, rtol=1e-5, atol=1e-6)
    assert np.abs(jac).max() > 0
    with pytest.raises(ValueError, match="method must be one of jacobian, loop"):
        un.per_example_gradients(network, images, labels, method="pfor")


def test_gram_blocks_match_one_product():
    g = np.random.default_rng(1).normal(size=(11, 6)).astype(np.float32)
    np.testing.assert_allclose(un.gram_matrix(g, block=3), g.astype(np.float64) @ g.T,
                               rtol=1e-12)


@pytest.fixture(scope="module")
def population():
    network, x, y, w = linear_problem(seed=2)
    grads = exact_gradients(x, y, w)
    return grads, un.gram_matrix(grads), un.gradient_statistics(un.gram_matrix(grads))


@pytest.mark.parametrize("m", [2, 8, 16])
def test_monte_carlo_update_variance_matches_both_closed_forms(population, m):
    _, gram, stats = population
    lr = 2.0 ** -5
    closed_with = un.update_variance_with_replacement(stats.trace_sigma1, m, lr)
    closed_without = un.update_variance_without_replacement(stats.trace_sigma1, m, lr, N)
    assert closed_with == pytest.approx(lr ** 2 * m * stats.trace_sigma1)
    assert closed_without == pytest.approx(closed_with * (N - m) / (N - 1))
    for replace, closed in ((True, closed_with), (False, closed_without)):
        measured = un.monte_carlo_update_variance(gram, m, lr, draws=4000, replace=replace,
                                                  seed=m)
        # Unbiased estimate: within 4 of its standard errors, which are small (< 5%).
        assert abs(measured.value - closed) < 4 * measured.stderr
        assert measured.stderr < 0.05 * closed
    # The two sampling schemes are told apart at m = 16 of 24 (factor 8/23).
    if m == 16:
        assert closed_with - closed_without > 8 * measured.stderr


def test_gram_trick_equals_explicit_updates(population):
    # Forming the summed updates u_t = lr * c_t^T G and their sample covariance directly
    # gives the same number as the Gram-matrix route, draw for draw.
    grads, gram, _ = population
    lr, m, draws = 0.1, 5, 50
    for replace in (True, False):
        counts = un.draw_counts(N, m, draws, replace, np.random.default_rng(7))
        assert np.all(counts.sum(axis=1) == m)
        if not replace:
            assert counts.max() == 1
        updates = lr * counts @ grads
        direct = np.trace(np.cov(updates.T))
        via_gram = un.monte_carlo_update_variance(gram, m, lr, draws=draws, replace=replace,
                                                  seed=7)
        assert via_gram.value == pytest.approx(direct, rel=1e-10)


def test_whole_sample_without_replacement_has_no_variance(population):
    _, gram, stats = population
    assert un.update_variance_without_replacement(stats.trace_sigma1, N, 1.0, N) == 0.0
    assert un.monte_carlo_update_variance(gram, N, 1.0, draws=5, replace=False).value == 0.0


def test_table_and_log_log_slope(population):
    _, gram, stats = population
    ms = [1, 2, 4, 8]
    got, rows = un.update_variance_table(gram, ms, 0.01, draws=2000, seed=3)
    assert got == stats and [r.m for r in rows] == ms
    slope, intercept = un.loglog_slope(ms, [r.closed_with for r in rows])
    assert slope == pytest.approx(1.0, abs=1e-12)  # the lr^2 m tr(Sigma) line
    assert np.exp(intercept) == pytest.approx(0.01 ** 2 * stats.trace_sigma1)
    measured, _ = un.loglog_slope(ms, [r.measured_with.value for r in rows])
    assert measured == pytest.approx(1.0, abs=0.1)
    assert un.loglog_slope([1, 4], [3.0, 48.0])[0] == pytest.approx(2.0)


def test_bad_inputs_for_the_variance(population):
    _, gram, stats = population
    with pytest.raises(ValueError, match="larger than the sample of N=24"):
        un.update_variance_table(gram, [2, 32], 0.1)
    with pytest.raises(ValueError, match="larger than the sample"):
        un.monte_carlo_update_variance(gram, 25, 0.1, replace=False)
    with pytest.raises(ValueError, match="positive integer"):
        un.update_variance_with_replacement(1.0, 0, 0.1)
    with pytest.raises(ValueError, match=">= 2 draws"):
        un.monte_carlo_update_variance(gram, 2, 0.1, draws=1)
    with pytest.raises(ValueError, match="square"):
        un.gradient_statistics(np.ones((2, 3)))
    with pytest.raises(ValueError, match="distinct batch sizes"):
        un.loglog_slope([4, 4], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        un.loglog_slope([2, 4], [1.0, 0.0])
    network, x, y, _ = linear_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        un.per_example_gradients(network, x, y, chunk_size=0)


def staleness_closed_form(x, w0, n, m, lr, weight_decay=0.0):
    """rho for L_i = 1/2 w^T H_i w, H_i = x_i x_i^T, derived as a polynomial in lr.

    Step j of the small path multiplies by (I - lr A_j), A_j = sum_{i in chunk j} H_i +
    m lambda I (weight decay folds into A_j); the large step multiplies by (I - lr sum_j
    A_j). With e_k = sum_{j_1 > ... > j_k} A_{j_1} ... A_{j_k} (later steps on the left),
    prod_j (I - lr A_j) = sum_k (-lr)^k e_k, so

        theta_small - theta_large = sum_{k >= 2} (-lr)^k e_k w0,   theta_large - theta_k
        = -lr e_1 w0,   rho = |sum_{k=2}^n (-lr)^(k-1) e_k w0| / |e_1 w0|,

    rho -> lr |e_2 w0| / |e_1 w0| as lr -> 0.
    """
    x = x.astype(np.float64)
    d = x.shape[1]
    a = [x[j * m:(j + 1) * m].T @ x[j * m:(j + 1) * m] + m * weight_decay * np.eye(d)
         for j in range(n)]
    e = [np.eye(d)] + [np.zeros((d, d)) for _ in range(n)]  # e_0 .. e_n
    for a_j in a:  # e_k <- e_k + A_j e_{k-1}, highest k first
        for k in range(n, 0, -1):
            e[k] = e[k] + a_j @ e[k - 1]
    top = sum((-lr) ** (k - 1) * e[k] @ w0 for k in range(2, n + 1))
    first = e[1] @ w0
    limit = np.linalg.norm(e[2] @ w0) / np.linalg.norm(first) if n >= 2 else 0.0
    return np.linalg.norm(top) / np.linalg.norm(first), limit


def test_staleness_ratio_matches_the_quadratic_closed_form():
    network, x, y, w0 = linear_problem(dtype="float64", seed=3, targets=False)
    decayed = network.trainable_variables
    weights = [v.numpy().copy() for v in network.weights]
    m, lam, lrs = 3, 0.05, [0.2, 0.05, 1e-2, 1e-4, 1e-6]
    results = un.staleness_curve(network, x, y, ns=[1, 2, 4, 8], m=m, lrs=lrs,
                                 weight_decay=lam, decayed_variables=decayed,
                                 loss_fn=half_squared_error)
    assert [(r.n, r.lr) for r in results] == [(n, lr) for lr in lrs for n in (1, 2, 4, 8)]
    for r in results:
        expect, limit = staleness_closed_form(x, w0, r.n, m, r.lr, lam)
        if r.n == 1:
            assert r.ratio == 0.0  # one step of m is the large step: the same arithmetic
            continue
        # float64 rounding of theta (~eps |w0| per step) against a numerator ~ ratio *
        # denominator: a relative error of ~n eps |w0| / (ratio * denominator), which is
        # 1e-4 at lr = 1e-6 (the cancellation that float32 would make hopeless).
        rounding = 16 * r.n * np.finfo(np.float64).eps * np.linalg.norm(w0) / (
            r.denominator * expect)
        assert r.ratio == pytest.approx(expect, rel=max(1e-9, rounding))
        assert r.examples_times_lr == r.n * m * r.lr
        if r.lr <= 1e-4:  # rho ~ lr * limit -> 0 as eta_tilde -> 0
            assert r.ratio / r.lr == pytest.approx(limit, rel=1e-3)
    for before, v in zip(weights, network.weights):
        np.testing.assert_array_equal(v.numpy(), before)  # restored bit for bit


def test_staleness_without_weight_decay_on_least_squares_steps():
    # Affine gradients (targets y != 0), no decay: n steps stepped by hand in numpy.
    network, x, y, w0 = linear_problem(dtype="float64", seed=4)
    lr, m, n = 0.02, 2, 4
    r = un.staleness_ratio(network, x, y, n=n, m=m, lr=lr, loss_fn=half_squared_error)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    w = w0.copy()
    for j in range(n):
        w = w - lr * exact_gradients(x64[j * m:(j + 1) * m], y64[j * m:(j + 1) * m], w).sum(0)
    large = w0 - lr * exact_gradients(x64[:n * m], y64[:n * m], w0).sum(0)
    assert r.ratio == pytest.approx(np.linalg.norm(w - large) / np.linalg.norm(large - w0),
                                    rel=1e-9)


def _bn_network(bn_batch_size):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4)(inputs)
    h = SubBatchNormalization(bn_batch_size=bn_batch_size)(h)
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Activation("relu")(h)))


def test_staleness_keeps_the_bn_batch_and_restores_moving_statistics():
    rng = np.random.default_rng(6)
    images = rng.normal(size=(16, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 16).astype(np.int32)
    network = _bn_network(bn_batch_size=2)
    weights = [v.numpy().copy() for v in network.weights]  # moving statistics included
    lr, m, n = 0.05, 4, 4
    r = un.staleness_ratio(network, images, labels, n=n, m=m, lr=lr, bn_batch_size=2)
    for before, v in zip(weights, network.weights):
        np.testing.assert_array_equal(v.numpy(), before)
    # The large step's gradient is the gradient of all n*m examples in one call of the
    # network, which normalizes in its own groups of 2: the small steps' BN batch.
    from sbt_keras.flat_loss import sparse_softmax_cross_entropy as ce
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(ce(labels[:n * m], network(images[:n * m], training=True)))
    grads = tape.gradient(loss, network.trainable_variables)
    for before, v in zip(weights, network.weights):  # undo the moving-statistics update
        v.assign(before)
    norm = np.sqrt(sum(np.sum(g.numpy().astype(np.float64) ** 2) for g in grads))
    assert r.denominator == pytest.approx(lr * norm, rel=1e-5)
    assert 0 < r.ratio < 1
    with pytest.raises(ValueError, match="a split that breaks a BN group"):
        un.staleness_ratio(network, images, labels, n=2, m=3, lr=lr, bn_batch_size=2)


def test_bad_inputs_for_staleness():
    network, x, y, _ = linear_problem()
    kw = dict(loss_fn=half_squared_error)
    with pytest.raises(ValueError, match=r"n\*m = 8\*4 = 32 examples are needed, the "
                                         r"sample has 24"):
        un.staleness_curve(network, x, y, ns=[1, 8], m=4, lrs=[0.1], **kw)
    with pytest.raises(ValueError, match="positive integers"):
        un.staleness_curve(network, x, y, ns=[0, 2], m=4, lrs=[0.1], **kw)
    with pytest.raises(ValueError, match="learning rates must be positive"):
        un.staleness_curve(network, x, y, ns=[2], m=4, lrs=[0.0], **kw)
    with pytest.raises(ValueError, match="positive integer"):
        un.staleness_curve(network, x, y, ns=[2], m=0, lrs=[0.1], **kw)
