"""Models selectable by name (`--model`): one registry entry each, with its defaults.

Importing this package does not import TensorFlow (the builder modules import Keras inside
their functions): the config validates `--model` and takes each model's defaults and shape
facts from `MODELS` before anything heavy loads.
"""
import dataclasses

from sbt_keras.errors import ConfigError
from sbt_keras.models import alexnet, resnet_cifar, resnet_imagenet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: its builder and the defaults and shape facts the config checks need."""
    builder: object  # f(*, input_shape, num_classes, norm, norm_dense, norm_options)
    weight_decay: float  # L2 lambda, paper §3.1 (after Krizhevsky et al. and He et al.)
    image_size: int  # the input side the architecture is defined for
    # Channel counts of the layers a normalization follows (convs, and hidden dense layers
    # with `norm_dense`): what a per-channel-group setting such as --gn_groups must divide.
    norm_channels: tuple
    # Downsampling at the deepest normalized conv: its outputs have ceil(side / stride)
    # pixels a side, the fewest values per example any conv normalization sees.
    norm_stride: int
    # Channel counts of normalized hidden dense layers (with --norm_dense): one value per
    # channel and example, so no per-example spatial statistics and BN needs 2+ examples.
    dense_norm_channels: tuple = ()
    # Bumped when the same name starts computing something else; a run directory trained
    # with another revision is not resumed (docs/changes.md says what changed).
    revision: int = 1
    # Norms with which the builder can build K packed trials as one fused network
    # (`trials=K`, --pack_formulation=grouped); () when it cannot.
    fused_norms: tuple = ()

    @property
    def norm_dense_layers(self):
        return bool(self.dense_norm_channels)

    @property
    def gn_groups(self):
        """--norm=group's default: Wu & He's 32, or the largest power of two below it that
        divides every normalized layer's channels."""
        return next(g for g in (32, 16, 8, 4, 2, 1)
                    if all(c % g == 0 for c in self.norm_channels))

    def smallest_norm_side(self, image_side):
        return -(-image_side // self.norm_stride)


def _cifar_resnet(builder):
    return ModelSpec(builder, 1e-4, 32, resnet_cifar.NORM_CHANNELS, resnet_cifar.NORM_STRIDE,
                     revision=2, fused_norms=resnet_cifar.PER_CHANNEL_NORMS)


MODELS = {
    "alexnet_reduced": ModelSpec(alexnet.build, 5e-4, 32, alexnet.NORM_CHANNELS,
                                 alexnet.NORM_STRIDE, dense_norm_channels=alexnet.HIDDEN_UNITS,
                                 fused_norms=alexnet.PER_CHANNEL_NORMS),
    "resnet8": _cifar_resnet(resnet_cifar.resnet8),
    "resnet20": _cifar_resnet(resnet_cifar.resnet20),
    "resnet32": _cifar_resnet(resnet_cifar.resnet32),
    "resnet50": ModelSpec(resnet_imagenet.resnet50, 1e-4, 224, resnet_imagenet.NORM_CHANNELS,
                          resnet_imagenet.NORM_STRIDE, revision=2),
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
    """The function that builds model `name`."""
    return spec(name).builder


def build(name, *, norm="batch", norm_dense=True, input_shape=None, num_classes=None,
          trials=1, **norm_options):
    """Builds the model registered as `name` as a functional Keras model outputting logits.

    `input_shape` and `num_classes` default to the architecture's own (32x32x3 and 10 for
    the CIFAR models, 224x224x3 and 1000 for ResNet-50). `norm_options` are normalization
    settings under their Config names (bn_batch_size, bn_momentum, bn_epsilon, bn_sync,
    ...); each normalization uses the ones it needs. `trials` > 1: the fused network of
    that many packed trials (only for a model and norm in its `fused_norms`).
    """
    side = spec(name).image_size
    sizes = {"input_shape": input_shape or (side, side, 3)}
    if num_classes is not None:
        sizes["num_classes"] = num_classes
    options = {_NORM_OPTION_NAMES.get(k, k): v for k, v in norm_options.items()}
    if trials > 1:
        sizes["trials"] = trials
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
