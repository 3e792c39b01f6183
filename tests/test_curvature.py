"""Hessian eigenvalue and trace (sbt_keras/curvature.py) against Hessians known in closed
form (linear least squares: X^T X / n) or computed independently (a dense float64 Hessian
of a tiny tanh network from nested tapes)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras.curvature import (
    EigenResult, eigenvalue_cost, hutchinson_trace, model_hessian_trace,
    model_top_hessian_eigenvalue, top_hessian_eigenvalue, trace_cost)
from sbt_keras.flat_loss import FlatLoss


def matrix_hvp(H):
    return lambda v: H @ v


def symmetric(eigenvalues, seed=0):
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return Q @ np.diag(eigenvalues) @ Q.T


# -- Pure numpy ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_of_a_known_matrix(method):
    H = symmetric([-1.0, 0.5, 1.0, 2.0, 3.0, 6.0, 10.0] + [0.1] * 23)
    result = top_hessian_eigenvalue(matrix_hvp(H), 30, method=method, tol=1e-10,
                                    max_iterations=300)
    assert result.converged and result.method == method
    assert result.eigenvalue == pytest.approx(10.0, rel=1e-6)
    assert 1 <= result.iterations <= 300


def test_power_method_reports_a_negative_dominant_eigenvalue_honestly():
    """Power iteration finds the largest |lambda| (-5 here); the shifted second run gives
    the largest algebraic eigenvalue (3)."""
    H = symmetric([-5.0, -1.0, 1.0, 2.0, 3.0])
    power = top_hessian_eigenvalue(matrix_hvp(H), 5, method="power", tol=1e-12,
                                   max_iterations=2000)
    assert power.dominant == pytest.approx(-5.0, rel=1e-6)
    assert power.eigenvalue == pytest.approx(3.0, rel=1e-5) and power.converged
    lanczos = top_hessian_eigenvalue(matrix_hvp(H), 5, tol=1e-12)
    assert lanczos.eigenvalue == pytest.approx(3.0, rel=1e-9) and lanczos.dominant is None


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_hvp_cap_stops_early_with_a_lower_bound(method):
    H = symmetric(np.linspace(0.9, 1.0, 40))  # tiny gap: nothing converges in 5 HVPs
    calls = []

    def hvp(v):
        calls.append(1)
        return H @ v

    result = top_hessian_eigenvalue(hvp, 40, method=method, tol=1e-14, max_iterations=5)
    assert not result.converged and result.iterations == len(calls) == 5
    assert 0.9 <= result.eigenvalue <= 1.0 + 1e-12


def test_power_method_out_of_hvps_before_the_shifted_run():
    H = symmetric([-5.0, 1.0, 3.0])
    result = top_hessian_eigenvalue(matrix_hvp(H), 3, method="power", tol=0.5,
                                    max_iterations=2)
    # Two HVPs: the first power run used both, none left for the shifted one.
    assert result.iterations == 2 and not result.converged
    assert result.dominant < 0 and -5.0 <= result.eigenvalue <= 3.0


def test_tiny_dimensions_use_the_dense_matrix():
    for H in (np.array([[2.5]]), np.array([[1.0, 2.0], [2.0, -1.0]])):
        result = top_hessian_eigenvalue(matrix_hvp(H), len(H))
        assert result.eigenvalue == pytest.approx(np.linalg.eigvalsh(H)[-1])


def test_hutchinson_is_exact_for_diagonal_and_unbiased_otherwise():
    # Rademacher v: v^T D v = tr(D) exactly for diagonal D, so the standard error is 0.
    D = np.diag([1.0, -2.0, 3.5, 4.0])
    exact = hutchinson_trace(matrix_hvp(D), 4, samples=5)
    assert exact.mean == pytest.approx(6.5) and exact.stderr == pytest.approx(0, abs=1e-12)
    H = symmetric(np.arange(1.0, 9.0), seed=2)
    result = hutchinson_trace(matrix_hvp(H), 8, samples=400, seed=1)
    assert result.samples == 400 and result.stderr > 0
    assert abs(result.mean - np.trace(H)) < 3 * result.stderr
    # Var(v^T H v) = 2 * sum_{i != j} H_ij^2 for Rademacher v.
    off = H - np.diag(np.diag(H))
    assert result.stderr == pytest.approx(np.sqrt(2 * np.sum(off ** 2) / 400), rel=0.2)


def test_input_errors_and_costs():
    hvp = matrix_hvp(np.eye(3))
    with pytest.raises(ValueError, match="method must be one of lanczos, power"):
        top_hessian_eigenvalue(hvp, 3, method="qr")
    with pytest.raises(ValueError, match="max_iterations must be >= 1"):
        top_hessian_eigenvalue(hvp, 3, max_iterations=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        top_hessian_eigenvalue(hvp, 3, tol=0)
    with pytest.raises(ValueError, match="samples must be >= 2"):
        hutchinson_trace(hvp, 3, samples=1)
    cost = eigenvalue_cost(500, max_iterations=40)
    assert (cost.evaluations, cost.kind, cost.example_passes) == (40, "HVP", 60_000)
    assert str(cost) == ("top Hessian eigenvalue (lanczos): <= 40 HVP evaluations x 500 "
                         "examples (x3 each) = <= 60,000 example forward+backward passes")
    assert trace_cost(500, samples=10).evaluations == 10


# -- Keras models ----------------------------------------------------------------------

def least_squares(n=24, d=5, seed=0):
    """Dense(1) without bias on X: f(w) = 1/2 mean((X w - y)^2), Hessian X^T X / n."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * np.array([3.0, 1.0, 1.0, 0.5, 0.2])).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
    X64 = X.astype(np.float64)
    return model, X, y, X64.T @ X64 / n


def half_squared_error(labels, outputs):
    return 0.5 * tf.square(outputs[:, 0] - labels)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_least_squares_top_eigenvalue(method):
    model, X, y, H = least_squares()
    result = model_top_hessian_eigenvalue(model, X, y, method=method, tol=1e-7,
                                          max_iterations=200, loss_fn=half_squared_error,
                                          chunk_size=10, hvp_mode="reverse")
    assert isinstance(result, EigenResult) and result.converged
    assert result.eigenvalue == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-5)


def test_least_squares_hutchinson_trace():
    model, X, y, H = least_squares()
    result = model_hessian_trace(model, X, y, samples=60, seed=3, chunk_size=10,
                                 loss_fn=half_squared_error, hvp_mode="reverse")
    assert result.stderr > 0
    assert abs(result.mean - np.trace(H)) < 3 * result.stderr


def tanh_net():
    """4 inputs -> 3 tanh units -> 2 logits: 23 parameters."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
                             keras.layers.Dense(2)])


def dense_hessian_float64(model, X, labels):
    """The Hessian of mean cross-entropy written out by hand in float64 (no Keras), from
    nested tapes; parameters flattened in the model's trainable_variables order."""
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    theta = tf.Variable(np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
                        .astype(np.float64))

    def loss():
        pieces, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            pieces.append(tf.reshape(theta[start:start + size], shape))
            start += size
        w1, b1, w2, b2 = pieces
        logits = tf.tanh(X.astype(np.float64) @ w1 + b1) @ w2 + b2
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss()
        grad = inner.gradient(value, theta)
    return outer.jacobian(grad, theta).numpy()


def test_nonlinear_net_hvp_and_top_eigenvalue_match_the_dense_hessian():
    model = tanh_net()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 4)).astype(np.float32)
    labels = rng.integers(0, 2, 16)
    H = dense_hessian_float64(model, X, labels)
    assert H.shape == (23, 23)
    # The default (forward-over-reverse) and nested-tape HVPs, in chunks of 5 (16 = 5+5+5+1).
    with FlatLoss(model, X, labels, chunk_size=5) as forward, \
            FlatLoss(model, X, labels, chunk_size=5, hvp_mode="reverse") as reverse:
        assert forward.size == 23
        for v in rng.standard_normal((3, 23)):
            want = H @ v
            for loss in (forward, reverse):
                np.testing.assert_allclose(loss.hvp(loss.x0, v), want, rtol=1e-4,
                                           atol=1e-5 * np.abs(want).max())
        result = top_hessian_eigenvalue(lambda v: forward.hvp(forward.x0, v), forward.size,
                                        tol=1e-8)
    assert result.converged
    assert result.eigenvalue == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-4)
