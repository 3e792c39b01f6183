"""A grouped convolution on TensorFlow's own kernel, with a NaN-isolating kernel gradient
on request.

In a fused network of K packed trials (models/resnet_cifar.py, `trials=K`) group k of a
grouped convolution is trial k, so one diverging trial's NaN must stay in its group. It
does with TensorFlow's own grouped kernel, eagerly, in a graph and under whole-step XLA
(tests/test_packed.py checks all three); it did not with Keras's `Conv2D(groups=K)`, whose
TF backend runs every grouped convolution as its own XLA-compiled function (on CPU "grouped
convolutions are broken ... without XLA"): there one trial's NaN stem made all three
trials' conv kernel gradients NaN, and a diverging packed trial poisoned its neighbours
(measured 2026-12-01). That wrapper is also 10-100x slower on a CPU (docs/bench_cpu.md, the
issue's 0.34 s a step), so this layer calls `tf.nn.conv2d` directly; in TF 2.21 it trains
the fused network exactly as the K trials train alone (tests/test_packed.py), and on GPUs
it is cuDNN's grouped convolution.

Kernels not checked here (GPU, TPU, other versions) might spread a NaN the same way, so
training/grouped.py recomputes any step whose gradients are not all finite with
`isolated_gradients()`: group j's kernel gradient depends only on group j's values, so
computing it from inputs and output gradients whose non-finite entries are replaced by
zeros gives every finite group its exact gradient whatever the kernel does with the
others (a non-finite group gets some finite value instead of NaN; only a trial that has
already diverged sees it, and its biases, stem and logits still go NaN, as alone). The
isolation costs four elementwise passes per convolution (ResNet-20, K = 8, m = 2: 122 vs
92.5 ms a step on the 2-core CPU), so it is traced only for that fallback.
"""
import contextlib

import keras
import tensorflow as tf

_isolating = False


@contextlib.contextmanager
def isolated_gradients():
    """Convolutions traced inside get the isolating kernel gradient."""
    global _isolating
    before, _isolating = _isolating, True
    try:
        yield
    finally:
        _isolating = before


def _finite(x):
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


@keras.saving.register_keras_serializable(package="sbt_keras")
class TrialGroupedConv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D (channels last, no dilation) on TensorFlow's own grouped kernel,
    with the isolating kernel gradient when traced inside `isolated_gradients()`."""

    def convolution_op(self, inputs, kernel):
        strides = [1, *self.strides, 1]
        padding = self.padding.upper()
        if not _isolating:
            return tf.nn.conv2d(inputs, kernel, strides, padding)

        @tf.custom_gradient
        def conv(x, w):
            def grad(dy):
                dx = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=w, out_backprop=dy, strides=strides,
                    padding=padding)
                dw = tf.raw_ops.Conv2DBackpropFilter(
                    input=_finite(x), filter_sizes=tf.shape(w), out_backprop=_finite(dy),
                    strides=strides, padding=padding)
                return dx, dw

            return tf.nn.conv2d(x, w, strides, padding), grad

        # The kernel as a tensor: its read, outside the custom gradient, reaches the variable.
        return conv(inputs, tf.convert_to_tensor(kernel))
