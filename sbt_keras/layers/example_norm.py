"""Normalization with statistics of each example alone: layer, instance and group norm.

All three reshape the channels of a channels-last activation [N, ..., C] into
[N, ..., G, C/G] and normalize every (example, channel group) over the spatial axes and
the channels of its group:

  layer    G = 1    every example over all of (H, W, C) (Ba et al. 2016 for conv nets;
                    for dense [N, C] over C)
  instance G = C    every example and channel over (H, W) (Ulyanov et al. 2016); needs
                    spatial inputs, since a dense activation has one value per channel
  group    G given  Wu & He (2018); G must divide C

so one layer class covers them. No moving statistics: training and inference compute the
same thing. Keras's own GroupNormalization would do for "layer" and "group", but silently
returns beta for instance norm on dense inputs, and this class also gives "mix" its
per-example statistics from the same code (`example_moments`).
"""
import keras
import tensorflow as tf
from keras import ops

from sbt_keras.layers.parameters import add_scale_and_offset, channel_count
from sbt_keras.norms import check_groups

MODES = ("layer", "instance", "group")


def instance_needs_spatial_error(layer_name, shape, what="instance normalization"):
    return ValueError(
        f"{layer_name}: {what} needs spatial inputs [N, H, W, C]; got shape "
        f"{tuple(shape)}, where each example and channel is a single value. Leave the dense "
        f"layers unnormalized (--nonorm_dense) or choose another --norm (or mix_norms "
        f"without 'instance') for them.")


def example_moments(x, groups):
    """Per-example mean and biased variance of x [N, ..., C] over channel groups.

    Returns two tensors broadcastable against x: [N, 1, ..., 1, C] when groups == C,
    [N, 1, ..., 1, 1] when groups == 1, and per-group values repeated over each group's
    channels otherwise. Float32 in, float32 out.
    """
    rank = len(x.shape)
    channels = x.shape[-1]
    spatial = list(range(1, rank - 1))
    if groups == channels:
        return tf.nn.moments(x, spatial, keepdims=True)
    if groups == 1:
        return tf.nn.moments(x, list(range(1, rank)), keepdims=True)
    split = tf.concat([tf.shape(x)[:-1], [groups, channels // groups]], 0)
    mean, variance = tf.nn.moments(tf.reshape(x, split), spatial + [rank], keepdims=True)
    # [N, 1.., G, 1] -> [N, 1.., G, C/G] -> [N, 1.., C]
    back = tf.concat([tf.shape(mean)[:-2], [channels]], 0)
    tile = [1] * rank + [channels // groups]
    return (tf.reshape(tf.tile(mean, tile), back), tf.reshape(tf.tile(variance, tile), back))


@keras.saving.register_keras_serializable(package="sbt_keras")
class ExampleNormalization(keras.layers.Layer):
    """Channels-last layer ("layer"), instance ("instance") or group ("group") norm.

    y = gamma * (x - mu) / sqrt(var + epsilon) + beta, with mu and the biased var taken per
    example over the axes the mode names (module docstring). Statistics in float32, the
    output in the layer's compute dtype; gamma and beta are float32 (autocast=False).
    """

    def __init__(self, mode="layer", groups=None, epsilon=1e-3, center=True, scale=True,
                 **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if mode == "group" and (isinstance(groups, bool) or not isinstance(groups, int)
                                or groups < 1):
            raise ValueError(f"group normalization needs a positive integer groups, "
                             f"got {groups!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon} must be > 0")
        self.mode = mode
        self.groups = groups if mode == "group" else None
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = channel_count(self, input_shape)
        if self.mode == "instance" and len(input_shape) < 3:
            raise instance_needs_spatial_error(self.name, input_shape)
        if self.mode == "group":
            check_groups(channels, self.groups, self.name)
            if self.groups == channels and len(input_shape) < 3:
                # One channel per group: instance norm, as degenerate on dense inputs.
                raise instance_needs_spatial_error(
                    self.name, input_shape,
                    f"group normalization with one channel per group (gn_groups={channels})")
        self._num_groups = {"layer": 1, "instance": channels, "group": self.groups}[self.mode]
        add_scale_and_offset(self, channels)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        mean, variance = example_moments(x, self._num_groups)
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            inv = inv * ops.cast(self.gamma, "float32")
        y = (x - mean) * inv
        if self.beta is not None:
            y = y + ops.cast(self.beta, "float32")
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, groups=self.groups, epsilon=self.epsilon,
                      center=self.center, scale=self.scale)
        return config
