"""epsilon-sharpness of a minimiser (Keskar et al. 2017, "On Large-Batch Training for Deep
Learning: Generalization Gap and Sharp Minima", Metric 2.1).

    phi(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)),
    C_eps = { z in R^p : |z_i| <= eps * (|(A^+ x)_i| + 1) },

with A^+ the Moore-Penrose pseudo-inverse of A. Full space: A = I, so y has the size of x
and the box is |y_i| <= eps * (|x_i| + 1). Random subspace: A is n x p with p (default
100) columns of independent standard normal entries N(0, 1), drawn with
numpy.random.default_rng(seed) (Keskar et al. use "randomly generated" A; the columns are
not normalised). A is held as a float64 array: n * p * 8 bytes (ResNet-32, 0.46M
parameters, p = 100: 370 MB). A^+ x is the minimum-norm least-squares solution of A z = x
(numpy.linalg.lstsq on the n x p matrix), so no n x n matrix is ever formed.

The maximum is sought as in the paper: scipy.optimize.minimize(method="L-BFGS-B") on
-f(x + A y) with gradient -A^T grad f(x + A y), bounds C_eps, start y = 0, a fixed budget of
`maxiter` iterations (default 10). Notes:
  * The gradient sign matters: the optimizer MINIMISES, so both the objective and its
    gradient are negated. (A public re-implementation got this wrong and so searched the
    box with a gradient pointing the wrong way; tests/test_sharpness.py catches it.)
  * Start y = 0 is x itself. Near a minimiser grad f(x) is small but nonzero in float32, so
    L-BFGS-B moves. scipy's stopping tolerances (pgtol 1e-5 on the projected gradient,
    ftol on the relative change) would end the search at y = 0 on a well-trained net, so
    they are set to 0: only the iteration budget (or a failed line search) stops it. At an
    exact stationary point (gradient exactly 0) a first-order method cannot leave y = 0 and
    phi is 0; `start="random"` starts at a seeded uniform point of the box instead.
  * L-BFGS-B is a local method and -f is concave for a convex f, so the result is a LOWER
    BOUND on the true box maximum (it reaches a corner, not necessarily the best one).
    f_max is the largest f seen at any evaluated (feasible) point, not only the last one.
  * f is evaluated in float32 on the model side (see sbt_keras/flat_loss.py).

Cost: every evaluation is one loss-and-gradient call, i.e. one forward + backward pass over
the N sample examples. L-BFGS-B takes about 1-2 evaluations per iteration; a hard cap
`max_evaluations` (default 5 * maxiter + 1) bounds it. `sharpness_cost` states it before
the run; the paper's 4 numbers (full space and p = 100, each at eps 1e-3 and 5e-4) cost
4 such searches.
"""
import dataclasses

import numpy as np
import scipy.optimize

from sbt_keras.flat_loss import FlatLoss, MeasurementCost, choose_sample

DEFAULT_EPSILONS = (1e-3, 5e-4)
DEFAULT_P = 100
DEFAULT_MAXITER = 10


@dataclasses.dataclass(frozen=True)
class SharpnessResult:
    """One epsilon-sharpness measurement.

    phi: 100 (f_max - f0) / (1 + f0); f0 = f(x); f_max: the largest f found in the box;
    evaluations: loss-and-gradient calls made; iterations: L-BFGS-B iterations done;
    epsilon; p: subspace dimension (None for the full space); seed: the seed of A (and of
    a random start); message: why the search stopped.
    """
    phi: float
    f0: float
    f_max: float
    evaluations: int
    iterations: int
    epsilon: float
    p: int | None
    seed: int | None
    message: str = ""


class _BudgetExhausted(Exception):
    """Raised by the objective to stop L-BFGS-B at the evaluation cap."""


def default_max_evaluations(maxiter):
    """The evaluation cap used when none is given: 5 per iteration, plus the start."""
    return 5 * int(maxiter) + 1


def random_subspace(n, p=DEFAULT_P, seed=0):
    """A: n x p float64, entries i.i.d. standard normal from numpy default_rng(seed)."""
    _check_p(p, n)
    return np.random.default_rng(seed).standard_normal((n, p))


def sharpness_box(x, epsilon, A=None):
    """Half-widths b of the box C_eps = {y : |y_i| <= b_i}: eps * (|(A^+ x)_i| + 1)."""
    _check_epsilon(epsilon)
    x = np.asarray(x, np.float64)
    if A is None:
        coordinates = x
    else:
        # A^+ x without forming anything n x n: lstsq returns the minimum-norm solution.
        coordinates = np.linalg.lstsq(A, x, rcond=None)[0]
    return epsilon * (np.abs(coordinates) + 1.0)


def sharpness_objective(f_and_grad, x, A=None):
    """What L-BFGS-B minimises: y -> (-f(x + A y), -A^T grad f(x + A y)), float64."""
    x = np.asarray(x, np.float64)

    def objective(y):
        y = np.asarray(y, np.float64)
        value, grad = f_and_grad(x + (y if A is None else A @ y))
        grad = np.asarray(grad, np.float64)
        return -float(value), -(grad if A is None else A.T @ grad)

    return objective


def epsilon_sharpness(f_and_grad, x, *, epsilon=DEFAULT_EPSILONS[0], A=None,
                      maxiter=DEFAULT_MAXITER, max_evaluations=None, start="zero",
                      seed=None, p=None):
    """phi(eps, A) of the function `f_and_grad(x) -> (float, ndarray)` at `x`.

    A: None for the full space, else an n x p array (see `random_subspace`). maxiter:
    L-BFGS-B iteration budget; max_evaluations: hard cap on f_and_grad calls (default
    5 * maxiter + 1). start: "zero" (the paper) or "random" (uniform in the box, drawn with
    default_rng(seed)). seed and p are recorded in the result (p defaults to A's columns).
    """
    _check_epsilon(epsilon)
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D vector, got shape {x.shape}")
    if A is not None:
        A = np.asarray(A, np.float64)
        if A.ndim != 2 or A.shape[0] != x.size:
            raise ValueError(f"A must have shape ({x.size}, p), got {A.shape}")
        _check_p(A.shape[1], x.size)
        p = A.shape[1] if p is None else p
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    if max_evaluations is None:
        max_evaluations = default_max_evaluations(maxiter)
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations}")
    if start not in ("zero", "random"):
        raise ValueError(f'start must be "zero" or "random", got {start!r}')

    half_width = sharpness_box(x, epsilon, A)
    objective = sharpness_objective(f_and_grad, x, A)
    # f(x) once; L-BFGS-B's first call at y = 0 (start "zero") reuses it.
    at_zero = objective(np.zeros_like(half_width))
    f0 = -at_zero[0]
    state = {"evaluations": 1, "iterations": 0, "f_max": f0}

    def counted(y):
        if not np.any(y):
            return at_zero[0], at_zero[1].copy()
        if state["evaluations"] >= max_evaluations:
            raise _BudgetExhausted
        state["evaluations"] += 1
        # L-BFGS-B keeps its iterates inside the bounds; the clip only removes rounding
        # so that every f recorded is f at a feasible point.
        y = np.clip(y, -half_width, half_width)
        value, grad = objective(y)
        state["f_max"] = max(state["f_max"], -value)
        return value, grad

    def iteration_done(_):
        state["iterations"] += 1

    if start == "zero":
        y0 = np.zeros_like(half_width)
    else:
        y0 = np.random.default_rng(seed).uniform(-half_width, half_width)
    try:
        result = scipy.optimize.minimize(
            counted, y0, jac=True, method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-half_width, half_width), callback=iteration_done,
            # Only the budget stops the search: see the module docstring.
            options={"maxiter": int(maxiter), "maxfun": int(max_evaluations),
                     "ftol": 0.0, "gtol": 0.0})
        message = str(result.message)
    except _BudgetExhausted:
        message = f"evaluation cap of {max_evaluations} reached"
    f_max = state["f_max"]
    return SharpnessResult(
        phi=100.0 * (f_max - f0) / (1.0 + f0), f0=f0, f_max=f_max,
        evaluations=state["evaluations"], iterations=state["iterations"],
        epsilon=float(epsilon), p=p, seed=seed, message=message)


def measure_sharpness(model, images, labels, *, epsilons=DEFAULT_EPSILONS, p=None,
                      seed=0, sample_size=None, maxiter=DEFAULT_MAXITER,
                      max_evaluations=None, chunk_size=256, loss_fn=None, strategy=None,
                      on_evaluation=None):
    """phi of a Keras model at its current weights, one SharpnessResult per epsilon.

    p: None for the full space, else the dimension of a random subspace (A from
    `random_subspace(n, p, seed)`). sample_size: N examples drawn with `choose_sample`
    (all when None). on_evaluation: None, or `on_evaluation(epsilon, f)` called after every
    loss-and-gradient evaluation (progress reports). The model's weights are restored
    afterwards. See `FlatLoss` for chunk_size, loss_fn and strategy.
    """
    for epsilon in epsilons:
        _check_epsilon(epsilon)
    images, labels = choose_sample(images, labels, sample_size, seed)
    with FlatLoss(model, images, labels, loss_fn=loss_fn, chunk_size=chunk_size,
                  strategy=strategy) as loss:
        A = None if p is None else random_subspace(loss.size, p, seed)
        return [epsilon_sharpness(_reported(loss.value_and_grad, on_evaluation, epsilon),
                                  loss.x0, epsilon=epsilon, A=A, maxiter=maxiter,
                                  max_evaluations=max_evaluations, seed=seed, p=p)
                for epsilon in epsilons]


def _reported(f_and_grad, on_evaluation, epsilon):
    """`f_and_grad`, calling `on_evaluation(epsilon, f)` after each evaluation."""
    if on_evaluation is None:
        return f_and_grad

    def reported(x):
        value, grad = f_and_grad(x)
        on_evaluation(epsilon, value)
        return value, grad

    return reported


def sharpness_cost(num_examples, *, epsilons=DEFAULT_EPSILONS, p=None,
                   maxiter=DEFAULT_MAXITER, max_evaluations=None):
    """The most `measure_sharpness` with these settings can cost, to print before it runs."""
    if max_evaluations is None:
        max_evaluations = default_max_evaluations(maxiter)
    space = "full space" if p is None else f"random {p}-dim subspace"
    eps = ", ".join(f"{e:g}" for e in epsilons)
    return MeasurementCost(
        what=f"epsilon-sharpness ({space}, eps {eps}; {maxiter} L-BFGS-B iterations each)",
        kind="loss+gradient", evaluations=len(epsilons) * int(max_evaluations),
        examples=int(num_examples), factor=1)


def _check_epsilon(epsilon):
    if not np.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a positive number, got {epsilon}")


def _check_p(p, n):
    if not 1 <= p <= n:
        raise ValueError(f"subspace dimension p={p} must be between 1 and the number of "
                         f"parameters n={n}")
