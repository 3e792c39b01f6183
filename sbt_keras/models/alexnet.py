"""The reduced AlexNet of Masters & Luschi (2018) §3.1, for 32x32 CIFAR images.

Keras is imported inside `build`, so the model registry reads the constants below without
TensorFlow.
"""

# (kernel size, channels) of the five stride-1 convolutions (paper §3.1).
CONVS = ((5, 16), (3, 48), (3, 96), (3, 64), (3, 64))
# A 3x3 stride-2 max pool follows these convolutions (1-based), as in Krizhevsky et al.
POOL_AFTER = (1, 2, 5)
HIDDEN_UNITS = (256, 256)
NORM_CHANNELS = tuple(c for _, c in CONVS) + HIDDEN_UNITS  # hidden dense: with norm_dense
# Downsampling at the deepest normalized conv (conv 5 is normalized before its pool).
NORM_STRIDE = 2 ** sum(1 for i in POOL_AFTER if i < len(CONVS))


def build(
    *, input_shape=(32, 32, 3), num_classes=10, norm="batch", norm_dense=True,
    norm_options=None,
):
    """Builds the reduced AlexNet as a functional model that outputs logits.

    Normalization (unless `norm="none"`) follows every convolution, before its ReLU, and
    also the two hidden dense layers when `norm_dense` (paper Fig. 5 vs. Fig. 6);
    `norm_options` go to every normalization layer (`sbt_keras.layers.norm_layer`).
    """
    import keras

    from sbt_keras.layers import normalized

    options = norm_options or {}

    def normalize(x, channels, name):
        return normalized(x, norm, channels=channels, layer_name=name, **options)

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for i, (kernel, channels) in enumerate(CONVS, start=1):
        # A conv bias is redundant when a normalization with its own offset follows.
        x = keras.layers.Conv2D(
            channels, kernel, padding="same", use_bias=norm == "none",
            kernel_initializer="he_normal", name=f"conv{i}",
        )(x)
        x = normalize(x, channels, f"conv{i}_norm")
        x = keras.layers.ReLU(name=f"conv{i}_relu")(x)
        if i in POOL_AFTER:
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(HIDDEN_UNITS, start=1):
        x = keras.layers.Dense(units, kernel_initializer="he_normal", name=f"fc{i}")(x)
        if norm_dense:
            x = normalize(x, units, f"fc{i}_norm")
        x = keras.layers.ReLU(name=f"fc{i}_relu")(x)
    # float32 logits keep the softmax cross-entropy stable under a mixed-precision policy.
    logits = keras.layers.Dense(
        num_classes, kernel_initializer="he_normal", dtype="float32", name="logits"
    )(x)
    return keras.Model(inputs, logits, name="alexnet_reduced")
