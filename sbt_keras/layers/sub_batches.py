"""Splitting a replica batch into consecutive groups of `bn_batch_size` examples.

Shared by the layers that take batch statistics per sub-batch besides
SubBatchNormalization (batch_renorm.py, mixed_norm.py): same grouping, same error for a
batch the group size does not divide, same unbiased-variance correction.
"""
import tensorflow as tf
from keras import ops


def split_into_groups(x, bn_batch_size, layer_name):
    """[N, ...] -> [N // bn_batch_size, bn_batch_size, ...]; [1, N, ...] for None."""
    if bn_batch_size is None:
        return ops.expand_dims(x, 0)
    batch = x.shape[0]
    if batch is not None and batch % bn_batch_size:
        raise ValueError(f"{layer_name}: batch of {batch} examples per replica is not "
                         f"divisible by bn_batch_size={bn_batch_size}")
    if batch is None:
        check = tf.debugging.assert_equal(
            tf.math.floormod(tf.shape(x)[0], bn_batch_size), 0,
            message=f"{layer_name}: batch per replica is not divisible by "
                    f"bn_batch_size={bn_batch_size}")
        # In a graph the check must run before the reshape, which would fail first with
        # a less helpful message.
        with tf.control_dependencies([check] if check is not None else []):
            x = tf.identity(x)
    return tf.reshape(x, tf.concat([[-1, bn_batch_size], tf.shape(x)[1:]], 0))


def merge_groups(grouped, like):
    """Inverse of split_into_groups: back to the shape of `like`."""
    return tf.reshape(grouped, tf.shape(like))


def batch_axes(grouped):
    """Axes of a grouped tensor [G, g, ..., C] that batch statistics reduce over."""
    return list(range(1, len(grouped.shape) - 1))


def variance_correction(grouped, moving_variance):
    """Factor turning a group's biased variance into what the moving variance tracks.

    "unbiased": count / (count - 1), count = examples per group x pixels; a group of a
    single value has no unbiased estimate (its variance is 0) and gets factor 1.
    "biased": 1.
    """
    if moving_variance == "biased":
        return tf.constant(1.0, tf.float32)
    count = tf.cast(tf.reduce_prod(tf.shape(grouped)[1:-1]), tf.float32)
    return tf.where(count > 1.0, count / tf.maximum(count - 1.0, 1.0), 1.0)
