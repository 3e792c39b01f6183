"""A grouped convolution whose kernel gradient keeps every group's NaN in that group.

In a fused network of K packed trials (models/resnet_cifar.py, `trials=K`) group k of a
grouped convolution is trial k. TensorFlow's CPU kernel for the filter gradient of a
grouped convolution (Conv2DBackpropFilter, feature_group_count > 1) lets a non-finite
value of one group's inputs or output gradients reach every group's kernel gradient
(measured: one trial's NaN stem made the three trials' conv kernel gradients all NaN),
so one diverging trial would poison its neighbours. Mathematically group j's kernel
gradient depends only on group j's values, so computing it from inputs and output
gradients whose non-finite entries are replaced by zeros gives every finite group its
exact gradient; a non-finite group gets some finite value instead of NaN, which only a
trial that has already diverged sees (its biases, stem and logits still go NaN, as alone).
The input gradient and the forward pass are TensorFlow's own.

It also calls TensorFlow's own grouped convolution: Keras 3's TF backend (`ops.conv`)
compiles every grouped convolution with XLA ("grouped convolutions are broken on CPU
without XLA"), which on a CPU is 10-100x slower (docs/bench_cpu.md, the issue's 0.34 s a
step); in TF 2.21 the non-XLA kernel trains the fused network exactly as the K trials
train alone (tests/test_packed.py), and on GPUs it is cuDNN's grouped convolution.
"""
import keras
import tensorflow as tf


def _finite(x):
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


@keras.saving.register_keras_serializable(package="sbt_keras")
class TrialGroupedConv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D (channels last, no dilation) with an isolated kernel gradient."""

    def convolution_op(self, inputs, kernel):
        strides = [1, *self.strides, 1]
        padding = self.padding.upper()

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
