"""Batch renormalization (Ioffe 2017) over sub-batches of `bn_batch_size` examples.

Training, for each group B of `bn_batch_size` consecutive examples of the replica batch
(the whole replica batch when None), with mu_B and the biased var_B over the group's
examples and pixels, and the moving statistics mu, var as they are before this step:

    sigma_B = sqrt(var_B + epsilon)          sigma = sqrt(var + epsilon)
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

then one moving-statistics update per call, as SubBatchNormalization: mu <- m mu + (1 - m)
mean_B(mu_B) and var <- m var + (1 - m) mean_B(var_B) * c, c = count / (count - 1) for
`moving_variance="unbiased"` (count = examples per group x pixels), 1 for "biased".
Inference: gamma * (x - mu) / sigma + beta.

r_max and d_max follow Ioffe's schedule, a function of the number of earlier training
calls `t` (the layer's own int64 `renorm_step` variable; see `renorm_limits` below):
r_max = 1 and d_max = 0 while t <= start_step (plain BN), then linear to `r_max` at
`r_end_step` and to `d_max` at `d_end_step`.

Why not keras.layers.BatchNormalization(renorm=True)? Keras 3.15 has it, and its
correction is the same algebra, which this layer reuses: r and d enter through
stop-gradients as an effective scale gamma * r and offset gamma * d + beta. But it does not
fit the study: (1) no sub-batches (Keras 3 dropped `virtual_batch_size`), so every
replica batch would be one group; (2) `renorm_clipping` is a fixed dict, with no step
counter and no ramp of r_max / d_max; (3) r and d are measured against a separate pair
of moving averages (`renorm_mean`, `renorm_stddev`, with their own `renorm_momentum`),
not the inference statistics as in Ioffe's Algorithm 1, and the inference variance is
derived from an average of standard deviations (biased), which would not match
SubBatchNormalization's moving statistics. Subclassing it would have overridden nearly
every method, so this is a separate layer of the same shape as SubBatchNormalization.
"""
import keras
import tensorflow as tf
from keras import ops

from sbt_keras.layers.parameters import add_moving_statistics, add_scale_and_offset, channel_count
from sbt_keras.layers.sub_batches import (
    batch_axes, merge_groups, pooled_moments, split_into_groups, update_moving_statistics)
from sbt_keras.norms import DEFAULT_OPTIONS, check_options


@keras.saving.register_keras_serializable(package="sbt_keras")
class BatchRenormalization(keras.layers.Layer):
    """Channels-last batch renormalization per sub-batch, with Ioffe's r_max/d_max ramp.

    Statistics in float32; output in the layer's compute dtype; gamma, beta and the moving
    statistics float32 (autocast=False), the moving statistics averaged across replicas
    (aggregation="mean"). `renorm_step` is an int64 non-trainable weight, saved with the
    model, incremented once per training call; aggregation="only_first_replica" keeps the
    replicas' copies equal. Call the layer once per training step for the schedule to count
    steps.
    """

    def __init__(
        self, bn_batch_size=None, momentum=0.99, epsilon=1e-3, moving_variance="unbiased",
        r_max=DEFAULT_OPTIONS["renorm_r_max"], d_max=DEFAULT_OPTIONS["renorm_d_max"],
        start_step=DEFAULT_OPTIONS["renorm_start_step"],
        r_end_step=DEFAULT_OPTIONS["renorm_r_end_step"],
        d_end_step=DEFAULT_OPTIONS["renorm_d_end_step"],
        center=True, scale=True, **kwargs,
    ):
        super().__init__(**kwargs)
        check_options(
            "batch_renorm", bn_batch_size=bn_batch_size, momentum=momentum, epsilon=epsilon,
            moving_variance=moving_variance, renorm_r_max=r_max, renorm_d_max=d_max,
            renorm_start_step=start_step, renorm_r_end_step=r_end_step,
            renorm_d_end_step=d_end_step)
        self.bn_batch_size = bn_batch_size
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.moving_variance_mode = moving_variance
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.start_step = int(start_step)
        self.r_end_step = int(r_end_step)
        self.d_end_step = int(d_end_step)
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = channel_count(self, input_shape)
        add_scale_and_offset(self, channels)
        add_moving_statistics(self, channels)
        self.renorm_step = self.add_weight(
            shape=(), name="renorm_step", initializer="zeros", dtype="int64",
            trainable=False, autocast=False, aggregation="only_first_replica")

    def renorm_limits(self, step=None):
        """(r_max, d_max) as float32 tensors at `step` (default: the layer's counter)."""
        t = tf.cast(self.renorm_step if step is None else step, tf.float32)

        def ramp(start_value, end_value, end_step):
            span = float(max(end_step - self.start_step, 1))
            fraction = tf.clip_by_value((t - float(self.start_step)) / span, 0.0, 1.0)
            return start_value + (end_value - start_value) * fraction

        return ramp(1.0, self.r_max, self.r_end_step), ramp(0.0, self.d_max, self.d_end_step)

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        mean = ops.cast(self.moving_mean, "float32")
        variance = ops.cast(self.moving_variance, "float32")
        if training and self.trainable:  # frozen like Keras BN: moving statistics only
            y = self._renormalize(x, mean, variance)
        else:
            y = self._affine(x, mean, tf.math.rsqrt(variance + self.epsilon), 1.0, 0.0)
        return ops.cast(y, self.compute_dtype)

    def _renormalize(self, x, moving_mean, moving_variance):
        grouped = split_into_groups(x, self.bn_batch_size, self.name)
        mean, variance = tf.nn.moments(grouped, batch_axes(grouped), keepdims=True)
        inv_batch = tf.math.rsqrt(variance + self.epsilon)       # 1 / sigma_B
        inv_moving = tf.math.rsqrt(moving_variance + self.epsilon)  # 1 / sigma
        r_max, d_max = self.renorm_limits()
        r = tf.stop_gradient(
            tf.clip_by_value(tf.sqrt(variance + self.epsilon) * inv_moving, 1.0 / r_max, r_max))
        d = tf.stop_gradient(
            tf.clip_by_value((mean - moving_mean) * inv_moving, -d_max, d_max))
        y = self._affine(grouped, mean, inv_batch, r, d)
        update_moving_statistics(
            self, *pooled_moments(mean, variance, grouped, self.moving_variance_mode))
        self.renorm_step.assign_add(1)
        return merge_groups(y, x)

    def _affine(self, x, mean, inv, r, d):
        """gamma * ((x - mean) * inv * r + d) + beta as (x - mean) * scale + offset."""
        scale, offset = inv * r, d
        if self.gamma is not None:
            gamma = ops.cast(self.gamma, "float32")
            scale, offset = scale * gamma, offset * gamma
        if self.beta is not None:
            offset = offset + ops.cast(self.beta, "float32")
        return (x - mean) * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            bn_batch_size=self.bn_batch_size, momentum=self.momentum, epsilon=self.epsilon,
            moving_variance=self.moving_variance_mode, r_max=self.r_max, d_max=self.d_max,
            start_step=self.start_step, r_end_step=self.r_end_step,
            d_end_step=self.d_end_step, center=self.center, scale=self.scale)
        return config
