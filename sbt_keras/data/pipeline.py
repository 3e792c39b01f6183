"""tf.data input pipelines over in-memory arrays.

The training stream is a pure function of ``(seed, epoch, batch)``: epoch ``e`` uses the
permutation drawn from a seed derived from ``(seed, e)`` and batch ``b`` of it is
augmented with a seed derived from ``(seed, e, b)``. Nothing depends on iterator state,
so a run resumed at ``start_epoch=k`` sees exactly the batches an uninterrupted run sees
from epoch ``k`` on, and the global stream is the same however many replicas split it.

Order of operations per batch: gather uint8 -> float32 -> pad/crop/flip -> standardize.
Augmenting *before* standardizing means the 4-pixel padding is 0 in raw pixel space,
i.e. black, as in the paper's zero padding (after standardization it becomes
``-mean/std`` per channel, not 0).
"""

import tensorflow as tf

from sbt_keras.data import augment as augment_lib
from sbt_keras.errors import ConfigError

# Independent random streams folded into the root seed.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def root_seed(seed):
    """The stateless-RNG key ``int64 [seed, 0]`` all of a run's random streams come from."""
    return tf.constant([seed, 0], tf.int64)


def stream_seed(root, stream, *data):
    """The stateless-RNG key of random stream ``stream`` at ``data`` (e.g. epoch, step).

    ``root`` folded with ``stream`` and then with each of ``data`` in turn: a pure function
    of its arguments, so a resumed run draws exactly what an uninterrupted one draws, and
    different ``stream`` numbers (each pipeline numbers its own) are independent.
    """
    key = tf.random.experimental.stateless_fold_in(root, tf.constant(stream, tf.int64))
    for d in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
    return key


def apply_options(ds, *, auto_shard=tf.data.experimental.AutoShardPolicy.DATA):
    """``ds`` with a deterministic element order and ``auto_shard`` as its sharding policy.

    The default, DATA, suits a pipeline that builds the same global stream on every worker
    and has no files to shard by: each worker keeps its own slice of each global batch.
    A pipeline that already yields only its own worker's share passes OFF.
    """
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_distribute.auto_shard_policy = auto_shard
    return ds.with_options(opts)


def check_train_steps(num, *, batch_size, epochs, start_epoch, start_step):
    """Full batches per epoch of ``num`` training examples, after checking the settings.

    Raises ConfigError, naming the flag to change, unless ``batch_size`` is in ``1..num``,
    ``start_epoch`` in ``0..epochs`` and ``start_step`` a batch of epoch ``start_epoch``
    (0 when resuming at the very end, ``start_epoch == epochs``).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch_size={batch_size} must be at least 1")
    steps = num // batch_size
    if steps == 0:
        raise ConfigError(
            f"--batch_size={batch_size} is larger than the {num} training examples; "
            f"lower --batch_size or use more --train_examples"
        )
    if not 0 <= start_epoch <= epochs:
        raise ConfigError(
            f"start epoch {start_epoch} is outside 0..{epochs}; check --epochs against the checkpoint"
        )
    if not 0 <= start_step < steps or (start_step and start_epoch == epochs):
        raise ConfigError(f"start step {start_step} is outside epoch {start_epoch}'s {steps} "
                          f"batches; the checkpoint does not match --batch_size")
    return steps


def check_eval_batch_size(batch_size):
    """Raises ConfigError unless the evaluation batch size is positive."""
    if batch_size < 1:
        raise ConfigError(f"--eval_batch_size={batch_size} must be at least 1")


def padded_size(num, batch_size):
    """``num`` rounded up to whole batches."""
    return -(-num // batch_size) * batch_size


def pad_with_weights(examples, *, num_examples, batch_size):
    """``(*example, weight)`` for every example (weight 1), padded to whole batches.

    The padding repeats the first example with weight 0. Cut into batches of
    ``batch_size``, every batch is then full (static shapes, as TPUs need, and an even split
    across replicas) and weighted metrics still count each real example exactly once.

    Args:
      examples: ``tf.data.Dataset`` of tensors or tuples of tensors.
      num_examples: its length (a streamed dataset does not always know it).
      batch_size: the batch size the result will be cut into.

    Returns:
      ``tf.data.Dataset`` of ``padded_size(num_examples, batch_size)`` tuples, each an
      example's components followed by a float32 scalar weight; not yet batched.
    """
    weighted = examples.map(lambda *example: (*example, tf.constant(1.0)))
    pad = padded_size(num_examples, batch_size) - num_examples
    if pad:
        filler = weighted.take(1).map(lambda *example: (*example[:-1], tf.constant(0.0)))
        weighted = weighted.concatenate(filler.repeat(pad))
    return weighted


def train_dataset(arrays, *, batch_size, seed, epochs, start_epoch=0, start_step=0, augment,
                  mean, std):
    """The training stream for epochs ``start_epoch .. epochs-1``, concatenated.

    Each epoch is a fresh permutation of the ``N`` examples cut into ``N // batch_size``
    full batches (the remainder of the permutation is dropped, so every batch has exactly
    ``batch_size`` examples).

    Args:
      arrays: object with ``images`` (uint8 ``[N, H, W, 3]``) and ``labels`` (int ``[N]``).
      batch_size: global batch size.
      seed: integer seed; the whole stream is a function of it.
      epochs: total number of epochs of the full run.
      start_epoch: first epoch to produce (for resuming).
      start_step: batches of ``start_epoch`` to skip (for resuming mid-epoch); skipped
        before any gather or augmentation, so it costs nothing.
      augment: apply random pad/crop/flip.
      mean, std: per-channel statistics for standardization (0..255 scale).

    Returns:
      ``tf.data.Dataset`` of ``(float32 [batch_size, H, W, 3], int32 [batch_size])`` with
      known cardinality ``(epochs - start_epoch) * (N // batch_size) - start_step``.
    """
    num = len(arrays.labels)
    steps = check_train_steps(num, batch_size=batch_size, epochs=epochs,
                              start_epoch=start_epoch, start_step=start_step)

    images = tf.constant(arrays.images, tf.uint8)
    labels = tf.constant(arrays.labels, tf.int32)
    root = root_seed(seed)

    def epoch_batches(epoch):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(num), seed=stream_seed(root, _SHUFFLE_STREAM, epoch)
        )
        index = tf.reshape(perm[: steps * batch_size], [steps, batch_size])
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill([steps], epoch), tf.range(steps, dtype=tf.int64), index)
        )

    def make_batch(epoch, step, index):
        x = tf.cast(tf.gather(images, index), tf.float32)
        if augment:
            x = augment_lib.pad_crop_flip(x, stream_seed(root, _AUGMENT_STREAM, epoch, step))
        x = augment_lib.standardize(x, mean, std)
        return x, tf.gather(labels, index)

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_batches).skip(start_step)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # flat_map hides the length; it is known, and Keras wants it.
    ds = ds.apply(tf.data.experimental.assert_cardinality(
        (epochs - start_epoch) * steps - start_step))
    return apply_options(ds.prefetch(tf.data.AUTOTUNE))


def eval_dataset(arrays, *, batch_size, mean, std):
    """All examples in order, standardized, no augmentation, as full batches with weights.

    Every batch has exactly ``batch_size`` examples (static shapes, as TPUs need, and an
    even split across replicas): the last one is padded with copies of example 0 whose
    weight is 0, so metrics still count each real example exactly once.

    Returns:
      ``tf.data.Dataset`` of ``(float32 [batch_size, H, W, 3], int32 [batch_size],
      float32 [batch_size])``.
    """
    check_eval_batch_size(batch_size)
    num = len(arrays.labels)
    images = tf.constant(arrays.images, tf.uint8)
    labels = tf.constant(arrays.labels, tf.int32)

    def make_batch(index, weight):
        x = tf.cast(tf.gather(images, index), tf.float32)
        return augment_lib.standardize(x, mean, std), tf.gather(labels, index), weight

    # Padded and batched as indices, so each batch is one gather.
    indices = pad_with_weights(tf.data.Dataset.range(num), num_examples=num,
                               batch_size=batch_size)
    ds = indices.batch(batch_size)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return apply_options(ds.prefetch(tf.data.AUTOTUNE))
