"""epsilon-sharpness (sbt_keras/sharpness.py) and the Keras adapter (sbt_keras/flat_loss.py).

Quadratics are checked against closed forms: for a convex f the maximum over a box is at a
corner, so enumerating all 2^n corners gives the exact answer.
"""
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras.flat_loss import FlatLoss, choose_sample
from sbt_keras.sharpness import (
    DEFAULT_EPSILONS, SharpnessResult, epsilon_sharpness, measure_sharpness,
    random_subspace, sharpness_box, sharpness_cost, sharpness_objective)


def quadratic(H, c):
    """f(x) = 1/2 (x - c)^T H (x - c) and its gradient H (x - c)."""
    return lambda x: (0.5 * (x - c) @ H @ (x - c), H @ (x - c))


def corner_maximum(f_and_grad, x, half_width):
    """max f(x + y) over the box |y_i| <= half_width_i, for convex f: the best corner."""
    return max(f_and_grad(x + np.array(signs) * half_width)[0]
               for signs in itertools.product((-1.0, 1.0), repeat=len(x)))


def phi_of(f_max, f0):
    return 100.0 * (f_max - f0) / (1.0 + f0)


def spd_problem(seed, n=6):
    """A random SPD H (eigenvalues 0.5..5), x, and a minimiser c close to x."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    H = Q @ np.diag(rng.uniform(0.5, 5, n)) @ Q.T
    x = rng.standard_normal(n)
    return H, x + 0.02 * rng.standard_normal(n), x


def test_diagonal_quadratic_reaches_the_box_maximum():
    rng = np.random.default_rng(0)
    n = 8
    H, x = np.diag(rng.uniform(0.1, 10, n)), rng.standard_normal(n)
    f = quadratic(H, x + 0.01 * rng.standard_normal(n))
    for epsilon in DEFAULT_EPSILONS + (0.05,):
        result = epsilon_sharpness(f, x, epsilon=epsilon, maxiter=100)
        f_max = corner_maximum(f, x, epsilon * (np.abs(x) + 1))
        f0 = f(x)[0]
        assert result.f0 == pytest.approx(f0, rel=1e-12)
        assert result.f_max == pytest.approx(f_max, rel=1e-9)
        assert result.phi == pytest.approx(phi_of(f_max, f0), rel=1e-9)
        assert result.p is None and result.epsilon == epsilon


# Seeds whose best corner is NOT the corner the gradient's signs at x point to, so the
# search has to do more than one projected gradient step to find it.
@pytest.mark.parametrize("seed", [5, 7])
def test_non_diagonal_quadratic_reaches_the_box_maximum(seed):
    H, c, x = spd_problem(seed)
    f = quadratic(H, c)
    half_width = 0.05 * (np.abs(x) + 1)
    sign_corner = f(x + np.sign(f(x)[1]) * half_width)[0]
    f_max = corner_maximum(f, x, half_width)
    assert sign_corner < f_max - 1e-3  # the case is not decided by the gradient's signs

    result = epsilon_sharpness(f, x, epsilon=0.05, maxiter=100)
    assert result.f_max == pytest.approx(f_max, rel=1e-9)
    assert result.phi == pytest.approx(phi_of(f_max, f(x)[0]), rel=1e-9)


def test_search_is_local_so_phi_is_a_lower_bound():
    """L-BFGS-B finds a corner, not always the best one: phi never exceeds the truth."""
    for seed in range(10):
        H, c, x = spd_problem(seed)
        f = quadratic(H, c)
        result = epsilon_sharpness(f, x, epsilon=0.05, maxiter=100)
        truth = corner_maximum(f, x, 0.05 * (np.abs(x) + 1))
        assert f(x)[0] < result.f_max <= truth * (1 + 1e-12)


@pytest.mark.parametrize("subspace", [False, True])
def test_objective_and_gradient_match_central_differences(subspace):
    rng = np.random.default_rng(1)
    n = 7
    H, c, x = spd_problem(1, n)
    f = quadratic(H, c)
    A = rng.standard_normal((n, 3)) if subspace else None
    objective = sharpness_objective(f, x, A)
    y = rng.uniform(-1, 1, size=3 if subspace else n) * sharpness_box(x, 0.05, A)
    value, grad = objective(y)
    step = (x + A @ y) if subspace else (x + y)
    # The optimizer minimises, so it must be handed MINUS f and MINUS its gradient.
    assert value == pytest.approx(-f(step)[0], rel=1e-12)
    h = 1e-6
    for i in range(y.size):
        e = np.zeros_like(y)
        e[i] = h
        difference = (objective(y + e)[0] - objective(y - e)[0]) / (2 * h)
        assert np.sign(grad[i]) == np.sign(difference)
        assert grad[i] == pytest.approx(difference, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_optimizer_beats_random_points_and_a_sign_flipped_gradient(seed):
    H, c, x = spd_problem(seed)
    f = quadratic(H, c)
    epsilon = 1e-3
    result = epsilon_sharpness(f, x, epsilon=epsilon)  # the paper's 10 iterations
    assert result.phi > 0
    half_width = sharpness_box(x, epsilon)
    rng = np.random.default_rng(seed)
    f0 = f(x)[0]
    random_phis = [phi_of(f(x + rng.uniform(-half_width, half_width))[0], f0)
                   for _ in range(200)]
    assert result.phi >= max(random_phis)
    # The public re-implementation's bug: the optimizer handed the gradient with the wrong
    # sign. Its line searches then go downhill and find (almost) nothing above f(x).
    flipped = epsilon_sharpness(lambda z: (f(z)[0], -f(z)[1]), x, epsilon=epsilon)
    assert flipped.phi < 0.1 * result.phi


def test_sharper_quadratic_gives_larger_phi():
    H, c, x = spd_problem(2)
    flat = epsilon_sharpness(quadratic(H, c), x, epsilon=1e-3)
    sharp = epsilon_sharpness(quadratic(10 * H, c), x, epsilon=1e-3)
    assert sharp.phi > 2 * flat.phi > 0


def test_axis_subspace_equals_restricted_full_space():
    H, c, x = spd_problem(4, n=8)
    f = quadratic(H, c)
    axes = [1, 4, 6]
    A = np.eye(8)[:, axes]

    def restricted(z):  # f as a function of the chosen coordinates only
        full = x.copy()
        full[axes] = z
        value, grad = f(full)
        return value, grad[axes]

    for epsilon in (1e-3, 0.05):
        sub = epsilon_sharpness(f, x, epsilon=epsilon, A=A, maxiter=50)
        full = epsilon_sharpness(restricted, x[axes], epsilon=epsilon, maxiter=50)
        assert sub.p == 3 and full.p is None
        np.testing.assert_allclose(sharpness_box(x, epsilon, A), sharpness_box(x[axes], epsilon))
        assert sub.phi == pytest.approx(full.phi, rel=1e-10)
        assert sub.f_max == pytest.approx(full.f_max, rel=1e-12)


def test_random_subspace_box_uses_the_pseudo_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(30)
    A = random_subspace(30, 4, seed=3)
    np.testing.assert_array_equal(A, np.random.default_rng(3).standard_normal((30, 4)))
    np.testing.assert_allclose(sharpness_box(x, 1e-3, A),
                               1e-3 * (np.abs(np.linalg.pinv(A) @ x) + 1), rtol=1e-10)


def test_exact_stationary_point_needs_a_random_start():
    """At grad f = 0 exactly a first-order search cannot leave y = 0 (documented)."""
    H, c, _ = spd_problem(0)
    f = quadratic(H, c)
    assert epsilon_sharpness(f, c, epsilon=0.05).phi == 0.0
    moved = epsilon_sharpness(f, c, epsilon=0.05, start="random", seed=0, maxiter=50)
    truth = phi_of(corner_maximum(f, c, 0.05 * (np.abs(c) + 1)), 0)
    assert 0.5 * truth < moved.phi <= truth * (1 + 1e-12)
    assert moved.seed == 0


def test_budget_and_cost_statement():
    H, c, x = spd_problem(9)
    calls = []

    def f(z):
        calls.append(1)
        return quadratic(H, c)(z)

    result = epsilon_sharpness(f, x, epsilon=0.05, maxiter=10, max_evaluations=3)
    assert result.evaluations == len(calls) == 3
    assert "cap of 3" in result.message
    assert epsilon_sharpness(quadratic(H, c), x, epsilon=0.05, maxiter=2).iterations <= 2

    cost = sharpness_cost(1000, p=100)
    assert (cost.evaluations, cost.examples, cost.example_passes) == (102, 1000, 102_000)
    assert str(cost).startswith("epsilon-sharpness (random 100-dim subspace, eps 0.001, "
                                "0.0005; 10 L-BFGS-B iterations each): <= 102 loss+gradient")


def test_input_errors():
    f = quadratic(np.eye(3), np.zeros(3))
    x = np.ones(3)
    for epsilon in (0, -1e-3, np.nan):
        with pytest.raises(ValueError, match="epsilon must be a positive number"):
            epsilon_sharpness(f, x, epsilon=epsilon)
    with pytest.raises(ValueError, match=r"p=0 must be between 1 and the number of "
                                         r"parameters n=3"):
        random_subspace(3, 0)
    with pytest.raises(ValueError, match=r"p=4 must be between 1 and .* n=3"):
        random_subspace(3, 4)
    with pytest.raises(ValueError, match=r"A must have shape \(3, p\)"):
        epsilon_sharpness(f, x, A=np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"p=5 must be between"):
        epsilon_sharpness(f, x, A=np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"sample size N=11 must be between 1 and the 10 "
                                         r"examples given"):
        choose_sample(np.zeros((10, 2)), np.zeros(10), sample_size=11)
    with pytest.raises(ValueError, match="images and labels differ in length"):
        choose_sample(np.zeros((10, 2)), np.zeros(9))


# -- The Keras adapter -----------------------------------------------------------------

IMAGE_SHAPE = (6, 6, 2)


def tiny_bn_net(seed=0):
    """conv - batch norm - relu - pool - dense: 4 logits; BN statistics set away from 0/1
    so that inference mode (moving statistics) differs from training mode."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(IMAGE_SHAPE)
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    bn = model.get_layer("bn")
    bn.moving_mean.assign([0.3, -0.2, 0.1])
    bn.moving_variance.assign([0.5, 2.0, 1.5])
    return model


def sample(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *IMAGE_SHAPE)).astype(np.float32),
            rng.integers(0, 4, n))


def keras_loss_and_grad(model, images, labels):
    """The reference: Keras's own cross-entropy on the whole sample at once, inference mode."""
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            labels, model(images, training=False))
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), np.concatenate([g.numpy().ravel() for g in grads])


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_flat_loss_is_the_mean_inference_loss_and_restores_weights(chunk_size):
    model = tiny_bn_net()
    images, labels = sample()
    before = [w.copy() for w in model.get_weights()]
    want_f, want_g = keras_loss_and_grad(model, images, labels)
    with FlatLoss(model, images, labels, chunk_size=chunk_size) as loss:
        assert loss.size == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        f, g = loss.value_and_grad(loss.x0)
        assert f == pytest.approx(want_f, rel=1e-6)
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)
        # Moving x moves the model; the next value is at the new point.
        f_moved = loss.value(loss.x0 + 0.1)
        assert f_moved != pytest.approx(f, rel=1e-4)
    for w, w0 in zip(model.get_weights(), before):  # moving statistics included
        np.testing.assert_array_equal(w, w0)
    # Inference mode matters here: training-mode BN would give another loss.
    train_mode = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        labels, model(images, training=True))
    assert float(train_mode) != pytest.approx(want_f, rel=1e-3)


def test_restores_weights_after_an_exception():
    model = tiny_bn_net()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(RuntimeError, match="boom"):
        with FlatLoss(model, *sample()) as loss:
            loss.value_and_grad(loss.x0 + 1.0)
            raise RuntimeError("boom")
    for w, w0 in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, w0)


def test_measure_sharpness_on_a_keras_model():
    model = tiny_bn_net()
    images, labels = sample(12)
    before = [w.copy() for w in model.get_weights()]
    full = measure_sharpness(model, images, labels, sample_size=8, maxiter=3)
    sub = measure_sharpness(model, images, labels, sample_size=8, p=5, seed=1, maxiter=3)
    assert [r.epsilon for r in full] == list(DEFAULT_EPSILONS)
    for r in full + sub:
        assert isinstance(r, SharpnessResult) and r.phi > 0 and r.iterations <= 3
    assert (sub[0].p, sub[0].seed, full[0].p) == (5, 1, None)
    # A box twice as wide lets f rise more.
    assert full[0].phi > full[1].phi
    f0 = keras_loss_and_grad(model, *choose_sample(images, labels, 8, 0))[0]
    assert full[0].f0 == pytest.approx(f0, rel=1e-6)
    for w, w0 in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, w0)
    with pytest.raises(ValueError, match="sample size N=13"):
        measure_sharpness(model, images, labels, sample_size=13)
    with pytest.raises(ValueError, match=r"p=1000 must be between 1 and the number of "
                                         r"parameters n=79"):
        measure_sharpness(model, images, labels, p=1000)


def test_mirrored_model_gives_the_same_numbers(mirrored):
    single = tiny_bn_net()
    with mirrored.scope():
        replicated = tiny_bn_net(seed=1)
    replicated.set_weights(single.get_weights())
    images, labels = sample(10)
    v = np.random.default_rng(0).standard_normal(79)
    results = []
    # Nested-tape HVPs: they trace ~5x faster than the forward accumulator under the
    # strategy, and both modes go through the same replica code (test_curvature.py checks
    # that the modes agree).
    for model, strategy in [(single, None), (replicated, None), (replicated, mirrored)]:
        # Chunks of 4, 4, 2 (padded to 4): under the strategy, shards of 2 per replica.
        with FlatLoss(model, images, labels, chunk_size=4, strategy=strategy,
                      hvp_mode="reverse") as loss:
            f, g = loss.value_and_grad(loss.x0)
            hv = loss.hvp(loss.x0, v)
            phi = epsilon_sharpness(loss.value_and_grad, loss.x0, epsilon=1e-3,
                                    maxiter=3).phi
            results.append((f, g, hv, phi))
    for f, g, hv, phi in results[1:]:
        assert f == pytest.approx(results[0][0], rel=1e-6)
        np.testing.assert_allclose(g, results[0][1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(hv, results[0][2], rtol=1e-4, atol=1e-6)
        assert phi == pytest.approx(results[0][3], rel=1e-4)
    assert results[0][3] > 0


def test_on_evaluation_reports_every_evaluation_of_every_epsilon():
    model = tiny_bn_net()
    seen = []
    found = measure_sharpness(model, *sample(8), maxiter=2, epsilons=(1e-3, 5e-4),
                              on_evaluation=lambda eps, f: seen.append((eps, f)))
    for result in found:
        values = [f for eps, f in seen if eps == result.epsilon]
        assert len(values) == result.evaluations
        assert values[0] == result.f0 and max(values) == result.f_max
