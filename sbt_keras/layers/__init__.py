"""Normalization layers selectable by name (`--norm`).

"batch" is the paper's batch normalization with a separate BN batch size; "group" and
"layer" are beyond-paper options that do not depend on the batch at all.
"""
import keras

from sbt_keras.errors import ConfigError
from sbt_keras.layers.subbatch_norm import SubBatchNormalization


def _no_norm(**_):
    return None


def _batch_norm(*, layer_name, bn_batch_size=None, momentum=0.99, epsilon=1e-3,
                synchronized=False, moving_variance="unbiased", **_):
    return SubBatchNormalization(
        bn_batch_size=bn_batch_size, momentum=momentum, epsilon=epsilon,
        synchronized=synchronized, name=layer_name
    )


def _largest_divisor_up_to(n, limit):
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _group_norm(*, channels, layer_name, epsilon=1e-3, **_):
    if channels is None:
        raise ValueError("norm 'group' needs the channel count to choose its groups")
    # Wu & He (2018) use 32 groups; fall back to the largest count that divides channels.
    groups = _largest_divisor_up_to(channels, 32)
    return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=layer_name)


def _layer_norm(*, layer_name, epsilon=1e-3, **_):
    # Ba et al. (2016) for conv nets: each example over all of (H, W, C) -- one group.
    # keras.layers.LayerNormalization would normalize over C alone at every pixel.
    return keras.layers.GroupNormalization(groups=1, epsilon=epsilon, name=layer_name)


NORMS = {
    "batch": _batch_norm,
    "group": _group_norm,
    "layer": _layer_norm,
    "none": _no_norm,
}


def norm_layer(name, *, channels=None, layer_name=None, **options):
    """Returns a new normalization layer for `--norm=name`, or None for "none".

    `options` (bn_batch_size, momentum, epsilon, synchronized, moving_variance, ...) are
    taken by the norms that use them and ignored by the others; `channels` is required by
    "group".
    """
    if name not in NORMS:
        raise ConfigError(f"--norm={name} is unknown; choose one of {', '.join(sorted(NORMS))}")
    return NORMS[name](channels=channels, layer_name=layer_name, **options)


def normalized(x, name, *, channels, layer_name, **options):
    """`x` through a new `--norm=name` layer (unchanged for "none"); options as norm_layer."""
    layer = norm_layer(name, channels=channels, layer_name=layer_name, **options)
    return x if layer is None else layer(x)


__all__ = ["NORMS", "SubBatchNormalization", "norm_layer", "normalized"]
