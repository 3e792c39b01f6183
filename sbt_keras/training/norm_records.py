"""What the learned normalizations learned: the mixing weights of every `--norm=mix` layer,
as history columns, TensorBoard scalars and the final values in result.yaml.

The article's prediction (docs/normalization.md) is that alpha_batch, the weight of the
batch statistics, ends near 1 at large m and near 0 at small m; these records are what
`tools.figures --kind=alpha` draws against m.
"""
import numpy as np

MEAN_KEY = "alpha_batch_mean"  # the mean over mix layers of the batch statistics' weight


def mix_layers(network):
    """The network's MixedNormalization layers, in layer order."""
    from sbt_keras.layers import MixedNormalization

    return [layer for layer in network.layers if isinstance(layer, MixedNormalization)]


def mixing_weights(network):
    """{"alpha_<component>/<layer>": weight} for every mix layer (a per-channel weight is
    averaged over channels), plus MEAN_KEY when the layers mix in batch statistics; {} for
    a network without mix layers."""
    values = {}
    for layer in mix_layers(network):
        alpha = np.asarray(layer.mixing_weights())
        for k, component in enumerate(layer.components):
            values[f"alpha_{component}/{layer.name}"] = float(np.mean(alpha[k]))
    batch = [v for k, v in values.items() if k.startswith("alpha_batch/")]
    if batch:
        values[MEAN_KEY] = float(np.mean(batch))
    return values


def summary(network):
    """result.yaml's entries: `mixing_weights` ({layer: {component: weight}}) and
    MEAN_KEY, or {} for a network without mix layers."""
    if not mix_layers(network):
        return {}
    return {"mixing_weights": final_mixing_weights(network),
            MEAN_KEY: mixing_weights(network).get(MEAN_KEY)}


def final_mixing_weights(network):
    """result.yaml's `mixing_weights`: {layer: {component: weight}} (None: no mix layers)."""
    nested = {}
    for key, value in mixing_weights(network).items():
        if key != MEAN_KEY:
            component, layer = key[len("alpha_"):].split("/", 1)
            nested.setdefault(layer, {})[component] = value
    return nested or None
