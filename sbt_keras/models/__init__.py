"""Models selectable by name (`--model`), their weight decay, and what it applies to."""
import keras

from sbt_keras.errors import ConfigError
from sbt_keras.models import alexnet, resnet_cifar, resnet_imagenet

MODELS = {
    "alexnet_reduced": alexnet.build,
    "resnet8": resnet_cifar.resnet8,
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet50": resnet_imagenet.resnet50,
}

# L2 weight decay lambda per model (paper §3.1, after Krizhevsky et al. and He et al.).
DEFAULT_WEIGHT_DECAY = {
    "alexnet_reduced": 5e-4,
    "resnet8": 1e-4,
    "resnet20": 1e-4,
    "resnet32": 1e-4,
    "resnet50": 1e-4,
}

DECAY_SCOPES = ("all", "kernels")


def build(name, **kwargs):
    """Builds the model registered as `name`; kwargs go to its builder."""
    if name not in MODELS:
        raise ConfigError(f"--model={name} is unknown; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        # Nested models or blocks hold their own layers.
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def decayed_variables(model, scope="kernels"):
    """Returns the variables that get L2 weight decay.

    "kernels": the kernel of every Conv2D and Dense layer (no biases, no normalization
    parameters); "all": every trainable variable.
    """
    if scope == "all":
        return list(model.trainable_variables)
    if scope == "kernels":
        return [
            layer.kernel for layer in _all_layers(model)
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
            and layer.kernel.trainable
        ]
    raise ConfigError(
        f"--weight_decay_on={scope} is unknown; choose one of {', '.join(DECAY_SCOPES)}"
    )
