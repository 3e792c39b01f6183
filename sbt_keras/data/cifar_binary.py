"""Reader for the original CIFAR-10 / CIFAR-100 *binary* distributions.

CIFAR-10 (``cifar-10-binary.tar.gz``): ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
``test_batch.bin``; each record is 1 label byte followed by 3072 pixel bytes.
CIFAR-100 (``cifar-100-binary.tar.gz``): ``train.bin`` and ``test.bin``; each record is
2 label bytes (coarse, fine) followed by 3072 pixel bytes. We use the fine label.

Pixels are stored channel-planar: 1024 red, 1024 green, 1024 blue bytes, each plane a
row-major 32x32 image. ``read`` returns HWC.

``check_dir`` only looks at the file system (no TensorFlow) so configuration can be
validated before anything heavy is imported.
"""

import os

from sbt_keras.errors import ConfigError

IMAGE_SIZE = 32
PIXEL_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE

# dataset -> (subdirectory of the extracted archive, train files, test files, label bytes)
_LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        1,
    ),
    "cifar100": ("cifar-100-binary", ("train.bin",), ("test.bin",), 2),
}


def _layout(dataset):
    if dataset not in _LAYOUTS:
        raise ConfigError(
            f"--dataset={dataset} has no CIFAR binary layout; --cifar_dir only works with "
            f"{', '.join(sorted(_LAYOUTS))}"
        )
    return _LAYOUTS[dataset]


# Classes of each label byte: CIFAR-10 (class), CIFAR-100 (coarse, fine).
_LABEL_CLASSES = {"cifar10": (10,), "cifar100": (20, 100)}


def check_labels(files, dataset):
    """ConfigError naming the file and its first record whose label byte is not a class of
    `dataset` (a damaged file, or one from another archive). Reads only the label bytes
    (memory-mapped), so it costs a pass over the page cache, not a copy."""
    import numpy as np

    label_bytes = _layout(dataset)[3]
    size = label_bytes + PIXEL_BYTES
    for fname in files:
        records = np.memmap(fname, dtype=np.uint8, mode="r")
        records = records[: len(records) // size * size].reshape(-1, size)
        for column, classes in enumerate(_LABEL_CLASSES[dataset]):
            bad = np.flatnonzero(records[:, column] >= classes)
            if bad.size:
                first = int(bad[0])
                which = "" if label_bytes == 1 else ("coarse " if column == 0 else "fine ")
                raise ConfigError(
                    f"--cifar_dir: {fname} record {first} (of {len(records)}) has {which}label "
                    f"{int(records[first, column])}, but {dataset} has {classes} "
                    f"{which}classes ({bad.size} such records); the file is damaged or from "
                    f"another archive: re-extract it")
        del records


def record_bytes(dataset):
    """Bytes per record for ``dataset`` ("cifar10": 3073, "cifar100": 3074)."""
    return _layout(dataset)[3] + PIXEL_BYTES


def check_dir(dataset, path):
    """Validates a CIFAR binary directory without reading its contents.

    ``path`` may be the directory holding the ``.bin`` files or its parent (the directory
    the archive was extracted into).

    Returns:
      ``(train_files, test_files, num_train, num_test)``; counts come from file sizes.

    Raises:
      ConfigError: the path is missing, an expected file is missing, or a file is empty
        or not a whole number of records.
    """
    subdir, train_names, test_names, _ = _layout(dataset)
    if not path or not os.path.isdir(path):
        raise ConfigError(
            f"--cifar_dir={path} is not a directory; point it at the extracted {subdir}/ "
            f"(or its parent)"
        )
    # Accept both the extraction directory and the archive's own subdirectory.
    nested = os.path.join(path, subdir)
    root = nested if os.path.isdir(nested) else path

    missing = [n for n in train_names + test_names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise ConfigError(
            f"--cifar_dir={path} is missing {', '.join(missing)} (looked in {root}); "
            f"point it at the extracted {subdir}/ from the {dataset} binary archive"
        )

    size = record_bytes(dataset)

    def count(names):
        files, total = [], 0
        for name in names:
            fname = os.path.join(root, name)
            nbytes = os.path.getsize(fname)
            if nbytes == 0:
                raise ConfigError(f"--cifar_dir={path}: {fname} is empty; re-extract the archive")
            if nbytes % size:
                raise ConfigError(
                    f"--cifar_dir={path}: {fname} has {nbytes} bytes, not a multiple of the "
                    f"{size}-byte record (truncated record); re-extract the archive"
                )
            files.append(fname)
            total += nbytes // size
        return files, total

    train_files, num_train = count(train_names)
    test_files, num_test = count(test_names)
    return train_files, test_files, num_train, num_test


def read(files, dataset):
    """Reads CIFAR binary ``files`` (in order) into memory.

    Decoding runs in TensorFlow on large batches of records; the result is materialized.

    Returns:
      ``(images, labels)``: uint8 ``[N, 32, 32, 3]`` (HWC, RGB) and int32 ``[N]``
      (the fine label for cifar100).
    """
    import numpy as np
    import tensorflow as tf

    check_labels(files, dataset)  # before any compute: one line, not a graph traceback
    label_bytes = _layout(dataset)[3]
    size = label_bytes + PIXEL_BYTES

    def decode(records):
        raw = tf.io.decode_raw(records, tf.uint8)  # [B, size]
        # The last label byte is the class: CIFAR-10 has one, CIFAR-100 (coarse, fine).
        labels = tf.cast(raw[:, label_bytes - 1], tf.int32)
        planes = tf.reshape(raw[:, label_bytes:], [-1, 3, IMAGE_SIZE, IMAGE_SIZE])
        return tf.transpose(planes, [0, 2, 3, 1]), labels

    ds = tf.data.FixedLengthRecordDataset(list(files), size)
    ds = ds.batch(10000).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
        images.append(x)
        labels.append(y)
    if not images:
        return (
            np.zeros([0, IMAGE_SIZE, IMAGE_SIZE, 3], np.uint8),
            np.zeros([0], np.int32),
        )
    return np.concatenate(images), np.concatenate(labels)
