"""Will one training step fit in memory? Checked before the first step, from the model.

The estimate counts what a step must hold at once: every layer's output for each example
of the batch (kept for the backward pass) and the variables with their gradients. It leaves
out workspace and fragmentation, so it is a floor: a batch refused here cannot fit, while
one allowed may still run out (that is then reported as `OutOfMemory`, see train.py).

Only host memory is checked (training on CPUs, where the batches of every local replica
share it); GPU and TPU memory is not known to TensorFlow before allocation.
"""
import math

import psutil

from sbt_keras.errors import ConfigError

GIB = 2 ** 30


def activation_elements_per_example(network):
    """Sum of every layer's output size for one example (the input layer excluded)."""
    import keras
    import tensorflow as tf

    total = 0
    for layer in network.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        for output in tf.nest.flatten(layer.output):
            total += math.prod(output.shape[1:])
    return total


def training_bytes(network, examples, compute_bytes=4):
    """Floor on the memory one step over `examples` examples needs (see the docstring)."""
    variables = sum(math.prod(v.shape) for v in network.variables) * 4
    return 2 * variables + activation_elements_per_example(network) * examples * compute_bytes


def host_available_bytes():
    """Host memory available to a new allocation without swapping; None where unknown.

    psutil's `available` (Linux: MemAvailable) counts the page cache the kernel can drop;
    the free-pages count leaves it out and so refuses batches that fit on a host whose
    cache holds the data set.
    """
    try:
        return psutil.virtual_memory().available
    except (OSError, RuntimeError, NotImplementedError):
        return None


def check_run_fits(cfg, network):
    """check_fits for a run training on this host's CPUs (its replicas share the host's
    memory); accelerators report their own out-of-memory errors."""
    import tensorflow as tf

    from sbt_keras import distribute

    if cfg.strategy == "tpu" or tf.config.list_logical_devices("GPU"):
        return
    check_fits(network, batch_size=cfg.batch_size,
               examples=cfg.batch_size // distribute.num_workers(cfg.strategy),
               compute_bytes=2 if cfg.precision == "mixed_bfloat16" else 4,
               available=host_available_bytes())


def check_fits(network, *, batch_size, examples, compute_bytes, available):
    """Raises ConfigError when a step over `examples` examples needs more than `available`."""
    if available is None:
        return
    need = training_bytes(network, examples, compute_bytes)
    if need > available:
        per_example = activation_elements_per_example(network) * compute_bytes / 2 ** 20
        raise ConfigError(
            f"--batch_size={batch_size} needs at least {need / GIB:.1f} GiB for one training "
            f"step here ({per_example:.1f} MiB of activations per example x {examples} "
            f"examples on this host), more than the {available / GIB:.1f} GiB available; lower "
            f"--batch_size or train on an accelerator")
