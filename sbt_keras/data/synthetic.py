"""A small, learnable, deterministic image classification task for smoke tests.

Each class has a fixed mean image: a class colour plus a smooth (low-frequency)
spatial pattern. Examples are that mean plus per-pixel Gaussian noise. The colour
survives random crops and flips, and the smooth pattern mostly does, so a tiny model
gets well above chance within a few steps even with augmentation on.
"""

import numpy as np

# Noise standard deviation on the 0..255 scale: visible but much smaller than the
# spread between class means.
_NOISE_STD = 40.0
# Side of the coarse grid the spatial pattern is drawn on before upsampling.
_PATTERN_GRID = 4


def _class_means(rng, image_size, num_classes):
    colours = rng.uniform(32.0, 224.0, size=(num_classes, 1, 1, 3))
    coarse = rng.uniform(-64.0, 64.0, size=(num_classes, _PATTERN_GRID, _PATTERN_GRID, 3))
    # Nearest-neighbour upsampling keeps the pattern smooth at any image size.
    idx = np.arange(image_size) * _PATTERN_GRID // image_size
    pattern = coarse[:, idx][:, :, idx]
    return (colours + pattern).astype(np.float32)


def _examples(rng, means, n):
    num_classes = means.shape[0]
    # Balanced classes in a random order.
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    images = np.empty((n,) + means.shape[1:], np.uint8)
    step = 1024  # bounded float32 scratch memory
    for start in range(0, n, step):
        y = labels[start : start + step]
        noise = rng.normal(0.0, _NOISE_STD, size=(len(y),) + means.shape[1:]).astype(np.float32)
        images[start : start + step] = np.clip(np.rint(means[y] + noise), 0, 255).astype(np.uint8)
    return images, labels


def make(num_train, num_test, image_size, num_classes, seed):
    """Builds the synthetic train and test splits.

    Both splits share the class means and differ only in the noise and labels drawn.
    The result is a pure function of the arguments.

    Returns:
      ``((train_images, train_labels), (test_images, test_labels))``: uint8
      ``[N, image_size, image_size, 3]`` and int32 ``[N]`` in ``0..num_classes-1``.
    """
    rng = np.random.default_rng(seed)
    means = _class_means(rng, image_size, num_classes)
    train = _examples(rng, means, num_train)
    test = _examples(rng, means, num_test)
    return train, test
