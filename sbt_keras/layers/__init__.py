"""Normalization layers selectable by name (`--norm`).

"batch" is the paper's batch normalization with a separate BN batch size; the others are
beyond-paper options for the normalization study (docs/normalization.md): "batch_renorm"
(Ioffe 2017, on the same sub-batches), "group", "instance" and "layer" (statistics of each
example alone) and "mix" (learned mixture of batch and per-example statistics).

Every NORMS entry is a factory `f(*, channels, layer_name, **options)` returning a new
layer (None for "none"); it reads the options sbt_keras.norms.NORM_OPTIONS lists for it,
with sbt_keras.norms.DEFAULT_OPTIONS for missing ones, and ignores the rest. The
TensorFlow-free facts about the norms (names, options, which use batch statistics) live in
sbt_keras.norms so that the config can check them before TensorFlow loads.
"""
from sbt_keras import norms as _norms
from sbt_keras.errors import ConfigError
from sbt_keras.layers.batch_renorm import BatchRenormalization
from sbt_keras.layers.example_norm import ExampleNormalization
from sbt_keras.layers.mixed_norm import MixedNormalization
from sbt_keras.layers.subbatch_norm import SubBatchNormalization


def _option(options, key):
    return options.get(key, _norms.DEFAULT_OPTIONS[key])


def _no_norm(*, channels=None, layer_name=None, **_):
    return None


def _batch_norm(*, channels=None, layer_name=None, **options):
    return SubBatchNormalization(
        bn_batch_size=_option(options, "bn_batch_size"), momentum=_option(options, "momentum"),
        epsilon=_option(options, "epsilon"), synchronized=_option(options, "synchronized"),
        moving_variance=_option(options, "moving_variance"), name=layer_name,
    )


def _batch_renorm(*, channels=None, layer_name=None, **options):
    return BatchRenormalization(
        bn_batch_size=_option(options, "bn_batch_size"), momentum=_option(options, "momentum"),
        epsilon=_option(options, "epsilon"),
        moving_variance=_option(options, "moving_variance"),
        r_max=_option(options, "renorm_r_max"), d_max=_option(options, "renorm_d_max"),
        start_step=_option(options, "renorm_start_step"),
        r_end_step=_option(options, "renorm_r_end_step"),
        d_end_step=_option(options, "renorm_d_end_step"),
        name=layer_name,
    )


def _group_norm(*, channels=None, layer_name=None, **options):
    # Wu & He (2018): 32 groups by default. A count that does not divide the channels is
    # an error, never silently replaced by another one.
    groups = _option(options, "gn_groups")
    _norms.check_groups(channels, groups, layer_name)
    return ExampleNormalization("group", groups=groups, epsilon=_option(options, "epsilon"),
                                name=layer_name)


def _instance_norm(*, channels=None, layer_name=None, **options):
    return ExampleNormalization("instance", epsilon=_option(options, "epsilon"),
                                name=layer_name)


def _layer_norm(*, channels=None, layer_name=None, **options):
    # Ba et al. (2016) for conv nets: each example over all of (H, W, C).
    # keras.layers.LayerNormalization would normalize over C alone at every pixel.
    return ExampleNormalization("layer", epsilon=_option(options, "epsilon"), name=layer_name)


def _mix_norm(*, channels=None, layer_name=None, **options):
    return MixedNormalization(
        mix_norms=_option(options, "mix_norms"),
        per_channel=_option(options, "mix_per_channel"),
        bn_batch_size=_option(options, "bn_batch_size"), momentum=_option(options, "momentum"),
        epsilon=_option(options, "epsilon"),
        moving_variance=_option(options, "moving_variance"),
        name=layer_name,
    )


_FACTORIES = {
    "none": _no_norm,
    "batch": _batch_norm,
    "batch_renorm": _batch_renorm,
    "group": _group_norm,
    "instance": _instance_norm,
    "layer": _layer_norm,
    "mix": _mix_norm,
}
# In sbt_keras.norms's order; a name there without a factory here fails at import.
NORMS = {name: _FACTORIES[name] for name in _norms.NORM_NAMES}


def norm_layer(name, *, channels=None, layer_name=None, **options):
    """Returns a new normalization layer for `--norm=name`, or None for "none".

    `options` are keys of sbt_keras.norms.DEFAULT_OPTIONS (others are a TypeError); each
    norm reads those NORM_OPTIONS[name] lists and ignores the rest; their values are checked
    by sbt_keras.norms.check_options (ValueError). `channels` is the
    normalized layer's channel count (required by "group").
    """
    if name not in NORMS:
        raise ConfigError(f"--norm={name} is unknown; choose one of {', '.join(sorted(NORMS))}")
    unknown = sorted(set(options) - set(_norms.OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown normalization option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(_norms.OPTION_NAMES)}")
    _norms.check_options(name, **options)
    return NORMS[name](channels=channels, layer_name=layer_name, **options)


def normalized(x, name, *, channels, layer_name, **options):
    """`x` through a new `--norm=name` layer (unchanged for "none"); options as norm_layer."""
    layer = norm_layer(name, channels=channels, layer_name=layer_name, **options)
    return x if layer is None else layer(x)


__all__ = ["BatchRenormalization", "ExampleNormalization", "MixedNormalization", "NORMS",
           "SubBatchNormalization", "norm_layer", "normalized"]
