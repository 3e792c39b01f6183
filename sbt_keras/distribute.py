"""The tf.distribute strategy a run asks for.

Every strategy gives the same update (see training/summed_sgd.py): per-replica summed losses,
gradients all-reduced with SUM, so the global batch of m examples is summed exactly once.
"""
import tensorflow as tf


def make_strategy(name, devices=None):
    """`default` (one device) or `mirrored` (all local GPUs, or `devices` if given)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    # Config validation lists the valid names; reaching here is a programming error.
    raise ValueError(f"unknown strategy {name!r}")
