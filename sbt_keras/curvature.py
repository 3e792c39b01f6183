"""Hessian curvature of the training loss from Hessian-vector products (HVPs) alone.

  * `top_hessian_eigenvalue`: the largest (algebraic) eigenvalue of H.
      method="lanczos" (default): scipy.sparse.linalg.eigsh (ARPACK's implicitly restarted
        Lanczos) on a LinearOperator whose matvec is the HVP, which="LA" (largest
        algebraic), seeded start vector.
      method="power": power iteration. It converges to the eigenvalue of largest |lambda|,
        which may be negative (a saddle, or a net far from a minimum). That value is
        reported with its sign as `dominant`; when it is negative a second power iteration
        on H - dominant * I (all of whose eigenvalues are >= 0) gives the largest algebraic
        eigenvalue, reported as `eigenvalue`. Stops when the Rayleigh quotient changes by
        at most tol * |lambda| between iterations.
  * `hutchinson_trace`: tr(H) ~ mean of v^T H v over Rademacher vectors v (entries +-1,
    seeded), with the standard error of that mean.

Both take `hvp(v) -> H v` (float64 numpy, length n); `model_top_hessian_eigenvalue` and
`model_hessian_trace` build it for a Keras model with sbt_keras/flat_loss.FlatLoss
(inference mode, weights restored afterwards; evaluated in float32, so eigenvalues carry
~1e-6 relative noise).

Cost: one HVP is a forward-over-reverse pass over the N sample examples, about 2-3x one
forward + backward pass. `max_iterations` is a hard cap on HVPs for the eigenvalue (both
methods, both power phases together); the trace costs exactly `samples` HVPs.
`eigenvalue_cost` and `trace_cost` state this before a run. When the cap stops a run
before convergence, `converged` is False and `eigenvalue` is the best estimate so far (for
Lanczos the largest Rayleigh quotient seen, a lower bound on the top eigenvalue).
"""
import dataclasses

import numpy as np
import scipy.sparse.linalg

from sbt_keras.flat_loss import FlatLoss, MeasurementCost, choose_sample

METHODS = ("lanczos", "power")
# ARPACK's Lanczos basis size (scipy's default for k = 1): this many HVPs per restart.
LANCZOS_NCV = 20


@dataclasses.dataclass(frozen=True)
class EigenResult:
    """eigenvalue: largest algebraic eigenvalue of H; iterations: HVPs used; converged;
    method; dominant: the largest-|lambda| eigenvalue with its sign (power method only)."""
    eigenvalue: float
    iterations: int
    converged: bool
    method: str
    dominant: float | None = None


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """mean: the Hutchinson estimate of tr(H); stderr: its standard error
    (sample std / sqrt(samples)); samples: number of v^T H v terms; estimates: those terms."""
    mean: float
    stderr: float
    samples: int
    estimates: np.ndarray = dataclasses.field(repr=False)


class _BudgetExhausted(Exception):
    """Raised by the counted HVP when the HVP cap is reached."""


class _CountedHvp:
    """The HVP with a hard cap on calls; remembers the largest Rayleigh quotient seen."""

    def __init__(self, hvp, n, budget):
        self.hvp, self.n, self.budget = hvp, n, budget
        self.calls = 0
        self.best_rayleigh = -np.inf

    def __call__(self, v):
        if self.calls >= self.budget:
            raise _BudgetExhausted
        self.calls += 1
        v = np.asarray(v, np.float64).reshape(self.n)
        w = np.asarray(self.hvp(v), np.float64).reshape(self.n)
        vv = v @ v
        if vv > 0:
            self.best_rayleigh = max(self.best_rayleigh, float(v @ w / vv))
        return w


def top_hessian_eigenvalue(hvp, n, *, method="lanczos", tol=1e-4, max_iterations=100,
                           seed=0):
    """Largest algebraic eigenvalue of the symmetric n x n H given by `hvp(v) -> H v`.

    tol: relative accuracy (ARPACK's tol for Lanczos; relative change of the Rayleigh
    quotient for power). max_iterations: cap on HVP calls. seed: start vector, standard
    normal from numpy default_rng(seed).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    counted = _CountedHvp(hvp, n, max_iterations)
    rng = np.random.default_rng(seed)
    if method == "power":
        return _power_method(counted, n, tol, rng)
    return _lanczos(counted, n, tol, rng)


def _lanczos(counted, n, tol, rng):
    if n <= 2:
        # ARPACK needs k < n - 1; for n <= 2 the dense H costs n HVPs.
        try:
            H = np.column_stack([counted(e) for e in np.eye(n)])
        except _BudgetExhausted:
            return EigenResult(counted.best_rayleigh, counted.calls, False, "lanczos")
        H = (H + H.T) / 2
        return EigenResult(float(np.linalg.eigvalsh(H)[-1]), counted.calls, True, "lanczos")
    ncv = min(n, LANCZOS_NCV)
    operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=counted, dtype=np.float64)
    # ARPACK counts restarts, each about ncv - 1 HVPs; the HVP cap is what really binds.
    restarts = max(1, counted.budget // max(1, ncv - 1))
    try:
        values = scipy.sparse.linalg.eigsh(operator, k=1, which="LA", v0=rng.standard_normal(n),
                                           ncv=ncv, tol=tol, maxiter=restarts,
                                           return_eigenvectors=False)
        return EigenResult(float(values[-1]), counted.calls, True, "lanczos")
    except scipy.sparse.linalg.ArpackNoConvergence as e:
        best = max([counted.best_rayleigh, *np.asarray(e.eigenvalues, float)])
        return EigenResult(float(best), counted.calls, False, "lanczos")
    except _BudgetExhausted:
        return EigenResult(counted.best_rayleigh, counted.calls, False, "lanczos")


def _power_iteration(matvec, n, tol, rng):
    """(Rayleigh quotient of the dominant eigenvalue, converged); stops on the HVP cap."""
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    previous = None
    value = np.nan
    try:
        while True:
            w = matvec(v)
            value = float(v @ w)  # Rayleigh quotient, v has unit norm
            if previous is not None and abs(value - previous) <= tol * abs(value):
                return value, True
            norm = np.linalg.norm(w)
            if norm == 0:
                return 0.0, True  # v is in the null space; H v = 0 for this v
            v, previous = w / norm, value
    except _BudgetExhausted:
        return value, False


def _power_method(counted, n, tol, rng):
    dominant, converged = _power_iteration(counted, n, tol, rng)
    if not dominant < 0:
        return EigenResult(dominant, counted.calls, converged, "power", dominant)
    # H - dominant * I has eigenvalues lambda - dominant >= 0; its dominant one is
    # lambda_max - dominant.
    shifted, converged_shifted = _power_iteration(lambda v: counted(v) - dominant * v,
                                                  n, tol, rng)
    # Unconverged, v^T (H - dominant I) v + dominant = v^T H v is still a lower bound; with
    # no HVP left for the second run, the best Rayleigh quotient seen is.
    top = counted.best_rayleigh if np.isnan(shifted) else shifted + dominant
    return EigenResult(float(top), counted.calls, converged and converged_shifted,
                       "power", dominant)


def hutchinson_trace(hvp, n, *, samples=100, seed=0):
    """Hutchinson's estimate of tr(H): mean of v^T H v over `samples` Rademacher vectors.

    v has i.i.d. entries +-1 with probability 1/2 (numpy default_rng(seed)); E[v^T H v] =
    tr(H). Returns the mean and its standard error; costs exactly `samples` HVPs.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a standard error needs two), got {samples}")
    rng = np.random.default_rng(seed)
    estimates = np.empty(samples)
    for i in range(samples):
        v = rng.integers(0, 2, size=n).astype(np.float64) * 2 - 1
        estimates[i] = v @ np.asarray(hvp(v), np.float64)
    return TraceResult(mean=float(estimates.mean()),
                       stderr=float(estimates.std(ddof=1) / np.sqrt(samples)),
                       samples=int(samples), estimates=estimates)


def model_top_hessian_eigenvalue(model, images, labels, *, method="lanczos", tol=1e-4,
                                 max_iterations=100, seed=0, sample_size=None,
                                 chunk_size=256, loss_fn=None, strategy=None,
                                 hvp_mode="forward"):
    """`top_hessian_eigenvalue` of a Keras model's loss at its current weights.

    sample_size: N examples chosen by `choose_sample` with `seed`. Weights are restored.
    chunk_size, loss_fn, strategy, hvp_mode: see `FlatLoss`.
    """
    images, labels = choose_sample(images, labels, sample_size, seed)
    with FlatLoss(model, images, labels, loss_fn=loss_fn, chunk_size=chunk_size,
                  strategy=strategy, hvp_mode=hvp_mode) as loss:
        return top_hessian_eigenvalue(lambda v: loss.hvp(loss.x0, v), loss.size,
                                      method=method, tol=tol,
                                      max_iterations=max_iterations, seed=seed)


def model_hessian_trace(model, images, labels, *, samples=100, seed=0, sample_size=None,
                        chunk_size=256, loss_fn=None, strategy=None, hvp_mode="forward"):
    """`hutchinson_trace` of a Keras model's loss Hessian at its current weights."""
    images, labels = choose_sample(images, labels, sample_size, seed)
    with FlatLoss(model, images, labels, loss_fn=loss_fn, chunk_size=chunk_size,
                  strategy=strategy, hvp_mode=hvp_mode) as loss:
        return hutchinson_trace(lambda v: loss.hvp(loss.x0, v), loss.size,
                                samples=samples, seed=seed)


def eigenvalue_cost(num_examples, *, method="lanczos", max_iterations=100):
    """The most `model_top_hessian_eigenvalue` can cost, to print before it runs."""
    return MeasurementCost(what=f"top Hessian eigenvalue ({method})", kind="HVP",
                           evaluations=int(max_iterations), examples=int(num_examples),
                           factor=3)


def trace_cost(num_examples, *, samples=100):
    """What `model_hessian_trace` costs (exactly `samples` HVPs), to print before it runs."""
    return MeasurementCost(what="Hutchinson Hessian trace", kind="HVP",
                           evaluations=int(samples), examples=int(num_examples), factor=3)
