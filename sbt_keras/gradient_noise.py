"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", App. A), from gradients at two batch sizes.

Conventions
-----------
G is the true (population) MEAN gradient, Sigma the covariance of ONE example's gradient
(per-example covariance). G_B denotes the MEAN gradient over a batch of B examples drawn
independently (with replacement), so

    E|G_B|^2 = |G|^2 + tr(Sigma) / B.

Two batch sizes B_small < B_big give the unbiased estimates (their App. A.1)

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big).

OUR CODE HAS SUMS. The summed-gradient update (Masters & Luschi eq. 5, training/summed_sgd.py)
differentiates Sigma_i L_i, not the mean, so a train step holds S_B = B * G_B. Everything
here that takes sum-gradients converts with |G_B|^2 = |S_B|^2 / B^2 before estimating; the
numpy estimators take |G_B|^2 of MEAN gradients. A weight-decay term B*lambda*w in S_B is
allowed if it is in every sum alike: it adds lambda*w to every G_B, which changes |G|^2 (the
regularized gradient) and leaves tr(Sigma) alone.

Unbiasedness holds for i.i.d. (with-replacement) draws; an epoch's shuffled batches are
drawn without replacement from N examples, which multiplies tr(Sigma)/B by (N-B)/(N-1):
negligible for B << N. The small batches may be parts of the big one (the replicas of one
global batch, the halves of one batch): each expectation holds on its own.

One step's estimates are noisy, and either can be NEGATIVE; McCandlish et al. smooth the two
separately with exponential moving averages and take the ratio of the smoothed values
(`GradientNoiseScale`). B_simple is undefined (NaN here) while the |G|^2 estimate is <= 0.

Where the two batch sizes come from in a train step (`replica_squared_norms`,
`split_batch_sum_gradients` + `squared_norms_from_parts`, in TensorFlow, graph-safe):
  * R >= 2 replicas: B_small = the replica batch b, B_big = R b. |G_small|^2 is the MEAN
    over replicas of each replica's |S_r / b|^2 (one extra scalar all-reduce); |G_big|^2 is
    |S / (R b)|^2 of the all-reduced sum S. Each replica's BN already uses only its own
    examples, so its S_r is an honest gradient of b examples (not so with synchronized BN,
    --bn_sync, whose statistics mix replicas: the per-replica gradients are then not
    gradients of their own examples' losses).
  * one device: the batch of m examples is split into two halves of m/2 AT BN-GROUP
    BOUNDARIES: B_small = m/2, B_big = m, and the halves play the two replicas. A half that
    cut a BN group would not be a gradient of its own examples (the group's statistics mix
    both halves), so `check_split` refuses it with a ValueError.
"""
import dataclasses
import math


# ------------------------------------------- estimators (plain floats, no TensorFlow)


@dataclasses.dataclass(frozen=True)
class NoiseEstimate:
    """Estimates of |G|^2 (`grad_sq`, mean gradient) and tr(Sigma) (`trace`, per-example
    covariance); either may be negative for a single step."""
    grad_sq: float
    trace: float

    @property
    def b_simple(self):
        """tr(Sigma) / |G|^2; NaN while |G|^2 <= 0."""
        return b_simple(self.grad_sq, self.trace)


def b_simple(grad_sq, trace):
    """tr(Sigma) / |G|^2 (the simple noise scale, in examples); NaN while grad_sq <= 0 or
    either value is not finite."""
    grad_sq, trace = float(grad_sq), float(trace)
    if not (math.isfinite(grad_sq) and math.isfinite(trace)) or grad_sq <= 0:
        return math.nan
    return trace / grad_sq


def mean_gradient_sq(sum_sq_norm, batch):
    """|G_B|^2 of the MEAN gradient from |S_B|^2 of the SUM gradient over `batch` examples."""
    batch = _positive_batch(batch, "batch")
    return float(sum_sq_norm) / batch ** 2


def unbiased_estimates(small_sq, big_sq, b_small, b_big):
    """McCandlish et al.'s unbiased |G|^2 and tr(Sigma) from |G_small|^2 and |G_big|^2, the
    squared norms of MEAN gradients over b_small < b_big examples (sums: convert with
    `mean_gradient_sq` first)."""
    b_small = _positive_batch(b_small, "b_small")
    b_big = _positive_batch(b_big, "b_big")
    if not b_small < b_big:
        raise ValueError(f"the two batch sizes must satisfy B_small < B_big, got "
                         f"B_small={b_small:g}, B_big={b_big:g}")
    small_sq, big_sq = float(small_sq), float(big_sq)
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(grad_sq=grad_sq, trace=trace)


class GradientNoiseScale:
    """Separately smoothed |G|^2 and tr(Sigma), and B_simple from the smoothed values.

    Each of the two is an exponential moving average with decay `ema` in (0, 1),
    bias-corrected as Adam's moments are: after t updates with values x_1..x_t,

        s_t = ema * s_{t-1} + (1 - ema) * x_t,  s_0 = 0;   smoothed = s_t / (1 - ema^t),

    so a constant input is returned exactly from the first update on. `update` takes the
    squared norms of MEAN gradients (see the module docstring for sums) and returns that
    step's own (unsmoothed, possibly negative) estimate. Before any update the smoothed
    values are NaN.
    """

    def __init__(self, ema=0.99):
        ema = float(ema)
        if not 0.0 < ema < 1.0:
            raise ValueError(f"ema must be in (0, 1), got {ema:g}")
        self.ema = ema
        self.steps = 0
        self._grad_sq = 0.0
        self._trace = 0.0

    def update(self, small_sq, big_sq, b_small, b_big):
        estimate = unbiased_estimates(small_sq, big_sq, b_small, b_big)
        if not (math.isfinite(estimate.grad_sq) and math.isfinite(estimate.trace)):
            # One overflowed step would poison every later smoothed value: refuse it.
            raise ValueError(f"non-finite gradient norms: |G_small|^2={small_sq}, "
                             f"|G_big|^2={big_sq}")
        self.steps += 1
        self._grad_sq = self.ema * self._grad_sq + (1 - self.ema) * estimate.grad_sq
        self._trace = self.ema * self._trace + (1 - self.ema) * estimate.trace
        return estimate

    def _corrected(self, value):
        if self.steps == 0:
            return math.nan
        return value / (1.0 - self.ema ** self.steps)

    @property
    def grad_sq(self):
        """Smoothed, bias-corrected |G|^2 (NaN before the first update)."""
        return self._corrected(self._grad_sq)

    @property
    def trace(self):
        """Smoothed, bias-corrected tr(Sigma) (NaN before the first update)."""
        return self._corrected(self._trace)

    @property
    def b_simple(self):
        """tr(Sigma) / |G|^2 of the smoothed values; NaN while the smoothed |G|^2 <= 0."""
        return b_simple(self.grad_sq, self.trace)

    def get_state(self):
        """What a checkpoint needs to continue the averages: a dict of plain numbers."""
        return {"ema": self.ema, "steps": self.steps, "grad_sq_ema": self._grad_sq,
                "trace_ema": self._trace}

    @classmethod
    def from_state(cls, state):
        scale = cls(state["ema"])
        scale.steps = int(state["steps"])
        scale._grad_sq = float(state["grad_sq_ema"])
        scale._trace = float(state["trace_ema"])
        return scale


def _positive_batch(value, name):
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of examples, got {value:g}")
    return value


# ------------------------------------------------------- TensorFlow (train-step side)


def check_split(batch_size, bn_batch_size):
    """The half batch m/2 of a split-batch estimate; ValueError unless the split keeps every
    BN group whole.

    bn_batch_size: examples per BN statistics group; pass `batch_size` itself for BN over
    the whole batch, and None (or 0) for a network without batch-dependent normalization.
    """
    batch_size = int(batch_size)
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"a split-batch noise estimate halves the batch: batch size "
                         f"{batch_size} must be even and >= 2")
    half = batch_size // 2
    if bn_batch_size and half % int(bn_batch_size):
        raise ValueError(f"BN batch {int(bn_batch_size)} does not divide the half batch "
                         f"{half} of batch {batch_size}: a split that breaks a BN group "
                         f"mixes the halves' statistics, so neither half's gradient is its "
                         f"own examples'; use a BN batch that divides {half}")
    return half


def squared_norm(tensors):
    """Sum of squares of a list of tensors, as one float32 scalar (None entries skipped)."""
    import tensorflow as tf

    # convert_to_tensor: an IndexedSlices gradient (embeddings) becomes dense first.
    parts = [tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(t), tf.float32)))
             for t in tensors if t is not None]
    if not parts:
        raise ValueError("no gradient tensors given")
    return tf.add_n(parts)


def squared_norms_from_parts(part_sum_grads, part_batch):
    """(|G_small|^2, |G_big|^2, B_small, B_big) from K >= 2 equal parts of one batch.

    part_sum_grads: K lists of SUM-gradient tensors (one list per part: the two halves of a
    split batch, or the replicas' gradients gathered), each over `part_batch` examples.
    B_small = part_batch, B_big = K * part_batch; |G_small|^2 is the MEAN over parts of
    |S_k / b|^2, |G_big|^2 = |sum_k S_k / (K b)|^2. Graph-safe; results are float32 tensors.
    """
    import tensorflow as tf

    parts = list(part_sum_grads)
    if len(parts) < 2:
        raise ValueError(f"a noise estimate needs >= 2 parts of the batch, got {len(parts)}")
    if len({len(p) for p in parts}) != 1:
        raise ValueError("every part must hold the same list of gradient tensors")
    b = tf.cast(part_batch, tf.float32)
    k = float(len(parts))
    small_sq = tf.add_n([squared_norm(p) for p in parts]) / (k * b * b)
    total = [tf.add_n(list(same)) for same in zip(*parts)]
    big_sq = squared_norm(total) / tf.square(k * b)
    return small_sq, big_sq, b, k * b


def replica_squared_norms(local_sum_grads, local_batch, global_sum_grads=None):
    """(|G_small|^2, |G_big|^2, B_small, B_big) inside a replica context of R >= 2 replicas.

    local_sum_grads: this replica's SUM gradients over its `local_batch` examples;
    global_sum_grads: their all-reduced SUM, if the step already has it (else it is
    all-reduced here: one full-gradient all-reduce). |G_small|^2 is the MEAN over replicas
    of each replica's |S_r / b|^2: one extra scalar all-reduce. The same values on every
    replica. ValueError with fewer than 2 replicas: use the split-batch source instead.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None:
        raise ValueError("replica_squared_norms runs inside strategy.run (a replica "
                         "context), not in cross-replica context")
    replicas = context.num_replicas_in_sync
    if replicas < 2:
        raise ValueError(f"a replica-based noise estimate needs >= 2 replicas, got "
                         f"{replicas}; use split_batch_sum_gradients on one device")
    b = tf.cast(local_batch, tf.float32)
    local_sq = squared_norm(local_sum_grads) / (b * b)
    small_sq = context.all_reduce(tf.distribute.ReduceOp.SUM, local_sq) / replicas
    if global_sum_grads is None:
        global_sum_grads = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                              list(local_sum_grads))
    big_b = replicas * b
    big_sq = squared_norm(global_sum_grads) / (big_b * big_b)
    return small_sq, big_sq, b, big_b


def split_batch_sum_gradients(network, images, labels, variables, *, bn_batch_size,
                              loss_fn=None, training=True):
    """(sum-gradients of the first half, of the second half, per-example losses) of a batch.

    One forward pass over the whole batch (training mode by default, as the train step
    runs it) and one backward pass per half. Each half is m/2 consecutive examples and
    `check_split(m, bn_batch_size)` makes sure no BN group straddles the halves, so each
    half's gradient depends only on its own examples; the two add up to the whole batch's
    sum-gradient. The batch size must be static. Feed the halves to
    `squared_norms_from_parts([first, second], m // 2)`.
    """
    import tensorflow as tf

    m = images.shape[0]
    if m is None:
        raise ValueError("split_batch_sum_gradients needs a static batch size")
    half = check_split(m, bn_batch_size)
    if loss_fn is None:
        from sbt_keras.flat_loss import sparse_softmax_cross_entropy as loss_fn
    with tf.GradientTape(persistent=True) as tape:
        outputs = network(images, training=training)
        per_example = loss_fn(labels, outputs)
        first = tf.reduce_sum(per_example[:half])
        second = tf.reduce_sum(per_example[half:])
    zero = tf.UnconnectedGradients.ZERO
    grads_first = tape.gradient(first, variables, unconnected_gradients=zero)
    grads_second = tape.gradient(second, variables, unconnected_gradients=zero)
    del tape
    return grads_first, grads_second, per_example

