"""Summed-gradient SGD (Masters & Luschi 2018, eq. 5) as a Keras model's `train_step`.

One step on a global batch B of m examples, base learning rate eta_tilde(k), L2 coefficient
lambda on the decayed variables w:

    theta <- theta - eta_tilde(k) * ( sum_{i in B} grad L_i(theta)  +  m * lambda * w )

which is plain SGD with eta = m * eta_tilde on  mean_i L_i + (lambda/2)|w|^2 . No momentum.

How the sum stays exact under a tf.distribute strategy with R replicas: each replica
differentiates the SUM (not the mean) of its m/R per-example losses and adds
(m/R) * lambda * w to the gradient of each decayed variable; Keras's TF optimizer then
all-reduces the replicas' gradients with ReduceOp.SUM, giving exactly the global expression
above. Nothing is divided by R anywhere.
"""
import functools

import keras
import tensorflow as tf
from keras import ops

from sbt_keras import gradient_noise
from sbt_keras.config import largest_divisor

# The logs of a step that measured the gradient noise: mean-gradient squared norms at the
# two batch sizes, and the batch sizes (sbt_keras/gradient_noise.py's conventions).
NOISE_LOGS = ("gns_small_sq", "gns_big_sq", "gns_b_small", "gns_b_big")


@keras.saving.register_keras_serializable(package="sbt_keras")
class SummedGradientModel(keras.Model):
    """Wraps a network (any Keras model producing logits) with the paper's update rule.

    Args:
      network: the Keras model; `training=True` in the train step so sub-batch BN uses
        batch statistics.
      weight_decay: lambda.
      decayed_variables: the variables w that receive weight decay, the network's own.
      unrolled_steps: steps traced one after another inside each iteration of the loop
        that runs a block of `steps_per_execution` steps (a divisor of it is used).
      gns_every_steps: K > 0 measures the gradient noise (sbt_keras/gradient_noise.py) on
        the last step of every block that ends at a multiple of K steps (K must be a
        multiple of steps_per_execution), returning the squared norms in that block's
        logs; 0 never. The measurement never changes the update (see `train_step`).
      gns_bn_batch_size: with one replica the batch is split in halves, which must keep
        every BN group whole: the per-replica BN batch (None: no batch statistics).

    `model.save()` / `keras.saving.load_model` round-trip it: the network, the settings,
    the decayed variables, the optimizer and its step.
    """

    def __init__(self, network, weight_decay=0.0, decayed_variables=(), unrolled_steps=1,
                 gns_every_steps=0, gns_bn_batch_size=None, **kwargs):
        super().__init__(**kwargs)
        self.gns_every_steps = int(gns_every_steps)
        self.gns_bn_batch_size = gns_bn_batch_size
        self.network = network
        self.unrolled_steps = int(unrolled_steps)
        self.weight_decay = float(weight_decay)
        self._decayed_ids = {id(v) for v in decayed_variables}
        self._decayed_paths = tuple(v.path for v in decayed_variables)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._fit_starting = False

    def get_config(self):
        # The decayed variables are named by path, not by a scope such as "kernels": the
        # constructor takes any set of variables, and a reloaded functional network keeps
        # its layer names, so the same paths name the same variables in it.
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "weight_decay": self.weight_decay,
            "decayed_variable_paths": list(self._decayed_paths),
            "unrolled_steps": self.unrolled_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"),
                                                        custom_objects=custom_objects)
        paths = config.pop("decayed_variable_paths")
        by_path = {v.path: v for v in network.variables}
        missing = [p for p in paths if p not in by_path]
        if missing:
            raise ValueError(f"decayed variables {missing} are not in the loaded network")
        return cls(network, decayed_variables=[by_path[p] for p in paths], **config)

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    @property
    def metrics(self):
        # Listed here so Keras resets them at the start of every epoch and evaluation.
        return [self.loss_tracker, self.accuracy_tracker]

    def _per_example_loss(self, labels, logits):
        # Cross-entropy in float32 whatever the compute dtype.
        return keras.losses.sparse_categorical_crossentropy(
            labels, ops.cast(logits, "float32"), from_logits=True)

    def train_step(self, data, measure_noise=False):
        images, labels = data
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        if measure_noise and replicas == 1:
            noise = self._split_batch_noise(images, labels)  # an extra pass, undone
        with tf.GradientTape() as tape:
            logits = self.network(images, training=True)
            per_example = self._per_example_loss(labels, logits)
            loss_sum = ops.sum(per_example)  # Sigma_i L_i over this replica's examples
        variables = self.trainable_variables
        grads = tape.gradient(loss_sum, variables)
        if measure_noise and replicas > 1:  # each replica's gradient is a small batch
            noise = gradient_noise.replica_squared_norms(grads, ops.shape(images)[0])
        if self.weight_decay:
            # This replica's share of m * lambda * w: (m / R) * lambda * w.
            local_batch = ops.cast(ops.shape(images)[0], "float32")
            grads = [g + (local_batch * self.weight_decay) * ops.cast(v.value, g.dtype)
                     if id(v) in self._decayed_ids else g
                     for g, v in zip(grads, variables)]
        # Keras's TF optimizer sums gradients across replicas (ReduceOp.SUM) before applying.
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(per_example)
        self.accuracy_tracker.update_state(labels, logits)
        logs = {m.name: m.result() for m in self.metrics}
        if measure_noise:
            logs.update(zip(NOISE_LOGS, noise))
        return logs

    def _split_batch_noise(self, images, labels):
        """(|G_small|^2, |G_big|^2, B_small, B_big) from the two halves of the batch, by a
        forward and backward pass of its own before the step. That pass updates the
        network's non-trainable state (BN moving statistics, renorm's step counter) like
        any training pass, so it is put back afterwards: the step then runs exactly as
        without the measurement."""
        state = self.network.non_trainable_variables
        saved = [tf.identity(v) for v in state]
        first, second, _ = gradient_noise.split_batch_sum_gradients(
            self.network, images, labels, self.trainable_variables,
            bn_batch_size=self.gns_bn_batch_size, loss_fn=self._per_example_loss)
        with tf.control_dependencies([g for g in first + second if g is not None]):
            for variable, value in zip(state, saved):
                variable.assign(value)
        return gradient_noise.squared_norms_from_parts([first, second],
                                                       images.shape[0] // 2)

    def fit(self, *args, **kwargs):
        """Keras `fit`, refusing epochs that are not whole blocks of `steps_per_execution`.

        The train function always runs a whole block (see make_train_function): an epoch
        of 5 steps in blocks of 2 would silently train 6. Input of unknown length given
        without `steps_per_epoch` cannot be checked.
        """
        # Keras makes the epoch's iterator inside fit and hands it first to
        # _maybe_symbolic_build: the one place that sees the epoch's step count.
        self._fit_starting = True
        try:
            return super().fit(*args, **kwargs)
        finally:
            self._fit_starting = False

    def _check_whole_blocks(self, steps):
        block = self.steps_per_execution
        if steps is not None and steps % block:
            raise ValueError(
                f"steps_per_execution={block} does not divide the {steps} steps per epoch "
                f"given to fit: every call of the train function runs {block} steps, so "
                f"the epoch would train {steps + -steps % block}; give fit a multiple of "
                f"{block} steps or compile with a divisor of {steps}")

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds what `fit` needs from the variables alone.

        Under a strategy Keras 3 pulls one input batch and MEAN-reduces it eagerly to
        build the model symbolically; under MultiWorkerMirroredStrategy that reduce fails
        on per-replica inputs. The network is built when it is created and the trackers
        hold their own variables, so only the optimizer's state is left to create.
        """
        del data_batch
        if self._fit_starting:
            self._fit_starting = False
            self._check_whole_blocks(iterator.num_batches)
        self.built = True
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def _replicated(self, step):
        """`step` run on every replica as one graph; its logs averaged over replicas.

        Keras 3's own version reduces scalar logs along axis 0 under
        MultiWorkerMirroredStrategy and fails; ours reduces along no axis.
        """
        strategy = self.distribute_strategy

        @tf.function(reduce_retracing=True, jit_compile=self.jit_compile)
        def one_step(data):
            outputs = strategy.run(step, args=(data,))
            # Training: running means over equal-sized shards, so their mean is the global
            # one. Evaluation batches may hold padding (weight 0), which makes this per-batch
            # mean inexact; nothing reads it: the epoch's logs come from the metric
            # variables, summed over replicas, which count every real example once.
            return tf.nest.map_structure(
                lambda v: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None),
                outputs)

        return one_step

    def make_train_function(self, force=False):
        """`steps_per_execution` steps per graph call, as one plain loop.

        Keras 3 wraps every step of its multi-step loop in a `tf.cond`, and the
        cross-replica merge inside the optimizer fails there under MirroredStrategy and
        MultiWorkerMirroredStrategy ("You must feed a value for placeholder tensor",
        keras-team/keras#19246). Our epochs are whole blocks of steps (Config and `fit`
        check it), so the loop needs no end-of-data branch: it runs exactly
        `steps_per_execution`.

        Each loop iteration runs `unroll` steps traced one after another: the same updates
        in the same order (automatic control dependencies keep every variable read after
        the previous step's update), with fewer loop iterations, and room for TF's executor
        to overlap independent ops of neighbouring steps. On 2 CPU cores it made no
        measurable difference (docs/bench_cpu.md), so the default is 1.
        """
        if self.train_function is not None and not force:
            return self.train_function
        one_step = self._replicated(self.train_step)
        block = self.steps_per_execution
        unroll = largest_divisor(block, self.unrolled_steps)

        @tf.function(reduce_retracing=True)
        def multi_step(iterator):
            for _ in range(unroll):  # Python loop: traced `unroll` times
                outputs = one_step(next(iterator))
            for _ in tf.range(block // unroll - 1):
                for _ in range(unroll):
                    outputs = one_step(next(iterator))
            return outputs

        if not self.gns_every_steps:
            self.train_function = multi_step
            return multi_step
        noise_step = self._replicated(functools.partial(self.train_step, measure_noise=True))

        @tf.function(reduce_retracing=True)
        def multi_step_measuring(iterator):
            # The block's last step measures, so its logs (the block's) carry the norms.
            for _ in tf.range(block - 1):
                one_step(next(iterator))
            return noise_step(next(iterator))

        def train_function(iterator):
            # Blocks start at multiples of `block`, which divides gns_every_steps.
            ends = int(self.optimizer.iterations.numpy()) + block
            measure = ends % self.gns_every_steps == 0
            return (multi_step_measuring if measure else multi_step)(iterator)

        self.train_function = train_function
        return train_function

    def make_test_function(self, force=False):
        """Up to `steps_per_execution` evaluation batches per call, one graph call each.

        Keras hands over the iterator once per block of steps; the test set need not be
        whole blocks, so the last call stops where the data does.
        """
        if self.test_function is not None and not force:
            return self.test_function
        one_step = self._replicated(self.test_step)

        def blocks(iterator):
            outputs = None
            for _ in range(self.steps_per_execution):
                try:
                    batch = next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):
                    break
                outputs = one_step(batch)
            if outputs is None:
                raise StopIteration
            return outputs

        self.test_function = blocks
        return blocks

    def test_step(self, data):
        # Evaluation batches carry weights: 0 marks padding that keeps batches full-sized.
        images, labels, weights = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.network(images, training=False)
        self.loss_tracker.update_state(self._per_example_loss(labels, logits),
                                       sample_weight=weights)
        self.accuracy_tracker.update_state(labels, logits, sample_weight=weights)
        return {m.name: m.result() for m in self.metrics}


def build_optimizer(schedule):
    """Plain SGD on the summed gradient: the learning rate is the base rate eta_tilde(k)."""
    return keras.optimizers.SGD(learning_rate=schedule, momentum=0.0, nesterov=False)
