"""Splitting a replica batch into consecutive groups of `bn_batch_size` examples, and the
moving statistics kept from the groups' moments.

Shared by every layer that takes batch statistics per sub-batch (subbatch_norm.py,
batch_renorm.py, mixed_norm.py): same grouping, same error for a batch the group size does
not divide, same unbiased-variance correction, same momentum update.
"""
import contextlib

import tensorflow as tf
from keras import ops

_keeping = False


@contextlib.contextmanager
def moving_statistics_kept():
    """Training passes traced inside leave the moving statistics as they are: a pass that
    repeats one already made (training/grouped.py's NaN-isolating recomputation) must not
    update them twice, and under a multi-replica strategy cannot assign them inside the
    branch of a `tf.cond` (their cross-replica MEAN would be a merge point there)."""
    global _keeping
    before, _keeping = _keeping, True
    try:
        yield
    finally:
        _keeping = before


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


def pooled_moments(mean, variance, grouped, moving_variance):
    """([C], [C]): the groups' means and (corrected, see variance_correction) variances
    averaged over the groups; `mean`, `variance` are the moments of `grouped`, [G, 1.., C]."""
    channels = grouped.shape[-1]
    return (tf.reshape(tf.reduce_mean(mean, 0), (channels,)),
            tf.reshape(tf.reduce_mean(variance, 0), (channels,))
            * variance_correction(grouped, moving_variance))


def update_moving_statistics(layer, mean, variance):
    """One momentum step of `layer.moving_mean` / `moving_variance` towards the per-channel
    `mean` and `variance`: m * old + (1 - m) * new, m = `layer.momentum`. Nothing inside
    `moving_statistics_kept()`."""
    if _keeping:
        return
    m = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * m + mean * (1.0 - m))
    layer.moving_variance.assign(layer.moving_variance * m + variance * (1.0 - m))
