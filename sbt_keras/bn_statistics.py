"""Batch-norm moving statistics recomputed for a network's current weights.

A network whose weights were changed by hand (an interpolation between two runs,
tools/interpolate.py) has moving statistics that belong to other weights. `recompute`
replaces them with the exact mean of the per-batch statistics the layers compute in
training mode over a sample, batch after batch:

    moving_mean     = (1/k) sum_j mean_j
    moving_variance = (1/k) sum_j var_j

mean_j and var_j being what layer's own moving-average update would take in from batch j
(per group of `bn_batch_size` examples, averaged over the groups; the variance estimate the
layer is configured with, e.g. unbiased). How: every BN layer's momentum is set to 0 for
the passes, so each training-mode pass leaves exactly batch j's statistics in the moving
variables (0 * old + 1 * new); they are read after each pass, averaged in float64 and
assigned; the momenta are restored. Later layers see their inputs normalized with batch
statistics, as in training. Only the moving statistics change.

Batch renormalization is refused: its training-mode output is corrected towards the moving
statistics themselves (r, d), so the per-batch statistics would depend on the values being
replaced.
"""
import numpy as np


def bn_layers(network):
    """The layers of `network` (recursively) that keep moving statistics."""
    found = []

    def walk(layer):
        if getattr(layer, "moving_mean", None) is not None and hasattr(layer, "momentum"):
            if hasattr(layer, "renorm_limits"):
                raise ValueError(f"{layer.name}: batch renormalization's training-mode output "
                                 f"depends on its moving statistics; they cannot be "
                                 f"recomputed from per-batch statistics")
            found.append(layer)
        for child in getattr(layer, "layers", None) or []:
            walk(child)

    for layer in network.layers:
        walk(layer)
    return found


def group_size(layers):
    """Examples each batch must be a multiple of: the largest bn_batch_size (1 if none)."""
    return max([getattr(layer, "bn_batch_size", None) or 1 for layer in layers] + [1])


def batch_size_for(layers, num_examples, at_most=256):
    """A batch size that every layer's BN groups divide: the largest multiple of the group
    size up to max(at_most, group size), and no more than the examples allow."""
    group = group_size(layers)
    if num_examples < group:
        raise ValueError(f"{num_examples} examples are fewer than one BN group of {group}")
    size = max(at_most // group, 1) * group
    return min(size, num_examples // group * group)


class Recomputer:
    """Context in which `recompute(images, batch_size)` resets the moving statistics of
    `network`'s BN layers (see the module docstring); the training-mode pass is traced once
    for all the calls. The momenta are restored on exit."""

    def __init__(self, network):
        self.network = network
        self.layers = bn_layers(network)
        self._momenta = None
        self._forward = None

    def __enter__(self):
        import tensorflow as tf

        self._momenta = [layer.momentum for layer in self.layers]
        for layer in self.layers:
            layer.momentum = 0.0
        # Traced after the momenta are set: they are Python numbers baked into the graph.
        self._forward = tf.function(lambda x: self.network(x, training=True))
        return self

    def __exit__(self, *exc):
        for layer, momentum in zip(self.layers, self._momenta):
            layer.momentum = momentum
        self._forward = None
        return False

    def recompute(self, images, batch_size):
        """Sets every BN layer's moving statistics to the mean over the full batches of
        `images` of its training-mode per-batch statistics; returns the number of batches
        k (a last partial batch is not used). No-op (0) for a network without BN."""
        import tensorflow as tf

        if not self.layers:
            return 0
        if self._forward is None:
            raise RuntimeError("use Recomputer as a context manager")
        batches = len(images) // batch_size
        if batches == 0:
            raise ValueError(f"{len(images)} examples make no batch of {batch_size}")
        sums = [[np.zeros(layer.moving_mean.shape, np.float64),
                 np.zeros(layer.moving_variance.shape, np.float64)] for layer in self.layers]
        for j in range(batches):
            self._forward(tf.constant(images[j * batch_size:(j + 1) * batch_size]))
            for layer, (mean, variance) in zip(self.layers, sums):
                mean += np.asarray(layer.moving_mean.numpy(), np.float64)
                variance += np.asarray(layer.moving_variance.numpy(), np.float64)
        for layer, (mean, variance) in zip(self.layers, sums):
            layer.moving_mean.assign((mean / batches).astype(np.float32))
            layer.moving_variance.assign((variance / batches).astype(np.float32))
        return batches


def recompute(network, images, batch_size):
    """One `Recomputer.recompute` (traces the pass anew; loops should use a Recomputer)."""
    with Recomputer(network) as recomputer:
        return recomputer.recompute(images, batch_size)
