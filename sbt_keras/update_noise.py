"""Update noise and gradient staleness of the summed-gradient update (Masters & Luschi 2018,
Sec. 2.1-2.2, eq. 5-9), measured on a Keras network and a fixed sample of N examples.

Conventions: L_i is example i's loss (default: softmax cross-entropy from logits), g_i =
grad L_i its gradient (weight decay NOT included: it is the same for every example, so it
adds nothing to a covariance). One step on a batch B of m examples is eq. 5,

    theta <- theta - eta_tilde * ( sum_{i in B} g_i(theta)  +  m * lambda * w ),

so the update is a SUM of per-example gradients and its covariance grows like m.

(a) Update variance (eq. 5-6). Over the N examples, gbar = (1/N) sum_i g_i and the
per-example covariance is the POPULATION covariance Sigma_1 = (1/N) sum_i (g_i - gbar)
(g_i - gbar)^T. For a batch of m examples drawn uniformly from the N,

    WITH replacement:      tr Cov[eta_tilde sum_{i in B} g_i] = eta_tilde^2 m tr(Sigma_1)
    WITHOUT replacement:   eta_tilde^2 m (N - m)/(N - 1) tr(Sigma_1)   (finite-population
                           correction; 0 at m = N, where every batch is the whole sample).

`update_variance_table` gives both closed forms and a Monte-Carlo measurement of each (draw
batches, form the summed updates, take the trace of their sample covariance), and
`loglog_slope` fits the measured variance against m on log-log axes (1 for the
with-replacement line).

Per-example gradients are taken in INFERENCE mode (training=False: BN uses its moving
statistics). In training mode BN couples the examples of a group, so an example's loss has
no gradient of its own (and tf.vectorized_map over single examples would normalize each
with its own statistics); inference mode is what makes g_i well defined. They are the rows
of a Jacobian of the per-example losses, computed vectorized (tf GradientTape.jacobian with
pfor; or one example at a time in a graph loop, faster on CPU) in chunks of `chunk_size`
examples, so the activations in memory are one chunk's. The
N x P matrix G (float32) is held in host memory: N * P * 4 bytes (1024 examples of a 0.27M
parameter ResNet-20: 1.1 GB). Everything after it works on the N x N Gram matrix K = G G^T
(float64): a summed update is eta_tilde c^T G for a count vector c (how often each example
is in the batch), so |u - u'|^2 = eta_tilde^2 (c - c')^T K (c - c').

(b) Staleness (eq. 7-9). From theta_k and n*m examples in a fixed order, n steps of batch m
(eq. 7: each step's gradient at the weights the previous step left) against one step of
batch n*m (eq. 8: all n*m gradients at theta_k), same eta_tilde, same update rule with
optional weight decay (lambda * batch * w on `decayed_variables`, the batch being m for the
small steps and n*m for the large one). The measured ratio

    rho = |theta_{k+n}^small - theta_{k+1}^large| / |theta_{k+1}^large - theta_k|

(over every trainable variable) is 0 where eq. 9 holds exactly and grows with n*m*eta_tilde.
Both paths run in TRAINING mode, so BN uses each step's own batch statistics; the BN batch
is kept the same in both: the large step's n*m examples are normalized in groups of the
small steps' BN batch (its gradient is the sum of the gradients of the n consecutive
m-example chunks, each computed at theta_k and each normalizing exactly as the small step
on the same chunk would, in the network's own BN groups). That needs the BN batch to
divide m (ValueError otherwise: a split that breaks a BN group). Every variable the network
has (moving statistics too) is reset to its theta_k value before each chunk of the large
step and before each small-step path, and restored bit for bit at the end.

Arithmetic is in the variables' dtype, as training does it; the ratio is formed in float64
from their values. Below float32 rounding (updates within a few ulp of the weights) the
ratio measures rounding, not staleness: use a float64 network to check tiny eta_tilde.

How rho -> 0: for a smooth loss rho = eta_tilde * |e_2 theta-term| / |e_1 term| + O(eta_tilde^2),
linear in eta_tilde (tests/test_update_noise.py derives the quadratic case exactly). A ReLU
network's gradient jumps wherever a pre-activation crosses zero, and the crossings within
a step of size ~eta_tilde add up with random signs, so measured ratios fall more like
sqrt(eta_tilde): on a ResNet-8 from eta_tilde = 2^-8 to 2^-16, the same in float32 and
float64, with float32's rounding floor reached near 2^-20.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from sbt_keras.flat_loss import choose_sample, sparse_softmax_cross_entropy

# ---------------------------------------------------------- per-example gradients


PER_EXAMPLE_METHODS = ("jacobian", "loop")


def per_example_gradients(network, images, labels, *, loss_fn=None, chunk_size=64,
                          variables=None, method="jacobian"):
    """G: [N, P] per-example gradients g_i = grad L_i (inference mode), in the variables'
    dtype, columns in `variables` order (default: the network's trainable variables)
    flattened and concatenated. Chunks of `chunk_size` examples; a short last chunk is
    padded with copies and the padding dropped, so each chunk's graph is traced once.

    method: "jacobian" (vectorized: GradientTape.jacobian with pfor over the chunk) or
    "loop" (tf.map_fn over the chunk's examples inside one graph: one batch-1 backward pass
    each). Same numbers; on 2 CPU cores "loop" was 4x faster for ResNet-20 (55 vs 220 ms
    per example), pfor's batched convolution gradients being slow there; on a GPU the
    vectorized form is the one expected to win (not measured here)."""
    images, labels = choose_sample(images, labels)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if method not in PER_EXAMPLE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PER_EXAMPLE_METHODS)}, got "
                         f"{method!r}")
    loss_fn = loss_fn or sparse_softmax_cross_entropy
    variables = list(variables if variables is not None else network.trainable_variables)
    if not variables:
        raise ValueError("the network has no trainable variables")
    tf_variables = [getattr(v, "value", v) for v in variables]
    n = len(images)
    chunk = min(int(chunk_size), n)
    zero = tf.UnconnectedGradients.ZERO
    dtype = tf.as_dtype(variables[0].dtype)

    @tf.function(reduce_retracing=True)
    def jacobian(x, y):
        with tf.GradientTape() as tape:
            losses = loss_fn(y, network(x, training=False))
        rows = tape.jacobian(losses, tf_variables, experimental_use_pfor=True,
                             unconnected_gradients=zero)
        return tf.concat([tf.reshape(r, [chunk, -1]) for r in rows], axis=1)

    @tf.function(reduce_retracing=True)
    def loop(x, y):
        def one(example):
            xi, yi = example
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(loss_fn(yi[None], network(xi[None], training=False)))
            grads = tape.gradient(loss, tf_variables, unconnected_gradients=zero)
            return tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        return tf.map_fn(one, (x, y), fn_output_signature=dtype)

    compute = jacobian if method == "jacobian" else loop
    size = sum(int(np.prod(v.shape)) for v in variables)
    out = np.empty((n, size), dtype=np.dtype(variables[0].dtype))
    for start in range(0, n, chunk):
        x, y = images[start:start + chunk], labels[start:start + chunk]
        real = len(x)
        if real < chunk:
            x = np.resize(x, (chunk, *x.shape[1:]))
            y = np.resize(y, (chunk, *y.shape[1:]))
        out[start:start + real] = compute(tf.constant(x), tf.constant(y)).numpy()[:real]
    return out


def gram_matrix(grads, block=512):
    """K = G G^T in float64, [N, N], computed in row blocks of `block` (memory: one block of
    G in float64 besides K)."""
    grads = np.asarray(grads)
    n = len(grads)
    gram = np.empty((n, n), np.float64)
    for i in range(0, n, block):
        rows = grads[i:i + block].astype(np.float64)
        for j in range(0, i + 1, block):
            cols = grads[j:j + block].astype(np.float64)
            gram[i:i + block, j:j + block] = rows @ cols.T
            gram[j:j + block, i:i + block] = gram[i:i + block, j:j + block].T
    return gram


@dataclasses.dataclass(frozen=True)
class GradientStatistics:
    """Exact moments of the N per-example gradients: `mean_grad_sq` = |gbar|^2 and
    `trace_sigma1` = tr(Sigma_1), the population (1/N) per-example covariance trace."""
    num_examples: int
    mean_grad_sq: float
    trace_sigma1: float

    @property
    def b_simple(self):
        """tr(Sigma_1) / |gbar|^2 on the sample (the noise scale's exact value there)."""
        from sbt_keras.gradient_noise import b_simple
        return b_simple(self.mean_grad_sq, self.trace_sigma1)


def gradient_statistics(gram):
    """GradientStatistics from the Gram matrix K = G G^T: |gbar|^2 = 1^T K 1 / N^2 and
    tr(Sigma_1) = tr(K)/N - |gbar|^2."""
    gram = _check_gram(gram)
    n = len(gram)
    mean_sq = float(gram.sum()) / n ** 2
    return GradientStatistics(num_examples=n, mean_grad_sq=mean_sq,
                              trace_sigma1=float(np.trace(gram)) / n - mean_sq)


# ------------------------------------------------------------ update variance (a)


def update_variance_with_replacement(trace_sigma1, m, lr):
    """tr Cov of eta_tilde * (sum of m gradients drawn WITH replacement): lr^2 m tr(Sigma_1)."""
    _check_batch(m)
    return float(lr) ** 2 * int(m) * float(trace_sigma1)


def update_variance_without_replacement(trace_sigma1, m, lr, population):
    """The same for m drawn WITHOUT replacement from `population` = N examples:
    lr^2 m (N - m)/(N - 1) tr(Sigma_1), Sigma_1 the population covariance."""
    _check_batch(m, population)
    if population < 2:
        raise ValueError(f"sampling without replacement needs N >= 2, got N={population}")
    return float(lr) ** 2 * m * (population - m) / (population - 1) * float(trace_sigma1)


def draw_counts(population, m, draws, replace, rng):
    """[draws, population] float64: row t counts how often each example is in batch t of m
    examples, drawn uniformly with or without replacement with the numpy Generator `rng`."""
    _check_batch(m, None if replace else population)
    counts = np.zeros((draws, population), np.float64)
    if replace:
        np.add.at(counts, (np.repeat(np.arange(draws), m),
                           rng.integers(0, population, draws * m)), 1)
    else:
        # The m smallest of N uniform keys per row: a uniform m-subset, all rows at once.
        chosen = np.argpartition(rng.random((draws, population)), m - 1, axis=1)[:, :m]
        np.put_along_axis(counts, chosen, 1.0, axis=1)
    return counts


@dataclasses.dataclass(frozen=True)
class MonteCarloVariance:
    """trace of the sample covariance of `draws` summed updates, and its standard error
    (std of the per-draw squared deviations / sqrt(draws))."""
    value: float
    stderr: float
    draws: int


def monte_carlo_update_variance(gram, m, lr, *, draws=1000, replace=True, seed=0):
    """Monte-Carlo tr Cov[eta_tilde sum_{i in B} g_i]: `draws` batches of m examples drawn
    uniformly (with or without replacement) with numpy default_rng(seed); their summed
    updates u_t = lr c_t^T G; the trace of the unbiased (1/(T-1)) sample covariance, from
    the Gram matrix K = G G^T alone."""
    gram = _check_gram(gram)
    n = len(gram)
    _check_batch(m, n if not replace else None)
    if draws < 2:
        raise ValueError(f"a sample covariance needs >= 2 draws, got {draws}")
    counts = draw_counts(n, m, draws, replace, np.random.default_rng(seed))
    deviations = counts - counts.mean(axis=0)
    squared = float(lr) ** 2 * np.einsum("tn,tn->t", deviations @ gram, deviations)
    value = squared.sum() / (draws - 1)
    stderr = squared.std(ddof=1) * draws / (draws - 1) / np.sqrt(draws)
    return MonteCarloVariance(value=float(value), stderr=float(stderr), draws=int(draws))


def loglog_slope(batch_sizes, variances):
    """(slope, intercept) of log(variance) = slope * log(m) + intercept (numpy.polyfit,
    natural logs). Needs >= 2 distinct m and positive variances (ValueError otherwise)."""
    m = np.asarray(batch_sizes, np.float64)
    v = np.asarray(variances, np.float64)
    if m.shape != v.shape or len(np.unique(m)) < 2:
        raise ValueError("a slope needs >= 2 distinct batch sizes, one variance each")
    if np.any(m <= 0) or np.any(~np.isfinite(v)) or np.any(v <= 0):
        raise ValueError("a log-log slope needs positive batch sizes and positive, finite "
                         "variances")
    slope, intercept = np.polyfit(np.log(m), np.log(v), 1)
    return float(slope), float(intercept)


@dataclasses.dataclass(frozen=True)
class UpdateVarianceRow:
    """One batch size m: the closed forms and the Monte-Carlo measurements, with and without
    replacement, at base learning rate lr over a sample of N examples."""
    m: int
    lr: float
    closed_with: float
    closed_without: float
    measured_with: MonteCarloVariance
    measured_without: MonteCarloVariance


def update_variance_table(gram, batch_sizes, lr, *, draws=1000, seed=0):
    """(GradientStatistics, [UpdateVarianceRow]) for each m in `batch_sizes` (each <= N).
    Every m draws from its own seed (seed + its index), so rows are independent."""
    gram = _check_gram(gram)
    stats = gradient_statistics(gram)
    n = stats.num_examples
    rows = []
    for index, m in enumerate(batch_sizes):
        _check_batch(m, n)
        rows.append(UpdateVarianceRow(
            m=int(m), lr=float(lr),
            closed_with=update_variance_with_replacement(stats.trace_sigma1, m, lr),
            closed_without=update_variance_without_replacement(stats.trace_sigma1, m, lr, n),
            measured_with=monte_carlo_update_variance(gram, m, lr, draws=draws,
                                                      replace=True, seed=seed + index),
            measured_without=monte_carlo_update_variance(gram, m, lr, draws=draws,
                                                         replace=False, seed=seed + index)))
    return stats, rows


def _check_batch(m, population=None):
    if int(m) != m or m < 1:
        raise ValueError(f"batch size m={m} must be a positive integer")
    if population is not None and m > population:
        raise ValueError(f"batch size m={m} is larger than the sample of N={population} "
                         f"examples")


def _check_gram(gram):
    gram = np.asarray(gram, np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or len(gram) < 1:
        raise ValueError(f"the Gram matrix must be square [N, N], got {gram.shape}")
    return gram


# ------------------------------------------------------------------ staleness (b)


@dataclasses.dataclass(frozen=True)
class StalenessResult:
    """rho = numerator / denominator = |theta^small_{k+n} - theta^large_{k+1}| /
    |theta^large_{k+1} - theta_k| for n steps of batch m at base learning rate lr."""
    n: int
    m: int
    lr: float
    numerator: float
    denominator: float

    @property
    def ratio(self):
        return self.numerator / self.denominator if self.denominator > 0 else float("nan")

    @property
    def examples_times_lr(self):
        """n * m * eta_tilde: the x-axis of the staleness figure."""
        return self.n * self.m * self.lr


def staleness_curve(network, images, labels, *, ns, m, lrs, weight_decay=0.0,
                    decayed_variables=(), bn_batch_size=None, loss_fn=None):
    """[StalenessResult] for every lr in `lrs` and n in `ns`, from the network's current
    weights theta_k and the first max(ns)*m examples of (images, labels) in their order.

    bn_batch_size: the network's BN group size (None: no batch-dependent norm, or BN over
    whatever batch it is called with); it must divide m. Cost: max(ns) gradients of m
    examples for the large steps (shared by every lr and n: a large step of n*m is the sum
    of the first n chunks' gradients at theta_k) plus max(ns) small steps per lr (the path
    for n is the first n steps of the path for max(ns)): (1 + len(lrs)) * max(ns) * m
    example forward+backward passes. The network's variables are restored bit for bit.
    """
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"the step counts n must be positive integers, got {ns}")
    _check_batch(m)
    m = int(m)
    if bn_batch_size and m % int(bn_batch_size):
        raise ValueError(f"BN batch {int(bn_batch_size)} does not divide m={m}: a split "
                         f"that breaks a BN group (the large step normalizes its n*m "
                         f"examples in the small steps' BN groups)")
    lrs = [float(lr) for lr in lrs]
    if not lrs or any(not np.isfinite(lr) or lr <= 0 for lr in lrs):
        raise ValueError(f"the base learning rates must be positive, got {lrs}")
    n_max = ns[-1]
    images, labels = choose_sample(images, labels)
    if n_max * m > len(images):
        raise ValueError(f"n*m = {n_max}*{m} = {n_max * m} examples are needed, the sample "
                         f"has {len(images)}")
    loss_fn = loss_fn or sparse_softmax_cross_entropy
    trainable = list(network.trainable_variables)
    state = list(network.variables)
    decayed = {id(v) for v in decayed_variables}
    decay = [float(weight_decay) if id(v) in decayed else 0.0 for v in trainable]
    saved_state = [np.array(v.numpy()) for v in state]

    def reset():
        for variable, value in zip(state, saved_state):
            variable.assign(value)

    @tf.function(reduce_retracing=True)
    def chunk_gradient(x, y):
        with tf.GradientTape() as tape:
            # The summed loss in the dtype the loss returns (float32 for cross-entropy,
            # as the train step; float64 for a float64 test network).
            loss = tf.reduce_sum(loss_fn(y, network(x, training=True)))
        return tape.gradient(loss, [v.value for v in trainable],
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def apply(grads, batch, lr):
        # eq. 5 exactly as SGD applies it: theta <- theta - lr * (sum grad + batch*lambda*w),
        # in the variable's dtype.
        # (tf.constant(x, dtype), not tf.cast(x, dtype): a Python float cast goes through
        # float32 first, which would round lr for a float64 network.)
        for variable, grad, lam in zip(trainable, grads, decay):
            step = tf.cast(grad, variable.dtype)
            if lam:
                step = step + tf.constant(batch * lam, variable.dtype) * variable.value
            variable.assign_sub(tf.constant(lr, variable.dtype) * step)

    def flat():
        return np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in trainable])

    def chunk(j):
        return tf.constant(images[j * m:(j + 1) * m]), tf.constant(labels[j * m:(j + 1) * m])

    try:
        # Large steps: gradient sums over the first n chunks, every chunk at theta_k.
        sums, running = {}, None
        for j in range(n_max):
            reset()
            # Summed in float64, rounded to the variables' dtype once, in `apply`.
            grads = [g.numpy().astype(np.float64) for g in chunk_gradient(*chunk(j))]
            running = grads if running is None else [r + g for r, g in zip(running, grads)]
            if j + 1 in ns:
                sums[j + 1] = [np.array(r) for r in running]
        results = []
        for lr in lrs:
            large = {}
            for n in ns:
                reset()
                apply(sums[n], n * m, lr)
                large[n] = flat()
            reset()
            start = flat()
            for j in range(n_max):
                apply(chunk_gradient(*chunk(j)), m, lr)
                if j + 1 in ns:
                    small = flat()
                    results.append(StalenessResult(
                        n=j + 1, m=m, lr=lr,
                        numerator=float(np.linalg.norm(small - large[j + 1])),
                        denominator=float(np.linalg.norm(large[j + 1] - start))))
        return results
    finally:
        reset()  # the saved arrays themselves: theta_k and the moving statistics, bit for bit


def staleness_ratio(network, images, labels, *, n, m, lr, **kwargs):
    """One StalenessResult (see `staleness_curve`)."""
    return staleness_curve(network, images, labels, ns=[n], m=m, lrs=[lr], **kwargs)[0]
