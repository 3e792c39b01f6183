"""ImageNet (ILSVRC 2012, tfds "imagenet2012") streamed from tfds with tf.data.

The 1.28M training images cannot be held in memory like CIFAR, so both splits are read
from the prepared tfds records. The preprocessing is the paper's (§3.1, after Simonyan &
Zisserman 2014 and He et al. 2015a):

- training: decode, resize so the shorter side is S ~ uniform integer in [256, 480]
  (aspect kept), cut a random 224x224 window, mirror it with probability 1/2;
- evaluation: resize the shorter side to 256, cut the central 224x224 window;
- both: subtract the per-channel ImageNet mean and divide by its standard deviation.

As in ``pipeline.train_dataset`` the training stream is a function of ``seed`` alone:
epoch ``e`` reads the files and shuffles the examples with seeds derived from
``(seed, e)``, and the example at position ``i`` of that epoch is augmented with a seed
derived from ``(seed, e, i)``, so a resumed run sees exactly the batches of an
uninterrupted one. tf.data combines these per-op seeds with TensorFlow's global seed,
which ``train.py`` sets from ``--seed``.

Under a multi-worker strategy (``strategy=`` or ``input_context=``) every worker still
reads and shuffles the whole record stream (the shuffle is global), but keeps only its own
share of each global batch BEFORE decoding, so the expensive part (JPEG decode, resize,
crop) is divided among the W workers instead of repeated by each: worker ``w`` keeps the
examples at positions ``[w*m/W, (w+1)*m/W)`` of every global batch of ``m`` and cuts them
into per-replica batches of ``m/R``; ``tf.distribute`` hands a worker's consecutive
per-replica batches to its local replicas in turn. Every replica therefore gets a
consecutive slice of ``m/R`` examples of the single-device global batch, the same examples
in the same order as with one worker.

Resizing is ``tf.image.resize`` bilinear (half-pixel centres) without antialiasing:
deterministic and cheap; downscaling a large photo this way aliases slightly, which an
antialiased resize would avoid at extra cost.
"""

import os

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from sbt_keras import distribute
from sbt_keras.data import augment as augment_lib
from sbt_keras.data import pipeline
from sbt_keras.errors import ConfigError, first_line

NAME = "imagenet2012"
NUM_TRAIN = 1281167
NUM_VALIDATION = 50000
NUM_CLASSES = 1000
CROP = 224
EVAL_RESIZE = 256
SCALE_RANGE = (256, 480)
# Per-channel RGB statistics of the ImageNet training set on the 0..255 scale.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# Example-level shuffle buffer, after tfds has shuffled the order of the record files.
# It holds still-encoded JPEGs: 10k of ~110 kB each is ~1.1 GB of host memory.
SHUFFLE_BUFFER = 10_000

# The archives tfds prepares imagenet2012 from (it cannot download them itself).
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

# Independent random streams folded into the root seed.
_FILES_STREAM = 0
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2


# ---------------------------------------------------------------- preprocessing


def _resized_shape(height_width, shorter):
    """(H, W) scaled so that min(H, W) == shorter, the longer side rounded."""
    hw = tf.cast(height_width, tf.float64)
    short_side = tf.reduce_min(hw)
    scaled = tf.cast(tf.round(hw * tf.cast(shorter, tf.float64) / short_side), tf.int32)
    # Pin the shorter side exactly; float rounding must not turn 256 into 255.
    return tf.where(hw == short_side, tf.cast(shorter, tf.int32), scaled)


def _resize(image, size):
    # half-pixel-centre bilinear; antialias off (see the module docstring).
    return tf.image.resize(image, size, method="bilinear", antialias=False)


def _normalize(image, crop):
    image = tf.ensure_shape(image, [crop, crop, 3])
    return augment_lib.standardize(image, MEAN, STD)


def train_crop_params(height_width, seed, *, crop=CROP, scale_range=SCALE_RANGE):
    """The random draws of ``train_preprocess`` for an image of size ``height_width``.

    Returns:
      ``(scale, size, offset, flip)``: the shorter side S (int32 scalar, uniform in
      ``scale_range`` inclusive), the resized ``[H', W']`` (int32), the crop's top-left
      ``[row, col]`` (int32, uniform over every window inside the resized image) and
      whether to mirror (bool scalar).
    """
    low, high = scale_range
    if not crop <= low <= high:
        raise ValueError(f"need crop <= scale_range[0] <= scale_range[1], got {crop}, "
                         f"{scale_range}")
    scale_seed, row_seed, col_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    scale = tf.random.stateless_uniform([], scale_seed, minval=low, maxval=high + 1,
                                        dtype=tf.int32)
    size = _resized_shape(height_width, scale)
    row = tf.random.stateless_uniform([], row_seed, minval=0, maxval=size[0] - crop + 1,
                                      dtype=tf.int32)
    col = tf.random.stateless_uniform([], col_seed, minval=0, maxval=size[1] - crop + 1,
                                      dtype=tf.int32)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return scale, size, tf.stack([row, col]), flip


def train_preprocess(image_uint8, seed, crop=CROP, scale_range=SCALE_RANGE):
    """Scale augmentation: random shorter side, random crop, random flip, normalize.

    Args:
      image_uint8: uint8 ``[H, W, 3]``, any size (tiny images are upscaled).
      seed: int32/int64 ``[2]`` seed for the stateless random ops.

    Returns:
      float32 ``[crop, crop, 3]``, normalized by ``MEAN`` / ``STD``.
    """
    image = tf.convert_to_tensor(image_uint8)
    _, size, offset, flip = train_crop_params(
        tf.shape(image)[:2], seed, crop=crop, scale_range=scale_range)
    window = _resize(image, size)[offset[0]:offset[0] + crop, offset[1]:offset[1] + crop]
    window = tf.where(flip, tf.reverse(window, axis=[1]), window)
    return _normalize(window, crop)


def eval_preprocess(image_uint8, crop=CROP, resize=EVAL_RESIZE):
    """Shorter side to ``resize``, central ``crop`` x ``crop`` window, normalize.

    The window starts at ``(H' - crop) // 2, (W' - crop) // 2`` of the resized image.

    Returns:
      float32 ``[crop, crop, 3]``.
    """
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized shorter side {resize}")
    image = tf.convert_to_tensor(image_uint8)
    size = _resized_shape(tf.shape(image)[:2], resize)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return _normalize(_resize(image, size)[top:top + crop, left:left + crop], crop)


def _decode(image_bytes):
    # What tfds' Image feature does; prepared imagenet2012 holds RGB JPEGs only.
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


# ---------------------------------------------------------------- tfds access


def _open_builder(data_dir):
    try:
        return tfds.builder(NAME, data_dir=data_dir)
    except (AssertionError, OSError, tf.errors.OpError) as e:  # e.g. a damaged dataset_info
        raise ConfigError(f"--data_dir={data_dir}: tfds could not open {NAME} there "
                          f"({first_line(e)}); see docs/imagenet.md") from e


def check_available(data_dir, manual_dir=None):
    """Raises ConfigError unless tfds can provide imagenet2012 without the network.

    Fine when it is prepared in ``data_dir`` (None: the tfds default; may be gs://), or
    when both ILSVRC2012 archives are in ``manual_dir`` (default
    ``<data_dir>/downloads/manual``), from which tfds prepares it on first use.
    """
    builder = _open_builder(data_dir)
    if builder.is_prepared():
        return
    manual = manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
    missing = [f for f in MANUAL_FILES if not tf.io.gfile.exists(os.path.join(manual, f))]
    if missing:
        raise ConfigError(
            f"--dataset={NAME} is not prepared under {builder.data_dir_root} and {manual} "
            f"lacks {' and '.join(missing)}; pass --data_dir with a prepared tfds directory "
            f"or --manual_dir with both ILSVRC2012 tars (see docs/imagenet.md)"
        )
    logging.warning("%s is not prepared under %s; tfds will prepare it from %s on first "
                    "use, which takes hours.", NAME, builder.data_dir_root, manual)


def _is_chief(strategy):
    """Whether this process may prepare the data: every process except the non-chief
    workers of a MultiWorkerMirroredStrategy cluster (a TPU pod has one Python client)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return distribute.is_chief("multi_worker")
    return True


def _builder(data_dir, manual_dir, *, chief=True):
    """A tfds builder whose data is prepared (preparing it from the tars if needed).

    Only the chief prepares: the workers of a cluster share ``data_dir``, where several
    processes preparing at once would repeat hours of work and race each other's writes.
    A non-chief (``chief=False``) that finds the data unprepared raises ConfigError.
    """
    builder = _open_builder(data_dir)
    if not builder.is_prepared():
        check_available(data_dir, manual_dir)
        if not chief:
            role, index = distribute.task()
            raise ConfigError(
                f"--dataset={NAME} is not prepared under {builder.data_dir_root}, and this "
                f"process ({role} {index}) is not the chief: only the chief of a multi-worker "
                f"job may prepare it. Prepare it once first (tfds build {NAME} "
                f"--data_dir=DATA_DIR --manual_dir=MANUAL_DIR, or one single-process run), "
                f"then start the job (see docs/imagenet.md)")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def _split_size(builder, split, default):
    """Examples in ``split`` per the prepared metadata; ``default`` where it is missing."""
    try:
        return builder.info.splits[split].num_examples or default
    except KeyError:
        return default


def _subset(builder, split, examples, default, flag):
    """(tfds split string, size): the first ``examples`` of ``split`` in file order."""
    available = _split_size(builder, split, default)
    if not 0 <= examples <= available:
        raise ConfigError(f"--{flag}={examples} is outside 0..{available}, the size of "
                          f"{NAME} {split} (0 keeps all)")
    if examples:
        return f"{split}[:{examples}]", examples
    return split, available


def _read(builder, split, *, shuffle_seed=None):
    """(JPEG bytes, int64 label) examples; files shuffled iff ``shuffle_seed`` is given."""
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed,
        shuffle_reshuffle_each_iteration=False,  # the same files order on every pass
        try_autocache=False,
    )
    return builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, as_supervised=True,
        decoders={"image": tfds.decode.SkipDecoding()}, read_config=read_config,
    )


# ---------------------------------------------------------------- datasets


def _python_seed(root, stream, *data):
    """A non-negative int seed for ops that take Python seeds (tfds, Dataset.shuffle)."""
    # A key's first element does not depend on its last fold-in; draw from the whole key.
    key = pipeline.stream_seed(root, stream, *data)
    return int(tf.random.stateless_uniform([], key, minval=0, maxval=2**31 - 1, dtype=tf.int64))


def _shares(batch_size, input_context):
    """``(W, w, per_replica)``: input pipelines, this one's index, and the batch each of
    its replicas gets; ``(1, 0, batch_size)`` without ``input_context`` (global batches)."""
    if input_context is None:
        return 1, 0, batch_size
    workers = input_context.num_input_pipelines
    replicas = input_context.num_replicas_in_sync
    if replicas % workers or batch_size % replicas:
        raise ConfigError(f"batch size {batch_size} cannot be split evenly over {replicas} "
                          f"replicas on {workers} input pipelines (workers)")
    return workers, input_context.input_pipeline_id, batch_size // replicas


def _own_share(position, batch_size, workers, worker):
    """Whether stream position ``position`` belongs to ``worker``: the examples at
    ``[worker*m/W, (worker+1)*m/W)`` of every batch of ``m = batch_size``."""
    share = batch_size // workers
    return tf.equal((position % batch_size) // share, worker)


def _finish(ds, input_context):
    if input_context is None:  # one stream of global batches (auto-sharded if distributed)
        return pipeline.apply_options(ds)
    # Already this worker's own share; nothing for tf.distribute to shard.
    return pipeline.apply_options(ds, auto_shard=tf.data.experimental.AutoShardPolicy.OFF)


def _made(make, strategy, input_context):
    """``make(input_context)``, or through ``strategy`` with one call per worker."""
    if strategy is not None and input_context is not None:
        raise ValueError("pass strategy or input_context, not both")
    if strategy is None:
        return make(input_context)
    return strategy.distribute_datasets_from_function(make)


def train_dataset(*, data_dir, batch_size, seed, epochs, start_epoch=0, start_step=0,
                  train_examples=0, augment=True, crop=CROP, scale_range=SCALE_RANGE,
                  manual_dir=None, strategy=None, input_context=None):
    """The training stream for epochs ``start_epoch .. epochs-1``, concatenated.

    Each epoch reads the split's record files in an order drawn from ``(seed, epoch)``,
    shuffles examples through a buffer of ``min(SHUFFLE_BUFFER, N)`` and keeps the first
    ``(N // batch_size) * batch_size`` of them, so every batch is full. With
    ``train_examples`` > 0 the epoch is the FIRST ``train_examples`` examples of the split
    in file order (tfds ``train[:N]``, the same set every epoch; tfds still shuffles the
    order of the files holding them), shuffled the same way.
    ``start_step`` (global) batches of ``start_epoch`` are skipped before decoding (cheap).
    ``augment=False`` feeds the evaluation centre crops instead of scale augmentation.

    Distributed input: with ``input_context`` (a ``tf.distribute.InputContext``: W input
    pipelines, this one ``w``, R replicas) the result is worker ``w``'s share only: of
    every global batch of ``m = batch_size`` it keeps, before decoding, the examples at
    ``[w*m/W, (w+1)*m/W)``, as ``R/W`` consecutive per-replica batches of ``m/R``. With
    ``strategy`` the result is ``strategy.distribute_datasets_from_function`` of exactly
    that, ready for ``model.fit``: replica ``r`` of step ``b`` gets examples
    ``[b*m + r*m/R, b*m + (r+1)*m/R)`` of the single-device stream. Without either, the
    global batches.

    Returns:
      ``tf.data.Dataset`` of ``(float32 [batch_size, crop, crop, 3], int32 [batch_size])``
      with cardinality ``(epochs - start_epoch) * (N // batch_size) - start_step`` (with
      ``input_context``: batches of ``m/R``, ``R/W`` times as many; with ``strategy``: the
      distributed dataset).
    """
    builder = _builder(data_dir, manual_dir, chief=_is_chief(strategy))
    split, num = _subset(builder, "train", train_examples, NUM_TRAIN, "train_examples")
    steps = pipeline.check_train_steps(num, batch_size=batch_size, epochs=epochs,
                                       start_epoch=start_epoch, start_step=start_step)
    total_steps = (epochs - start_epoch) * steps - start_step
    root = pipeline.root_seed(seed)

    def epoch_examples(epoch):
        ds = _read(builder, split, shuffle_seed=_python_seed(root, _FILES_STREAM, epoch))
        ds = ds.shuffle(min(SHUFFLE_BUFFER, num), seed=_python_seed(root, _SHUFFLE_STREAM, epoch),
                        reshuffle_each_iteration=False)
        ds = ds.take(steps * batch_size).enumerate()
        ds = ds.map(lambda position, example: (tf.constant(epoch, tf.int64), position) + example)
        return ds.skip(start_step * batch_size) if epoch == start_epoch else ds

    def preprocess(epoch, position, image_bytes, label):
        if not augment:
            return eval_preprocess(_decode(image_bytes), crop=crop), tf.cast(label, tf.int32)
        key = pipeline.stream_seed(root, _AUGMENT_STREAM, epoch, position)
        image = train_preprocess(_decode(image_bytes), key, crop=crop, scale_range=scale_range)
        return image, tf.cast(label, tf.int32)

    def make(input_context):
        workers, worker, per_replica = _shares(batch_size, input_context)
        # A Python loop: tfds takes each epoch's file seed as a Python int.
        per_epoch = [epoch_examples(e) for e in range(start_epoch, epochs)]
        ds = per_epoch[0] if per_epoch else epoch_examples(start_epoch).take(0)
        for more in per_epoch[1:]:
            ds = ds.concatenate(more)
        if workers > 1:  # an epoch is whole batches, so position % m is the place in one
            ds = ds.filter(lambda epoch, position, image_bytes, label:
                           _own_share(position, batch_size, workers, worker))
        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_replica, drop_remainder=True)
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            total_steps * (batch_size // per_replica) // workers))
        return _finish(ds.prefetch(tf.data.AUTOTUNE), input_context)

    return _made(make, strategy, input_context)


def eval_dataset(*, data_dir, batch_size, test_examples=0, crop=CROP, manual_dir=None,
                 strategy=None, input_context=None):
    """The validation split (or its first ``test_examples``) in a fixed order.

    Centre crops (``eval_preprocess``) as full batches with weights: the stream is padded
    to whole batches of ``batch_size`` with copies of its first example of weight 0
    (``pipeline.pad_with_weights``), so every batch has a static shape and every real
    example counts exactly once. ``input_context`` and ``strategy`` split each (padded) global
    batch as in ``train_dataset``: each worker decodes only its own share.

    Returns:
      ``tf.data.Dataset`` of ``(float32 [batch_size, crop, crop, 3], int32 [batch_size],
      float32 [batch_size])`` (per-replica batches with ``input_context``, the distributed
      dataset with ``strategy``).
    """
    pipeline.check_eval_batch_size(batch_size)
    builder = _builder(data_dir, manual_dir, chief=_is_chief(strategy))
    split, num = _subset(builder, "validation", test_examples, NUM_VALIDATION, "test_examples")
    padded = pipeline.padded_size(num, batch_size)

    def make(input_context):
        workers, worker, per_replica = _shares(batch_size, input_context)
        ds = pipeline.pad_with_weights(_read(builder, split), num_examples=num,
                                       batch_size=batch_size)
        if workers > 1:
            ds = ds.enumerate().filter(
                lambda position, example: _own_share(position, batch_size, workers, worker))
            ds = ds.map(lambda position, example: example)
        ds = ds.map(lambda image_bytes, label, weight:
                    (eval_preprocess(_decode(image_bytes), crop=crop),
                     tf.cast(label, tf.int32), weight),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_replica, drop_remainder=True)
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            padded // per_replica // workers))
        return _finish(ds.prefetch(tf.data.AUTOTUNE), input_context)

    return _made(make, strategy, input_context)
