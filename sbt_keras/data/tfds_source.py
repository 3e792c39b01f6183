"""CIFAR-10 / CIFAR-100 through TensorFlow Datasets, materialized to numpy."""

import numpy as np

from sbt_keras.errors import ConfigError, first_line

# Where tfds downloads each dataset from (its builder's URL), and how long a download may
# take to start answering: offline, tfds would retry for minutes before failing.
DOWNLOAD_HOSTS = {"cifar10": ("www.cs.toronto.edu", 443),
                  "cifar100": ("www.cs.toronto.edu", 443)}
PROBE_SECONDS = 10.0

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

    if download:
        _check_downloadable(tfds, name, data_dir)
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


def _check_downloadable(tfds, name, data_dir):
    """ConfigError within PROBE_SECONDS if `name` is not prepared in `data_dir` and its
    download host cannot be reached (offline), instead of tfds's minutes of retries."""
    import socket
    import threading

    if name not in DOWNLOAD_HOSTS:
        return
    try:
        if tfds.builder(name, data_dir=data_dir).is_prepared():
            return
    except Exception:  # noqa: BLE001 - tfds.load reports its own problems
        return
    host, port = DOWNLOAD_HOSTS[name]
    outcome = {}

    def probe():  # name resolution has no timeout of its own: bound it with the thread's
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = e

    thread = threading.Thread(target=probe, daemon=True, name="sbt-download-probe")
    thread.start()
    thread.join(PROBE_SECONDS)
    if not outcome.get("ok"):
        why = first_line(outcome["error"]) if "error" in outcome else \
            f"no answer within {PROBE_SECONDS:g} s"
        where = data_dir or "the default tfds directory"
        raise ConfigError(
            f"--dataset={name} is not prepared in {where} and cannot be downloaded "
            f"({host}: {why}); offline, pass --cifar_dir=DIR with the extracted binary "
            f"archive, or --data_dir=DIR with a prepared tfds directory")
