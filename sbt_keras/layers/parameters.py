"""The variables every normalization layer here creates the same way: the per-channel scale
and offset, and the moving statistics used at inference.

autocast=False keeps them float32 under mixed precision, like Keras' own BatchNormalization.
"""


def channel_count(layer, input_shape):
    """The last (channel) dimension, which every norm layer needs to know when it is built."""
    channels = input_shape[-1]
    if channels is None:
        raise ValueError(f"{layer.name}: needs a known last (channel) dimension")
    return channels


def add_scale_and_offset(layer, channels):
    """Sets `layer.gamma` (ones) and `layer.beta` (zeros), or None where scale/center is off."""
    layer.gamma = (layer.add_weight(shape=(channels,), name="gamma", initializer="ones",
                                    autocast=False) if layer.scale else None)
    layer.beta = (layer.add_weight(shape=(channels,), name="beta", initializer="zeros",
                                   autocast=False) if layer.center else None)


def add_moving_statistics(layer, channels):
    """Sets `layer.moving_mean` (zeros) and `layer.moving_variance` (ones).

    aggregation="mean" (tf.VariableAggregation.MEAN): an assign made in a replica context is
    averaged across replicas before it is applied.
    """
    for name, initial in (("moving_mean", "zeros"), ("moving_variance", "ones")):
        setattr(layer, name, layer.add_weight(
            shape=(channels,), name=name, initializer=initial, trainable=False,
            autocast=False, aggregation="mean"))
