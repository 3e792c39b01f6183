"""K packed trials as one fused network: the grouped formulation (`--pack_formulation`).

    fused = models.build(cfg.model, ..., trials=K)     # K weight sets, trial-major channels
    packed = GroupedPackModel(fused, members, schedules)
    packed.assemble()                                  # members' weights -> fused slices
    packed.fit(...)                                    # one forward/backward for all K
    packed.publish(indices)                            # fused slices -> members' networks

The fused network (models/resnet_cifar.py, `trials=K`) runs every layer once for all K
trials -- grouped convolutions, per-channel norms, a K-way batched matmul for the logits --
so a kernel's fixed cost is paid once per step instead of K times. One loss, the sum of
the K trials' summed losses: its gradient in trial k's slice is trial k's own summed
gradient (no value flows between slices). The update is the paper's rule applied slice by
slice, with trial k's own eta_tilde(k) (its own schedule, evaluated at the step: not
assumed to share a shape) and its own weight decay:

    w_k <- w_k - eta_tilde_k(step) * (g_k + m * lambda_k * w_k)        (live trials only)

written in the same order of float operations as SummedGradientModel + Keras SGD, so a
slice follows its trial run alone to float rounding (tests/test_packed.py).

The members (the K trials' own SummedGradientModels, as the separate formulation builds
them) hold what records need: their networks and optimizer step (published from the fused
slices before any callback reads them, so checkpoints, history, TensorBoard and
training/snapshot.py see ordinary single-trial runs), and their metric trackers (updated by
the fused step directly). A resumed pack restores the members, then `assemble`s the fused
weights from them.

Freezing a diverged trial: a live-mask variable gates every update of its slices with
`tf.where` (never a multiply by zero: 0 * NaN is NaN) -- trainable weights, and the norms'
moving statistics, which the forward pass itself updates and the step puts back. Its
records and checkpoints are its member's, published at the block it diverged; its fused
slices are zeroed when it is frozen, so its NaNs leave the program. Before that (the
rest of the block in which it diverged, as an unpacked run goes on to its block's end) no
value flows between slices on TensorFlow's own grouped kernel; as a guard for kernels that
might mix them (Keras's own XLA-wrapped grouped conv did), a step whose gradients are not
all finite is recomputed with the isolating kernel gradient (layers/trial_conv.py), at the
cost of a second forward/backward on those steps only; finite gradients cannot have been
contaminated (a leaked NaN or Inf stays non-finite).

Under a strategy with R replicas each replica differentiates its m/R examples, adds its
share (m/R) * lambda_k * w_k, and the replicas' gradients are summed elementwise before
the update, which is applied to every replica's copy in a cross-replica merge: the order
of operations of SummedGradientModel + Keras SGD under that strategy.

Supported: the CIFAR ResNets and the reduced AlexNet with a per-channel norm (none, batch
incl. sub-batch BN); `packing.check_formulation` refuses the rest with one line.
"""
import keras
import tensorflow as tf
from keras import ops

from sbt_keras.layers import sub_batches, trial_conv
from sbt_keras.training.packed_model import PackedModel, prefix


def trial_axis(fused_shape, single_shape, trials):
    """Where the trial axis of a fused variable is: 0 (stacked, the logits) or -1 (trial-
    major channel slices, convs and norms); ValueError when neither fits."""
    fused_shape, single_shape = tuple(fused_shape), tuple(single_shape)
    if fused_shape == (trials, *single_shape):
        return 0
    if (single_shape and fused_shape[:-1] == single_shape[:-1]
            and fused_shape[-1] == trials * single_shape[-1]):
        return -1
    raise ValueError(f"a fused variable of shape {fused_shape} is not {trials} slices of "
                     f"shape {single_shape}")


def trial_slice(value, axis, k, trials):
    """Trial k's part of a fused value."""
    if axis == 0:
        return value[k]
    width = value.shape[-1] // trials
    return value[..., k * width:(k + 1) * width]


def per_element(values, axis, shape, trials):
    """A per-trial vector `values` (K,) broadcast against a fused variable of `shape`."""
    if axis == 0:
        return tf.reshape(values, (trials,) + (1,) * (len(shape) - 1))
    return tf.repeat(values, shape[-1] // trials)


def paired_variables(fused, single, trials):
    """[(fused variable, trial axis, the single network's variable of the same path)]."""
    by_path = {v.path: v for v in single.variables}
    pairs = []
    for variable in fused.variables:
        match = by_path.get(variable.path)
        if match is None:
            raise ValueError(f"fused variable {variable.path} has no single-trial twin")
        pairs.append((variable, trial_axis(variable.shape, match.shape, trials), match))
    if len(pairs) != len(by_path):
        raise ValueError("the fused and single networks hold different variables")
    return pairs


class GroupedPackModel(PackedModel):
    """The fused network's step for K members (module docstring). Inherits the packed
    model's metrics (the members' trackers), build, step loop and evaluation loop."""

    def __init__(self, network, members, schedules, **kwargs):
        super().__init__(members, **kwargs)
        self.network = network
        self.trials = len(members)
        self.schedules = list(schedules)
        self.weight_decays = [float(m.weight_decay) for m in members]
        self._pairs = [paired_variables(network, m.network, self.trials) for m in members]
        lead = members[0]
        self._axes = {id(v): axis for v, axis, _ in self._pairs[0]}
        self._decayed = {id(v) for v, _, twin in self._pairs[0] if id(twin) in lead._decayed_ids}
        self._live = tf.Variable([True] * self.trials, trainable=False, name="live")
        # Every replica counts the same steps: one copy's increment is the step.
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _spread(self, values, variable):
        return per_element(values, self._axes[id(variable)], variable.shape, self.trials)

    def _trial_losses(self, labels, logits):
        """Per-example, per-trial cross-entropy (N, K), float32 as SummedGradientModel."""
        labels = ops.broadcast_to(ops.expand_dims(labels, 1), ops.shape(logits)[:2])
        return self.members[0]._per_example_loss(labels, logits)

    def _gradients(self, images, labels):
        """(logits, per-example losses (N, K), gradients of their sum)."""
        with tf.GradientTape() as tape:
            logits = self.network(images, training=True)  # (N, K, classes)
            per_example = self._trial_losses(labels, logits)
            loss_sum = ops.sum(per_example)  # every trial's Sigma_i L_i, summed
        return logits, per_example, tape.gradient(loss_sum, self.network.trainable_variables)

    def train_step(self, data):
        images, labels = data
        context = tf.distribute.get_replica_context()
        state = self.network.non_trainable_variables
        saved = [tf.identity(v) for v in state]
        logits, per_example, grads = self._gradients(images, labels)

        def isolated():
            # The same forward pass again, with the grouped convs' NaN-isolating kernel
            # gradient (layers/trial_conv.py); the first pass already updated the norms'
            # moving statistics, to the same values.
            with trial_conv.isolated_gradients(), sub_batches.moving_statistics_kept():
                return self._gradients(images, labels)[2]

        # A sum is non-finite iff some term is (or it overflowed: a harmless false alarm).
        # Each replica decides for its own gradients; no collective runs inside the branch.
        finite = tf.math.is_finite(tf.add_n([tf.reduce_sum(g) for g in grads]))
        grads = tf.cond(finite, lambda: [tf.identity(g) for g in grads], isolated)
        variables = self.network.trainable_variables
        # This replica's share of m * lambda_k, as SummedGradientModel adds it: its float32
        # batch size (m / R) times lambda_k, before the replicas' gradients are summed.
        decay = ops.cast(ops.shape(images)[0], "float32") * tf.constant(
            self.weight_decays, tf.float32)
        grads = [grad + self._spread(decay, variable) * ops.cast(variable.value, grad.dtype)
                 if id(variable) in self._decayed and any(self.weight_decays) else grad
                 for grad, variable in zip(grads, variables)]
        if context.num_replicas_in_sync > 1:
            # What Keras's optimizer does for the members: sum the replicas' gradients
            # elementwise (a trial's slice only ever meets its own slices).
            grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        rates = tf.stack([ops.cast(s(self._step), "float32") for s in self.schedules])
        self._update(grads, variables, rates)
        for variable, old in zip(state, saved):  # frozen trials' moving statistics stay
            variable.assign(tf.where(self._spread(self._live, variable), variable.value, old))
        self._step.assign_add(1)
        return self._track(per_example, labels, logits)

    def _update(self, grads, variables, rates):
        """w_k <- w_k - eta_tilde_k * g_k on live slices, on every replica's copy of w
        (in a cross-replica merge, as Keras's optimizer applies its updates)."""
        def slice_update(component, grad, rates, live, axis):
            value = tf.convert_to_tensor(component)
            rate = ops.cast(per_element(rates, axis, value.shape, self.trials), value.dtype)
            new = value - ops.cast(grad, value.dtype) * rate
            mask = per_element(live, axis, value.shape, self.trials)
            return component.assign(tf.where(mask, new, value))

        def merged(strategy, grads, rates, live):
            for grad, variable in zip(grads, variables):
                strategy.extended.update(variable.value, slice_update,
                                         args=(grad, rates, live, self._axes[id(variable)]),
                                         group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            merged, tf.distribute.get_strategy(), grads, rates, tf.identity(self._live))

    def test_step(self, data):
        images, labels, weights = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.network(images, training=False)
        return self._track(self._trial_losses(labels, logits), labels, logits, weights)

    def _track(self, per_example, labels, logits, weights=None):
        logs = {}
        for k in self.active:
            member = self.members[k]
            member.loss_tracker.update_state(per_example[:, k], sample_weight=weights)
            member.accuracy_tracker.update_state(labels, logits[:, k], sample_weight=weights)
            for metric in member.metrics:
                logs[prefix(k) + metric.name] = metric.result()
        return logs

    def freeze(self, k):
        """Gates member k's updates off, zeroes its fused slices and retraces the step
        without its metrics. Its weights live on in its member (published at the block it
        diverged, and recorded from there); zeros in the fused slices keep its NaNs out of
        later steps, whose gradients are then finite again (no isolating recomputation)."""
        if k not in self.active or len(self.active) == 1:
            return
        self._live.assign([i != k and bool(live) for i, live in
                           enumerate(self._live.numpy())])
        for variable, axis, _ in self._pairs[k]:
            value = variable.numpy()
            if axis == 0:
                value[k] = 0
            else:
                width = value.shape[-1] // self.trials
                value[..., k * width:(k + 1) * width] = 0
            variable.assign(value)
        super().freeze(k)

    @property
    def step(self):
        return int(self._step.numpy())

    def assemble(self):
        """The fused weights from the members' networks (their initial or restored
        weights), and the step from their optimizers."""
        for slot, (variable, axis, _) in enumerate(self._pairs[0]):
            parts = [pairs[slot][2].value for pairs in self._pairs]
            variable.assign(tf.stack(parts) if axis == 0 else tf.concat(parts, axis=-1))
        self._step.assign(self.members[self.active[0]].optimizer.iterations)

    def publish(self, indices):
        """Members `indices` get their slices of the fused weights and the step, so their
        records (checkpoints, history, evaluation) are those of single-trial runs."""
        for k in indices:
            for variable, axis, twin in self._pairs[k]:
                twin.assign(trial_slice(variable.value, axis, k, self.trials))
            self.members[k].optimizer.iterations.assign(self._step)
