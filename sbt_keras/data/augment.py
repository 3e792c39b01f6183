"""The paper's CIFAR preprocessing: per-channel standardization, and random crops of
the 4-pixel zero-padded image with random horizontal flips.

Augmentation is batched and stateless: every example in a batch gets its own crop offset
and flip, all drawn from one seed, so a batch's augmentation is reproducible from that
seed alone (needed for exact resume).
"""

import numpy as np

PAD = 4


def channel_stats(images_uint8):
    """Per-channel mean and standard deviation over all pixels of ``images_uint8``.

    Args:
      images_uint8: ``[N, H, W, C]`` uint8 (0..255 scale).

    Returns:
      ``(mean, std)``, float32 ``[C]`` each, on the 0..255 scale. Accumulated in float64
      chunk by chunk, so a float64 copy of the whole set is never made. A constant channel
      gets std 1 rather than 0 so standardizing it does not divide by zero.
    """
    images = np.asarray(images_uint8)
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    step = 1024
    for start in range(0, len(images), step):
        chunk = images[start : start + step].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = images.size // channels
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(images_float, mean, std):
    """Returns ``(images - mean) / std`` per channel; images on the 0..255 scale.

    Works on numpy arrays and TensorFlow tensors alike (broadcasts over the last axis).
    """
    return (images_float - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_crop_flip(images, seed):
    """Random crop of the zero-padded image plus random horizontal flip, per example.

    Each image is padded with ``PAD`` zero pixels on every side, then an ``H x W`` window
    is cut at an offset drawn independently per example (``0..2*PAD`` on each axis), and
    each example is mirrored left-right with probability 1/2. Unlike
    ``keras.layers.RandomCrop`` (one offset per batch), offsets differ across the batch.

    Fully vectorized: the crop and the flip are one row gather and one column gather
    (``tf.gather`` with ``batch_dims=1``); flipping just reverses the column indices.

    Args:
      images: float32 ``[B, H, W, C]``.
      seed: int32/int64 tensor of shape ``[2]`` for the ``tf.random.stateless_*`` ops.

    Returns:
      float32 ``[B, H, W, C]``.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    offsets = tf.random.stateless_uniform(
        [batch, 2], seed=offset_seed, minval=0, maxval=2 * PAD + 1, dtype=tf.int32
    )
    flip = tf.random.stateless_uniform([batch], seed=flip_seed) < 0.5

    rows = offsets[:, :1] + tf.range(height)[tf.newaxis, :]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis, :]  # [B, W]
    cols = tf.where(flip[:, tf.newaxis], tf.reverse(cols, axis=[1]), cols)

    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    out = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, H, W + 2*PAD, C]
    out = tf.gather(out, cols, axis=2, batch_dims=1)  # [B, H, W, C]
    # The index arithmetic uses dynamic sizes; restore the static shape for Keras.
    return tf.ensure_shape(out, images.shape)
