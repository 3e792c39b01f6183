"""A fixed sample of a run's un-augmented training set: what the training-set evaluation
(train_eval.py) and the sharpness measurements (sharpness_callback.py) look at.

The sample is drawn exactly as `snapshot.Snapshot.train_arrays(n, seed)` draws it (sorted
indices from numpy default_rng(seed).choice without replacement), so `python -m
tools.sharpness --seed=0` measures the examples a run measured while training.
"""
import numpy as np

SAMPLE_SEED = 0  # the same examples for every run of a sweep, whatever its --seed


def indices(num, n, seed=SAMPLE_SEED):
    """Sorted indices of `n` of `num` examples; all of them when n is 0 or >= num."""
    if not n or n >= num:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(num, n, replace=False))


def load(cfg, n, seed=SAMPLE_SEED):
    """(Arrays of the sampled uint8 training examples, channel mean, channel std): the
    statistics are the whole training set's, as the run's input pipeline uses them."""
    from sbt_keras import data
    from sbt_keras.data import augment

    train = data.load_for(cfg).train
    mean, std = augment.channel_stats(train.images)
    keep = indices(len(train), n, seed)
    return data.Arrays(images=train.images[keep], labels=train.labels[keep]), mean, std


def standardized(cfg, n, seed=SAMPLE_SEED):
    """(float32 images standardized as the run sees them, int32 labels) of the sample."""
    from sbt_keras.data import augment

    arrays, mean, std = load(cfg, n, seed)
    images = augment.standardize(arrays.images.astype(np.float32), mean, std)
    return np.asarray(images, np.float32), arrays.labels
