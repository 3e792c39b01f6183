"""Datasets: a registry of names, TF-free size checks, and in-memory loading.

CIFAR and synthetic data are small enough to hold in memory (``load``, then pipeline.py);
ImageNet is streamed from tfds (imagenet.py).

Importing this package does not import TensorFlow, so configuration can be validated
(``describe``) before any heavy import; ``load`` imports it lazily.
"""

import dataclasses

import numpy as np

from sbt_keras.data import cifar_binary
from sbt_keras.errors import ConfigError

DATASETS = ("cifar10", "cifar100", "imagenet2012", "synthetic")

# Sizes and classes of the standard tfds splits (train, test or validation, classes), used
# when no --cifar_dir is given. ImageNet's "test" split is its 50k validation set.
_TFDS_SIZES = {"cifar10": (50000, 10000, 10), "cifar100": (50000, 10000, 100),
               "imagenet2012": (1281167, 50000, 1000)}
# Network input size: ImageNet is cropped to 224 x 224 (imagenet.CROP).
IMAGENET_CROP = 224


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """Sizes and shapes of a dataset as it will be loaded (after any caps)."""

    num_train: int
    num_test: int
    num_classes: int
    image_shape: tuple  # (H, W, 3)


# eq=False: the fields are numpy arrays, whose == is elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class Arrays:
    """One split in memory."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int32 [N]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 [{len(self.images)}], got {self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train and test splits plus the number of classes."""

    train: Arrays
    test: Arrays
    num_classes: int


def _check_cap(flag, cap, available, dataset, what):
    if cap < 0:
        raise ConfigError(f"--{flag}={cap} must be >= 0 (0 keeps all {what} examples)")
    if cap > available:
        raise ConfigError(
            f"--{flag}={cap} exceeds the {available} {what} examples of {dataset}; "
            f"lower it (0 keeps all)"
        )
    return cap or available


def describe(
    dataset,
    *,
    cifar_dir=None,
    train_examples=0,
    test_examples=0,
    image_size=32,
    num_classes=10,
    synthetic_train=1024,
    synthetic_test=256,
):
    """Sizes of ``dataset`` as ``load`` would return it, without TensorFlow.

    With ``cifar_dir`` (cifar10/cifar100 only; ignored for synthetic) the directory is
    validated and the record counts come from file sizes; without it the standard tfds
    split sizes are assumed. ``image_size`` and ``num_classes`` apply to synthetic only.
    ``train_examples`` / ``test_examples`` > 0 keep the first N examples.

    Raises:
      ConfigError: unknown dataset, bad CIFAR directory, or impossible sizes.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset={dataset} is unknown; choose one of {', '.join(DATASETS)}")

    if dataset == "synthetic":
        for flag, value, low in (
            ("synthetic_train", synthetic_train, 1),
            ("synthetic_test", synthetic_test, 1),
            ("image_size", image_size, 1),
            ("num_classes", num_classes, 2),
        ):
            if value < low:
                raise ConfigError(f"--{flag}={value} must be at least {low} for --dataset=synthetic")
        num_train, num_test, classes = synthetic_train, synthetic_test, num_classes
        shape = (image_size, image_size, 3)
    elif dataset == "imagenet2012":
        num_train, num_test, classes = _TFDS_SIZES[dataset]
        shape = (IMAGENET_CROP, IMAGENET_CROP, 3)
    else:
        if cifar_dir:
            _, _, num_train, num_test = cifar_binary.check_dir(dataset, cifar_dir)
        else:
            num_train, num_test = _TFDS_SIZES[dataset][:2]
        classes = _TFDS_SIZES[dataset][2]
        shape = (cifar_binary.IMAGE_SIZE, cifar_binary.IMAGE_SIZE, 3)

    return DataInfo(
        num_train=_check_cap("train_examples", train_examples, num_train, dataset, "training"),
        num_test=_check_cap("test_examples", test_examples, num_test, dataset, "test"),
        num_classes=classes,
        image_shape=shape,
    )


def load(
    dataset,
    *,
    cifar_dir=None,
    data_dir=None,
    download=True,
    train_examples=0,
    test_examples=0,
    image_size=32,
    num_classes=10,
    synthetic_train=1024,
    synthetic_test=256,
    seed=0,
):
    """Loads both splits of ``dataset`` into memory.

    Source: the CIFAR binary files in ``cifar_dir`` if given, else tfds (``data_dir``,
    ``download``) for cifar10/cifar100; synthetic data is generated from ``seed``.
    ``train_examples`` / ``test_examples`` > 0 keep the FIRST N examples of each split.

    Raises:
      ConfigError: as ``describe``, or tfds cannot provide the data.
    """
    info = describe(
        dataset,
        cifar_dir=cifar_dir,
        train_examples=train_examples,
        test_examples=test_examples,
        image_size=image_size,
        num_classes=num_classes,
        synthetic_train=synthetic_train,
        synthetic_test=synthetic_test,
    )

    if dataset == "imagenet2012":
        raise ValueError("imagenet2012 is streamed, not loaded: use sbt_keras.data.imagenet")
    if dataset == "synthetic":
        from sbt_keras.data import synthetic

        train, test = synthetic.make(synthetic_train, synthetic_test, image_size, num_classes, seed)
    elif cifar_dir:
        train_files, test_files, _, _ = cifar_binary.check_dir(dataset, cifar_dir)
        train = cifar_binary.read(train_files, dataset)
        test = cifar_binary.read(test_files, dataset)
    else:
        from sbt_keras.data import tfds_source

        train, test = tfds_source.load_tfds(dataset, data_dir, download)

    # describe() checked caps against nominal tfds sizes; check the real ones too.
    n_train = _check_cap("train_examples", train_examples, len(train[1]), dataset, "training")
    n_test = _check_cap("test_examples", test_examples, len(test[1]), dataset, "test")

    def arrays(pair, n):
        images, labels = pair
        return Arrays(
            images=np.ascontiguousarray(images[:n], np.uint8),
            labels=np.ascontiguousarray(labels[:n], np.int32),
        )

    return Splits(train=arrays(train, n_train), test=arrays(test, n_test), num_classes=info.num_classes)


def source(cfg, strategy=None):
    """Where a run's batches come from: `train_dataset(...)` and `eval_dataset(...)`
    (data/pipeline.py's signatures), for the resolved Config `cfg`."""
    import functools
    import types

    from sbt_keras.data import augment, pipeline

    if cfg.dataset == "imagenet2012":  # streamed from tfds
        from sbt_keras.data import imagenet

        # Each worker reads the stream but decodes only its share (imagenet.py).
        where = dict(data_dir=cfg.data_dir, manual_dir=cfg.manual_dir, strategy=strategy)
        return types.SimpleNamespace(
            train_dataset=functools.partial(imagenet.train_dataset,
                                            train_examples=cfg.train_examples, **where),
            eval_dataset=functools.partial(imagenet.eval_dataset,
                                           test_examples=cfg.test_examples, **where))
    splits = load_for(cfg)  # small enough to hold in memory
    mean, std = augment.channel_stats(splits.train.images)
    return types.SimpleNamespace(
        train_dataset=functools.partial(pipeline.train_dataset, splits.train, mean=mean,
                                        std=std),
        eval_dataset=functools.partial(pipeline.eval_dataset, splits.test, mean=mean,
                                       std=std))


def load_for(cfg):
    """`load` with the data settings of the Config `cfg` (CIFAR or synthetic)."""
    return load(
        cfg.dataset, cifar_dir=cfg.cifar_dir, data_dir=cfg.data_dir, download=cfg.download,
        train_examples=cfg.train_examples, test_examples=cfg.test_examples,
        image_size=cfg.image_size, num_classes=cfg.num_classes,
        synthetic_train=cfg.synthetic_train, synthetic_test=cfg.synthetic_test,
        seed=cfg.seed)
