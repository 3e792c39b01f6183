"""Batch normalization whose statistics come from small groups of examples.

Masters & Luschi (2018) separate the SGD batch size from the batch normalization batch
size: a batch of `m` examples is split into consecutive groups of `bn_batch_size`
examples and each group is normalized with its own statistics (their Fig. 7-9).
"""
import keras
import tensorflow as tf
from keras import ops

from sbt_keras.layers.parameters import add_moving_statistics, add_scale_and_offset, channel_count
from sbt_keras.layers.sub_batches import (
    batch_axes, pooled_moments, split_into_groups, update_moving_statistics)
from sbt_keras.norms import MOVING_VARIANCE_CHOICES


@keras.saving.register_keras_serializable(package="sbt_keras")
class SubBatchNormalization(keras.layers.Layer):
    """Channels-last batch normalization over groups of `bn_batch_size` examples.

    Training: the batch seen by this replica is reshaped to
    [G, bn_batch_size, ...] and every group is normalized with its own mean and biased
    variance, y = gamma * (x - mu_g) / sqrt(var_g + epsilon) + beta. `bn_batch_size=None`
    makes the whole replica batch one group (ordinary batch normalization).

    Moving statistics get one update per call from the mean over groups of mu_g and of
    each group's population-variance estimate (the convention of TF2 Keras
    `BatchNormalization(virtual_batch_size=)`, one update per step, not one per group).
    With `moving_variance="unbiased"` (the default) that estimate is
    var_g * n / (n - 1), n the values per channel in the group (examples x H x W; the
    global batch's count for synchronized BN), Ioffe & Szegedy's (2015) m/(m-1) E[var_B];
    a group of one value (n = 1, e.g. a dense group of one example) has no unbiased
    estimate and contributes 0, as its biased variance would. `"biased"` uses var_g
    itself, like Keras `BatchNormalization`. They are created with `aggregation="mean"`,
    so under `tf.distribute` every replica's update is averaged into one value instead
    of leaving the replica copies to drift.

    `synchronized=True` (the paper's contrast to per-worker BN, `--bn_sync`) takes the
    training statistics over the whole global batch, every replica's examples together
    (all-reduced, two passes: the mean, then the squared deviations from it); it needs
    `bn_batch_size=None`.

    Inference, and training with `trainable=False` (a frozen layer, as in Keras
    `BatchNormalization`), use the moving statistics and leave them unchanged. Statistics
    are always computed in float32; the output has the layer's compute dtype (the dtype
    the inputs are cast to by Keras).
    """

    def __init__(
        self, bn_batch_size=None, momentum=0.99, epsilon=1e-3, center=True, scale=True,
        synchronized=False, moving_variance="unbiased", **kwargs,
    ):
        super().__init__(**kwargs)
        if moving_variance not in MOVING_VARIANCE_CHOICES:
            raise ValueError(f"moving_variance must be one of "
                             f"{', '.join(MOVING_VARIANCE_CHOICES)}; "
                             f"got {moving_variance!r}")
        if bn_batch_size is not None and (
            isinstance(bn_batch_size, bool)
            or not isinstance(bn_batch_size, int)
            or bn_batch_size < 1
        ):
            raise ValueError(
                f"bn_batch_size must be a positive integer or None, got {bn_batch_size!r}"
            )
        if synchronized and bn_batch_size is not None:
            raise ValueError("synchronized BN normalizes over the whole global batch; "
                             "bn_batch_size must be None")
        self.bn_batch_size = bn_batch_size
        self.synchronized = bool(synchronized)
        # Not `moving_variance`: that name holds the variable.
        self.moving_variance_mode = moving_variance
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = channel_count(self, input_shape)
        add_scale_and_offset(self, channels)
        add_moving_statistics(self, channels)

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        if training and self.trainable:
            outputs = self._normalize_groups(x)
        else:
            outputs = self._affine(
                x, ops.cast(self.moving_mean, "float32"),
                ops.cast(self.moving_variance, "float32"),
            )
        return ops.cast(outputs, self.compute_dtype)

    def _normalize_groups(self, x):
        """Normalizes each group with its own statistics and updates the moving ones."""
        if self.synchronized:
            return self._normalize_synchronized(x)
        if len(x.shape) == 4 and x.shape[0] is not None:
            return self._normalize_groups_fused(x)
        grouped = split_into_groups(x, self.bn_batch_size, self.name)
        mean, variance = ops.moments(grouped, axes=batch_axes(grouped), keepdims=True)
        update_moving_statistics(
            self, *pooled_moments(mean, variance, grouped, self.moving_variance_mode))
        return ops.reshape(self._affine(grouped, mean, variance), ops.shape(x))

    def _normalize_groups_fused(self, x):
        """The same computation on TF's fused batch-norm kernel (oneDNN / cuDNN / XLA).

        Groups move into the channel axis, [G*g, H, W, C] -> [g, H, W, G*C], so the fused
        op's per-channel statistics are exactly the per-(group, channel) ones; gamma and
        beta are tiled G times. Much faster than the unfused ops on CPU, where the conv
        layers' own kernels otherwise wait on BN's element-wise passes.
        """
        n, h, w, c = x.shape
        g = self.bn_batch_size or n
        if n % g:
            raise ValueError(f"{self.name}: batch of {n} examples per replica is not "
                             f"divisible by bn_batch_size={g}")
        groups = n // g
        if groups > 1:
            x = tf.reshape(tf.transpose(tf.reshape(x, (groups, g, h, w, c)),
                                        (1, 2, 3, 0, 4)), (g, h, w, groups * c))
        ones, zeros = tf.ones((c,), tf.float32), tf.zeros((c,), tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.gamma is not None else ones
        beta = tf.cast(self.beta, tf.float32) if self.beta is not None else zeros
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.tile(gamma, [groups]), tf.tile(beta, [groups]), epsilon=self.epsilon,
            data_format="NHWC", is_training=True)
        # The fused op reports the unbiased (Bessel-corrected) variance, the "unbiased"
        # estimate as it is; a group of one value has none and contributes 0.
        count = g * h * w
        if count == 1:
            variance = tf.zeros_like(variance)
        elif self.moving_variance_mode == "biased":
            variance = variance * ((count - 1) / count)
        update_moving_statistics(
            self, tf.reduce_mean(tf.reshape(mean, (groups, c)), axis=0),
            tf.reduce_mean(tf.reshape(variance, (groups, c)), axis=0))
        if groups > 1:
            y = tf.reshape(tf.transpose(tf.reshape(y, (g, h, w, groups, c)), (3, 0, 1, 2, 4)),
                           (n, h, w, c))
        return y

    def _normalize_synchronized(self, x):
        """One group: the global batch, summed over replicas."""
        context = tf.distribute.get_replica_context()
        axes = list(range(len(x.shape) - 1))
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        total, count = context.all_reduce("sum", [tf.reduce_sum(x, axes), count])
        mean = total / count
        squares = context.all_reduce("sum", tf.reduce_sum(tf.square(x - mean), axes))
        variance = squares / count
        # divide_no_nan: a global batch of one value contributes 0.
        estimate = (tf.math.divide_no_nan(squares, count - 1.0)
                    if self.moving_variance_mode == "unbiased" else variance)
        update_moving_statistics(self, mean, estimate)
        return self._affine(x, mean, variance)

    def _affine(self, x, mean, variance):
        """gamma * (x - mean) / sqrt(variance + epsilon) + beta, broadcasting per channel."""
        inv = ops.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            inv = inv * ops.cast(self.gamma, "float32")
        y = (x - mean) * inv
        if self.beta is not None:
            y = y + ops.cast(self.beta, "float32")
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            bn_batch_size=self.bn_batch_size,
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            synchronized=self.synchronized,
            moving_variance=self.moving_variance_mode,
        )
        return config
