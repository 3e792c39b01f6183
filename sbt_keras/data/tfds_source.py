"""CIFAR-10 / CIFAR-100 through TensorFlow Datasets, materialized to numpy."""

import numpy as np

from sbt_keras.errors import ConfigError, first_line

# Batch size used to pull examples out of tfds; big enough to be fast, small enough
# that no single tensor is the whole split.
_CHUNK = 10000


def _to_numpy(ds):
    images, labels = [], []
    for x, y in ds.batch(_CHUNK).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


def load_tfds(name, data_dir, download):
    """Loads the train and test splits of tfds dataset ``name`` into memory.

    Args:
      name: tfds name, e.g. "cifar10" or "cifar100".
      data_dir: tfds data directory (may be ``gs://...``); None for the tfds default.
      download: whether tfds may download and prepare the dataset.

    Returns:
      ``((train_images, train_labels), (test_images, test_labels))``: uint8 NHWC, int32.

    Raises:
      ConfigError: the dataset is not prepared in ``data_dir`` and cannot be downloaded.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        # Not batch_size=-1: that pads a single batch sized from dataset metadata,
        # which is absent (and then unbounded) for mocked or partially prepared data.
        train, test = tfds.load(
            name,
            split=["train", "test"],
            as_supervised=True,
            data_dir=data_dir,
            download=download,
        )
        return _to_numpy(train), _to_numpy(test)
    except (
        AssertionError,  # tfds: "could not find data in ..." when download=False
        OSError,  # network / download failures (requests errors are OSErrors)
        tfds.core.registered.DatasetNotFoundError,
        tf.errors.OpError,  # e.g. unreadable gs:// bucket
    ) as e:
        where = data_dir or "the default tfds directory"
        raise ConfigError(
            f"--dataset={name}: tfds could not load it from {where} ({first_line(e)}); "
            f"pass --cifar_dir with the extracted binary archive, or --data_dir with a "
            f"prepared tfds directory"
        ) from e
