"""A Keras model's training loss as a function of one flat float64 parameter vector.

The sharpness and curvature measurements (sbt_keras/sharpness.py, sbt_keras/curvature.py)
work on plain numpy callables; `FlatLoss` builds them from a model and a fixed sample:

    f(x) = (1/N) * sum_i loss(labels_i, model(images_i, training=False)),

where x is every TRAINABLE variable of the model, flattened and concatenated in
`model.trainable_variables` order. Inference mode means batch norm uses its moving
statistics, so f is a deterministic function of x and of nothing else (no batch effects,
no state updated while measuring). Non-trainable variables (moving statistics) are never
touched. Weight decay is not part of f: the repo applies it inside the optimizer step.

Precision: the optimizer side is float64 numpy; x is assigned to the model's variables in
their own dtype (float32), so f, its gradient and Hessian-vector products are evaluated in
float32 and only accumulated (over chunks) in float64. Expect ~1e-6 relative noise.

Cost of one evaluation (what the callers' cost statements count):
  * `value_and_grad`: one forward + backward pass over the N examples.
  * `hvp`: about 2-3x the cost of one forward + backward over the N examples. By default
    forward-over-reverse (a forward-mode JVP of the reverse-mode gradient,
    hvp_mode="forward"); hvp_mode="reverse" uses nested tapes (the gradient of
    <grad f, v>), which needs more memory but traces faster (small models, tests).
Both run in chunks of `chunk_size` examples, so memory is bounded by one chunk's
activations whatever N is; chunk sums are added in float64 and divided by N once, so the
mean is exact whatever the chunking. A short last chunk is padded with zero-weight
examples, so each computation is traced once (one input shape).

Distribution: a model built under a tf.distribute strategy (MirroredVariables) works as it
is: with `strategy=None` every chunk runs in cross-replica context on the primary copies
(one device does the work), and assignments reach every replica's copy. Pass the strategy
to split each chunk across its replicas instead; sums are then all-reduced with SUM, so
the numbers are the same either way (tests/test_sharpness.py checks it).

The model's weights are restored exactly (the original float32 arrays) by `restore()`,
which `with FlatLoss(...) as fl:` calls on exit, also after an exception.
"""
import dataclasses

import numpy as np
import tensorflow as tf


HVP_MODES = ("forward", "reverse")


def sparse_softmax_cross_entropy(labels, logits):
    """Per-example softmax cross-entropy from logits (the default loss), in float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.cast(labels, tf.int32), tf.cast(logits, tf.float32))


@dataclasses.dataclass(frozen=True)
class MeasurementCost:
    """What a measurement will cost, stated before it starts.

    `evaluations` is an upper bound on calls of kind `kind` ("loss+gradient" or "HVP"),
    each over `examples` examples; `factor` is the cost of one call in forward+backward
    passes over those examples (1 for loss+gradient, ~2-3 for an HVP, stated as 3).
    """
    what: str
    kind: str
    evaluations: int
    examples: int
    factor: float

    @property
    def example_passes(self):
        """Upper bound on forward+backward example passes: evaluations x examples x factor."""
        return int(round(self.evaluations * self.examples * self.factor))

    def __str__(self):
        extra = "" if self.factor == 1 else f" (x{self.factor:g} each)"
        return (f"{self.what}: <= {self.evaluations} {self.kind} evaluations x "
                f"{self.examples} examples{extra} = <= {self.example_passes:,} example "
                f"forward+backward passes")


def choose_sample(images, labels, sample_size=None, seed=0):
    """The fixed sample f is measured on: all examples, or `sample_size` of them.

    A subset is drawn uniformly without replacement with numpy's default_rng(seed) and
    kept in data order. Raises ValueError if `sample_size` is not in 1..len(images) or
    images and labels differ in length.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} images, "
                         f"{len(labels)} labels")
    if len(images) == 0:
        raise ValueError("the sample is empty: no images given")
    if sample_size is None:
        return images, labels
    if not 1 <= sample_size <= len(images):
        raise ValueError(f"sample size N={sample_size} must be between 1 and the "
                         f"{len(images)} examples given")
    index = np.sort(np.random.default_rng(seed).choice(len(images), sample_size,
                                                       replace=False))
    return images[index], labels[index]


class FlatLoss:
    """f(x), its gradient and Hessian-vector products for a Keras model on a fixed sample.

    `model` must output what `loss_fn(labels, outputs)` takes and accept `training=`;
    `loss_fn` returns per-example losses [b] (default: softmax cross-entropy from logits).
    Use as a context manager (or call `restore()`) to get the original weights back.
    strategy: None (run on the primary copies) or the strategy the model was built under
    (split every chunk across its replicas). hvp_mode: "forward" or "reverse" (see above).
    """

    def __init__(self, model, images, labels, *, loss_fn=None, chunk_size=256,
                 strategy=None, hvp_mode="forward"):
        images, labels = choose_sample(images, labels)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {', '.join(HVP_MODES)}, "
                             f"got {hvp_mode!r}")
        self.hvp_mode = hvp_mode
        self.model = model
        self.images, self.labels = images, labels
        self.chunk_size = min(int(chunk_size), len(images))
        self.strategy = strategy
        # Every chunk is padded to one length (a multiple of the replica count) with
        # zero-weight copies of its own examples: one shape, so each tf.function traces
        # once, and equal shards per replica. Weight 0 removes them from every sum.
        replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        self._padded_chunk = -(-self.chunk_size // replicas) * replicas
        self._loss_fn = loss_fn or sparse_softmax_cross_entropy
        # The keras Variables (for assign) and the tf.Variables under them (what tapes and
        # ForwardAccumulator watch; MirroredVariables under a strategy).
        self._variables = list(model.trainable_variables)
        if not self._variables:
            raise ValueError("the model has no trainable variables")
        self._tf_variables = [v.value for v in self._variables]
        self._shapes = [tuple(v.shape) for v in self._variables]
        self._dtypes = [v.dtype for v in self._variables]
        self._sizes = [int(np.prod(s, dtype=np.int64)) for s in self._shapes]
        self._original = [np.array(v.numpy()) for v in self._variables]
        self.x0 = np.concatenate([w.ravel() for w in self._original]).astype(np.float64)
        self._current = self.x0.copy()  # the x the variables hold now
        self.loss_grad_calls = 0
        self.hvp_calls = 0
        self._value_grad_fn = tf.function(self._chunk_value_grad, reduce_retracing=True)
        self._hvp_fn = tf.function(self._chunk_hvp, reduce_retracing=True)

    @property
    def size(self):
        """n: the number of trainable parameters (length of x)."""
        return int(self.x0.size)

    @property
    def num_examples(self):
        """N: the number of examples f averages over."""
        return len(self.images)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def restore(self):
        """Puts the model's original weights back, bit for bit."""
        for variable, value in zip(self._variables, self._original):
            variable.assign(value)
        self._current = self.x0.copy()

    def value_and_grad(self, x):
        """(f(x), grad f(x)) as (float, float64 [n]); one forward+backward over N examples."""
        self._assign(x)
        self.loss_grad_calls += 1
        total, grads = 0.0, [np.zeros(s, np.float64) for s in self._shapes]
        for chunk in self._chunks():
            value, chunk_grads = self._run(self._value_grad_fn, *chunk)
            total += float(value)
            for g, c in zip(grads, chunk_grads):
                g += c.numpy()
        return total / self.num_examples, self._flatten(grads) / self.num_examples

    def value(self, x):
        """f(x) (computed with its gradient; the cost is the same order)."""
        return self.value_and_grad(x)[0]

    def hvp(self, x, v):
        """H(x) v, float64 [n]: forward-over-reverse over N examples (~2-3x a gradient)."""
        v = np.asarray(v, np.float64)
        if v.shape != (self.size,):
            raise ValueError(f"v must have shape ({self.size},), got {v.shape}")
        self._assign(x)
        self.hvp_calls += 1
        tangents = [tf.constant(t) for t in self._split(v)]
        out = [np.zeros(s, np.float64) for s in self._shapes]
        for chunk in self._chunks():
            products = self._run(self._hvp_fn, *chunk, tangents)
            for o, c in zip(out, products):
                o += c.numpy()
        return self._flatten(out) / self.num_examples

    # -- internals -------------------------------------------------------------------

    def _split(self, x):
        """Flat float64 vector -> per-variable arrays in the variables' dtypes."""
        pieces, start = [], 0
        for shape, size, dtype in zip(self._shapes, self._sizes, self._dtypes):
            pieces.append(np.asarray(x[start:start + size], dtype=dtype).reshape(shape))
            start += size
        return pieces

    @staticmethod
    def _flatten(arrays):
        return np.concatenate([a.ravel() for a in arrays])

    def _assign(self, x):
        x = np.asarray(x, np.float64)
        if x.shape != (self.size,):
            raise ValueError(f"x must have shape ({self.size},), got {x.shape}")
        if np.array_equal(x, self._current):
            return  # HVP sequences at one x (power iteration, Lanczos) skip the copies
        # float64 -> the variables' float32: f is evaluated at the rounded x.
        for variable, value in zip(self._variables, self._split(x)):
            variable.assign(value)
        self._current = x.copy()

    def _chunks(self):
        """(images, labels, weights) of `_padded_chunk` examples each; weight 0 = padding."""
        for start in range(0, self.num_examples, self.chunk_size):
            images = self.images[start:start + self.chunk_size]
            labels = self.labels[start:start + self.chunk_size]
            weights = np.zeros(self._padded_chunk, np.float32)
            weights[:len(images)] = 1
            if len(images) < self._padded_chunk:
                # Copies of real examples, so the padded losses are finite (0 * inf = nan).
                images = np.resize(images, (self._padded_chunk, *images.shape[1:]))
                labels = np.resize(labels, (self._padded_chunk, *labels.shape[1:]))
            yield images, labels, weights

    def _loss_sum(self, images, labels, weights):
        outputs = self.model(images, training=False)
        return tf.reduce_sum(weights * tf.cast(self._loss_fn(labels, outputs), tf.float32))

    def _chunk_value_grad(self, images, labels, weights):
        def replica(images, labels, weights):
            with tf.GradientTape() as tape:
                loss = self._loss_sum(images, labels, weights)
            return loss, tape.gradient(loss, self._tf_variables,
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self._replicated(replica, images, labels, weights)

    def _chunk_hvp(self, images, labels, weights, tangents):
        zero = tf.UnconnectedGradients.ZERO

        def forward_over_reverse(images, labels, weights):
            # The JVP (along `tangents`) of the tape's gradient: memory of about two
            # backward passes, the cheaper choice for big nets.
            with tf.autodiff.ForwardAccumulator(self._tf_variables, tangents) as acc:
                with tf.GradientTape() as tape:
                    loss = self._loss_sum(images, labels, weights)
                grads = tape.gradient(loss, self._tf_variables, unconnected_gradients=zero)
            return acc.jvp(grads, unconnected_gradients=zero)

        def reverse_over_reverse(images, labels, weights):
            # grad of <grad f, v>: keeps the backward pass's intermediates, but traces
            # about 3x faster than the forward accumulator (small models, tests).
            with tf.GradientTape() as outer:
                with tf.GradientTape() as tape:
                    loss = self._loss_sum(images, labels, weights)
                grads = tape.gradient(loss, self._tf_variables, unconnected_gradients=zero)
                dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, tangents)])
            return outer.gradient(dot, self._tf_variables, unconnected_gradients=zero)

        replica = forward_over_reverse if self.hvp_mode == "forward" else reverse_over_reverse
        return self._replicated(replica, images, labels, weights)

    def _replicated(self, replica, *chunk):
        if self.strategy is None:
            return replica(*chunk)
        outputs = self.strategy.run(replica, args=chunk)
        # Per-replica sums over disjoint shards: their SUM is the chunk's sum.
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, outputs, axis=None)

    def _run(self, fn, images, labels, weights, *args):
        chunk = (images, labels, weights)
        if self.strategy is not None:
            chunk = tuple(self._shard(a) for a in chunk)
        return fn(*chunk, *args)

    def _shard(self, array):
        """Equal consecutive slices of `array` (a padded chunk), one per replica."""
        per_replica = len(array) // self.strategy.num_replicas_in_sync
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(
                array[ctx.replica_id_in_sync_group * per_replica:][:per_replica]))
