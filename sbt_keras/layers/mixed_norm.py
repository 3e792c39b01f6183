"""A learned mixture of batch, instance and layer normalization statistics.

The article's hybrid: a learned weight alpha takes a fraction of the statistics from the
batch and the rest from the example itself, mu = alpha mu_batch + (1 - alpha) mu_example,
sigma^2 = alpha sigma^2_batch + (1 - alpha) sigma^2_example. Generalized to K = 2 or 3 of
the components ("batch", "instance", "layer"), each with its own mean and biased variance:

    mu = sum_k alpha_k mu_k      sigma^2 = sum_k alpha_k sigma^2_k
    y = gamma * (x - mu) / sqrt(sigma^2 + epsilon) + beta

The weights come from an unconstrained trainable variable `mix_logits` (float32):
K = 2: alpha = (sigmoid(z), 1 - sigmoid(z)), z scalar, or [C] per channel;
K = 3: alpha = softmax(z) over the components, z of shape [3], or [3, C] per channel --
Switchable Normalization (Luo et al. 2018) with one set of weights shared by the mean
and the variance. Zero initial logits: an equal mix. Components are kept in the order
of sbt_keras.norms.MIX_COMPONENTS (batch, instance, layer) whatever order they are given,
so alpha_0 is alpha_batch whenever "batch" is a component.

The batch component takes statistics per group of `bn_batch_size` consecutive examples, as
SubBatchNormalization, and keeps moving statistics updated the same way (one update per
training call: the mean over groups; the variance unbiased by count/(count - 1) unless
`moving_variance="biased"`). At inference it uses those moving statistics while the
per-example components still use the example's own statistics.
"""
import keras
import tensorflow as tf
from keras import ops

from sbt_keras.layers.parameters import add_moving_statistics, add_scale_and_offset, channel_count
from sbt_keras.layers.example_norm import instance_needs_spatial_error
from sbt_keras.layers.sub_batches import (
    batch_axes, merge_groups, pooled_moments, split_into_groups, update_moving_statistics)
from sbt_keras.norms import DEFAULT_OPTIONS, check_options, mix_components


@keras.saving.register_keras_serializable(package="sbt_keras")
class MixedNormalization(keras.layers.Layer):
    """Channels-last normalization with learned mixing weights over statistics sources.

    `mixing_weights()` returns the current alpha, [K] or [K, C] (per_channel), in the
    order of `components`. Statistics in float32, output in the compute dtype; gamma, beta,
    mix_logits and moving statistics float32 (autocast=False).
    """

    def __init__(
        self, mix_norms=DEFAULT_OPTIONS["mix_norms"], per_channel=False, bn_batch_size=None,
        momentum=0.99, epsilon=1e-3, moving_variance="unbiased", center=True, scale=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_options("mix", mix_norms=mix_norms, bn_batch_size=bn_batch_size,
                      momentum=momentum, epsilon=epsilon, moving_variance=moving_variance)
        self.components = mix_components(mix_norms)
        self.per_channel = bool(per_channel)
        self.bn_batch_size = bn_batch_size
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.moving_variance_mode = moving_variance
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = channel_count(self, input_shape)
        if "instance" in self.components and len(input_shape) < 3:
            raise instance_needs_spatial_error(
                self.name, input_shape, "mix with an 'instance' component")
        k = len(self.components)
        shape = () if k == 2 else (k,)
        if self.per_channel:
            shape = shape + (channels,)
        self.mix_logits = self.add_weight(shape=shape, name="mix_logits", initializer="zeros",
                                          autocast=False)
        add_scale_and_offset(self, channels)
        if "batch" in self.components:
            add_moving_statistics(self, channels)

    def mixing_weights(self):
        """alpha as a float32 tensor [K] (or [K, C]), ordered like `components`."""
        z = ops.cast(self.mix_logits, "float32")
        if len(self.components) == 2:
            a = tf.sigmoid(z)
            return tf.stack([a, 1.0 - a])
        return tf.nn.softmax(z, axis=0)

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        training = bool(training) and self.trainable  # frozen like Keras BN: moving stats
        # Inference needs no grouping: the batch component's statistics are the moving ones.
        grouped = split_into_groups(x, self.bn_batch_size if training else None, self.name)
        rank = len(grouped.shape)
        alpha = self.mixing_weights()
        mean = variance = 0.0
        for k, component in enumerate(self.components):
            if component == "batch":
                mu, var = self._batch_moments(grouped, training)
            elif component == "instance":
                mu, var = tf.nn.moments(grouped, list(range(2, rank - 1)), keepdims=True)
            else:  # layer
                mu, var = tf.nn.moments(grouped, list(range(2, rank)), keepdims=True)
            mean = mean + alpha[k] * mu
            variance = variance + alpha[k] * var
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            inv = inv * ops.cast(self.gamma, "float32")
        y = (grouped - mean) * inv
        if self.beta is not None:
            y = y + ops.cast(self.beta, "float32")
        return ops.cast(merge_groups(y, x), self.compute_dtype)

    def _batch_moments(self, grouped, training):
        moving_mean = ops.cast(self.moving_mean, "float32")
        moving_variance = ops.cast(self.moving_variance, "float32")
        if not training:
            return moving_mean, moving_variance
        mean, variance = tf.nn.moments(grouped, batch_axes(grouped), keepdims=True)
        update_moving_statistics(
            self, *pooled_moments(mean, variance, grouped, self.moving_variance_mode))
        return mean, variance

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            mix_norms=self.components, per_channel=self.per_channel,
            bn_batch_size=self.bn_batch_size, momentum=self.momentum, epsilon=self.epsilon,
            moving_variance=self.moving_variance_mode, center=self.center, scale=self.scale)
        return config
