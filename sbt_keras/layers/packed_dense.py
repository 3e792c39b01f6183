"""The logits of K packed trials as one K-way batched matmul (the grouped formulation).

A fused network (`--pack_formulation=grouped`, docs/packing.md) carries K trials' features
side by side, trial k in channels [k*C, (k+1)*C). A Dense layer would connect every
trial's features to every trial's logits; this layer keeps them apart: kernel (K, in, out),
bias (K, out), logits (N, K, out) with logits[:, k] = features_k @ kernel[k] + bias[k].
"""
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="sbt_keras")
class PackedDense(keras.layers.Layer):
    """K independent dense layers on the K trial-major channel slices of the input."""

    def __init__(self, trials, units, kernel_initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.trials = int(trials)
        self.units = int(units)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.trials:
            raise ValueError(f"{self.name}: {channels} channels are not {self.trials} "
                             f"trials' equal slices")
        self.features = channels // self.trials
        self.kernel = self.add_weight(shape=(self.trials, self.features, self.units),
                                      name="kernel", initializer=self.kernel_initializer)
        self.bias = self.add_weight(shape=(self.trials, self.units), name="bias",
                                    initializer="zeros")

    def call(self, inputs):
        x = ops.reshape(inputs, (-1, self.trials, self.features))
        return ops.einsum("nki,kio->nko", x, ops.cast(self.kernel, x.dtype)) + ops.cast(
            self.bias, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.trials, self.units)

    def get_config(self):
        return {**super().get_config(), "trials": self.trials, "units": self.units,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}
