"""Models selectable by name (`--model`): one registry entry each, with its defaults.

Importing this package does not import TensorFlow: the config validates `--model` and takes
each model's defaults from `MODELS` before anything heavy loads. A builder is imported only
when `build()` asks for it.
"""
import dataclasses
import importlib

from sbt_keras.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: where its builder lives and the paper's defaults for it."""
    builder: str  # "module:function", imported by build()
    weight_decay: float  # L2 lambda, paper §3.1 (after Krizhevsky et al. and He et al.)
    image_size: int  # the input side the architecture is defined for
    # Channel counts of the layers a normalization follows (convs, and hidden dense layers
    # where `norm_dense`): what a per-channel-group setting such as --gn_groups must divide.
    norm_channels: tuple
    gn_groups: int  # --norm=group's default: the largest of 32, 16, ... dividing them all
    # Channel counts of normalized hidden dense layers (with --norm_dense): one value per
    # channel and example, so no per-example spatial statistics and BN needs 2+ examples.
    dense_norm_channels: tuple = ()

    @property
    def norm_dense_layers(self):
        return bool(self.dense_norm_channels)


_CIFAR_RESNET_CHANNELS = (16, 32, 64)
MODELS = {
    "alexnet_reduced": ModelSpec("sbt_keras.models.alexnet:build", 5e-4, 32,
                                 (16, 48, 96, 64, 256), 16, dense_norm_channels=(256,)),
    "resnet8": ModelSpec("sbt_keras.models.resnet_cifar:resnet8", 1e-4, 32,
                         _CIFAR_RESNET_CHANNELS, 16),
    "resnet20": ModelSpec("sbt_keras.models.resnet_cifar:resnet20", 1e-4, 32,
                          _CIFAR_RESNET_CHANNELS, 16),
    "resnet32": ModelSpec("sbt_keras.models.resnet_cifar:resnet32", 1e-4, 32,
                          _CIFAR_RESNET_CHANNELS, 16),
    "resnet50": ModelSpec("sbt_keras.models.resnet_imagenet:resnet50", 1e-4, 224,
                          (64, 128, 256, 512, 1024, 2048), 32),
}

DECAY_SCOPES = ("kernels", "all")

# Config field name -> the normalization layers' option name, where they differ.
_NORM_OPTION_NAMES = {"bn_momentum": "momentum", "bn_epsilon": "epsilon",
                      "bn_sync": "synchronized", "bn_moving_variance": "moving_variance"}


def spec(name) -> ModelSpec:
    """The registry entry of `name`; ConfigError naming the choices if there is none."""
    if name not in MODELS:
        raise ConfigError(f"--model={name} is unknown; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def builder(name):
    """The function that builds model `name` (imports its module)."""
    module, function = spec(name).builder.split(":")
    return getattr(importlib.import_module(module), function)


def build(name, *, norm="batch", norm_dense=True, input_shape=None, num_classes=None,
          **norm_options):
    """Builds the model registered as `name` as a functional Keras model outputting logits.

    `input_shape` and `num_classes` default to the architecture's own (32x32x3 and 10 for
    the CIFAR models, 224x224x3 and 1000 for ResNet-50). `norm_options` are normalization
    settings under their Config names (bn_batch_size, bn_momentum, bn_epsilon, bn_sync,
    ...); each normalization uses the ones it needs.
    """
    sizes = {k: v for k, v in (("input_shape", input_shape), ("num_classes", num_classes))
             if v is not None}
    options = {_NORM_OPTION_NAMES.get(k, k): v for k, v in norm_options.items()}
    return builder(name)(norm=norm, norm_dense=norm_dense, norm_options=options, **sizes)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        # Nested models or blocks hold their own layers.
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def decayed_variables(model, scope="kernels"):
    """Returns the variables that get L2 weight decay.

    "kernels": the kernel of every Conv2D and Dense layer (no biases, no normalization
    parameters); "all": every trainable variable except the mixing logits of --norm=mix,
    whose decay would pull every layer towards an equal mix.
    """
    import keras

    if scope == "all":
        return [v for v in model.trainable_variables if not v.path.endswith("mix_logits")]
    if scope == "kernels":
        return [
            layer.kernel for layer in _all_layers(model)
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
            and layer.kernel.trainable
        ]
    raise ConfigError(
        f"--weight_decay_on={scope} is unknown; choose one of {', '.join(DECAY_SCOPES)}"
    )
