"""The reduced AlexNet of Masters & Luschi (2018) §3.1, for 32x32 CIFAR images.

Keras is imported inside `build`, so the model registry reads the constants below without
TensorFlow.

`trials=K > 1` builds the fused network of K packed trials (`--pack_formulation=grouped`,
docs/packing.md), as models/resnet_cifar.py does: trial k in channels [k*C, (k+1)*C) of
every activation; conv1 one conv with K*16 outputs on the shared image, the later convs
grouped (layers/trial_conv.py); per-channel norms and max pools are per trial as they are;
the flatten keeps each trial's features whole and in the single network's order, and the
hidden and logit layers are K-way batched matmuls (layers/packed_dense.py) under the
single network's layer names.
"""

# (kernel size, channels) of the five stride-1 convolutions (paper §3.1).
CONVS = ((5, 16), (3, 48), (3, 96), (3, 64), (3, 64))
# A 3x3 stride-2 max pool follows these convolutions (1-based), as in Krizhevsky et al.
POOL_AFTER = (1, 2, 5)
HIDDEN_UNITS = (256, 256)
NORM_CHANNELS = tuple(c for _, c in CONVS) + HIDDEN_UNITS  # hidden dense: with norm_dense
# Downsampling at the deepest normalized conv (conv 5 is normalized before its pool).
NORM_STRIDE = 2 ** sum(1 for i in POOL_AFTER if i < len(CONVS))
# Norms whose statistics and parameters are per channel (per unit in the dense layers),
# hence per trial in a fused network.
PER_CHANNEL_NORMS = ("none", "batch")


def build(
    *, input_shape=(32, 32, 3), num_classes=10, norm="batch", norm_dense=True,
    norm_options=None, trials=1,
):
    """Builds the reduced AlexNet as a functional model that outputs logits.

    Normalization (unless `norm="none"`) follows every convolution, before its ReLU, and
    also the two hidden dense layers when `norm_dense` (paper Fig. 5 vs. Fig. 6);
    `norm_options` go to every normalization layer (`sbt_keras.layers.norm_layer`).
    `trials` > 1: the fused network of that many packed trials (module docstring); only
    with a per-channel norm (`PER_CHANNEL_NORMS`).
    """
    import keras

    from sbt_keras.layers import normalized
    from sbt_keras.layers.packed_dense import PackedDense
    from sbt_keras.layers.trial_conv import TrialGroupedConv2D

    if trials > 1 and norm not in PER_CHANNEL_NORMS:
        raise ValueError(f"norm={norm} mixes channels; a fused network of {trials} trials "
                         f"needs one of {', '.join(PER_CHANNEL_NORMS)}")
    options = norm_options or {}

    def dense(x, units, name, **kwargs):
        if trials == 1:
            return keras.layers.Dense(units, kernel_initializer="he_normal", name=name,
                                      **kwargs)(x)
        return PackedDense(trials, units, kernel_initializer="he_normal", name=name,
                           **kwargs)(x)

    def normalize(x, channels, name):
        return normalized(x, norm, channels=channels, layer_name=name, **options)

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for i, (kernel, channels) in enumerate(CONVS, start=1):
        # A conv bias is redundant when a normalization with its own offset follows.
        # The image is shared: only the later convs are grouped by trial.
        conv = keras.layers.Conv2D if trials == 1 or i == 1 else TrialGroupedConv2D
        x = conv(
            trials * channels, kernel, padding="same", use_bias=norm == "none",
            groups=1 if i == 1 else trials, kernel_initializer="he_normal", name=f"conv{i}",
        )(x)
        x = normalize(x, trials * channels, f"conv{i}_norm")
        x = keras.layers.ReLU(name=f"conv{i}_relu")(x)
        if i in POOL_AFTER:
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{i}")(x)
    if trials > 1:  # (N, h, w, K*C) -> (N, K, h, w, C): each trial's features together
        _, h, w, channels = x.shape
        x = keras.layers.Reshape((h, w, trials, channels // trials), name="by_trial")(x)
        x = keras.layers.Permute((3, 1, 2, 4), name="trial_major")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(HIDDEN_UNITS, start=1):
        x = dense(x, units, f"fc{i}")
        if trials > 1:  # (N, K, units) -> trial-major (N, K*units)
            x = keras.layers.Reshape((trials * units,), name=f"fc{i}_trials")(x)
        if norm_dense:
            x = normalize(x, trials * units, f"fc{i}_norm")
        x = keras.layers.ReLU(name=f"fc{i}_relu")(x)
    # float32 logits keep the softmax cross-entropy stable under a mixed-precision policy.
    # A fused network's are (N, K, classes).
    logits = dense(x, num_classes, "logits", dtype="float32")
    return keras.Model(inputs, logits, name="alexnet_reduced")
