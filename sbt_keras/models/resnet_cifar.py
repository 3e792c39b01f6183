"""CIFAR ResNets of He et al. (2015a) §4.2: depth 6n+2, 16/32/64 filters, option-A shortcuts.

Keras is imported inside the functions, so the model registry reads the constants below
without TensorFlow.

`trials=K > 1` builds the fused network of K packed trials (`--pack_formulation=grouped`,
docs/packing.md): the same layers, under the same names, holding K independent weight
sets, trial k in channels [k*C, (k+1)*C) of every activation (trial-major). The stem is one
conv with K*16 outputs on the shared image; every later conv is grouped (groups=K), so
trial k's outputs see only trial k's inputs (layers/trial_conv.py, whose kernel gradient
also keeps a diverged trial's NaN in its group); a per-channel norm (none, batch) is per
trial as it is; the option-A shortcut pads each trial's channels on their own; the logits
are a K-way batched matmul (layers/packed_dense.py), (N, K, classes).

Why the builder builds the fused network itself rather than rewriting a built one: every
layer's fused form is one argument away from its single form here, while a graph rewrite
would have to know each layer's semantics anyway (which axis is the trial's, how a
shortcut pads) and would break silently on a layer it does not know. Variables keep the
single network's paths, with the trial axis last (convs, norms) or first (the logits),
which is how training/grouped.py slices them into the per-trial networks.
"""
import functools

STAGE_FILTERS = (16, 32, 64)
NORM_CHANNELS = STAGE_FILTERS  # every conv is normalized
# Downsampling at the deepest normalized conv: stride 2 opens every stage after the first.
NORM_STRIDE = 2 ** (len(STAGE_FILTERS) - 1)
# Norms whose statistics and parameters are per channel, hence per trial in a fused network.
PER_CHANNEL_NORMS = ("none", "batch")


def _conv3x3(x, filters, strides, use_bias, name, groups=1):
    """A 3x3 convolution of `x`; stride 2 zero-pads one pixel on every side explicitly.

    TF's "same" padding of a stride-2 3x3 conv on an even size pads only bottom/right,
    centring output pixel i on input pixel 2i + 1, while the option-A shortcut keeps
    pixel 2i. Symmetric padding (He et al.'s pad 1) centres it on 2i, aligning the two
    branches of the block; output size and parameters are those of "same".
    """
    import keras

    from sbt_keras.layers.trial_conv import TrialGroupedConv2D

    padding = "same"
    if strides == 2:
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    # A fused network's grouped convs keep one trial's NaN out of the others' gradients.
    conv = keras.layers.Conv2D if groups == 1 else TrialGroupedConv2D
    return conv(
        filters, 3, strides=strides, padding=padding, use_bias=use_bias, groups=groups,
        kernel_initializer="he_normal", name=name,
    )(x)


def _shortcut_a(x, filters, trials=1):
    """Parameter-free shortcut: take the even pixels (2i, 2j), zero-pad the new channels
    (each of `trials` trial-major channel slices on its own)."""
    from keras import ops

    x = x[:, ::2, ::2, :]
    _, h, w, channels = x.shape
    extra = filters - channels // trials
    x = ops.reshape(x, (-1, h, w, trials, channels // trials))
    x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
    return ops.reshape(x, (-1, h, w, trials * filters))


def build_resnet(
    depth, *, input_shape=(32, 32, 3), num_classes=10, norm="batch", norm_dense=True,
    norm_options=None, trials=1,
):
    """Builds a CIFAR ResNet of `depth` = 6n+2 layers as a functional model that outputs logits.

    `norm_options` go to every normalization layer (`sbt_keras.layers.norm_layer`).
    `norm_dense` is accepted for a common builder signature and ignored: the only dense
    layer is the classifier. `trials` > 1: the fused network of that many packed trials
    (module docstring); only with a per-channel norm (`PER_CHANNEL_NORMS`).
    """
    import keras

    from sbt_keras.layers import normalized
    from sbt_keras.layers.packed_dense import PackedDense

    del norm_dense
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    use_bias = norm == "none"

    options = norm_options or {}

    if trials > 1 and norm not in PER_CHANNEL_NORMS:
        raise ValueError(f"norm={norm} mixes channels; a fused network of {trials} trials "
                         f"needs one of {', '.join(PER_CHANNEL_NORMS)}")

    def conv_norm(x, filters, strides, name, relu):
        # The stem's input (the image) is shared: only later convs are grouped by trial.
        groups = 1 if x is inputs else trials
        x = _conv3x3(x, trials * filters, strides, use_bias, name, groups=groups)
        x = normalized(x, norm, channels=trials * filters, layer_name=f"{name}_norm",
                       **options)
        return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input(shape=input_shape, name="images")
    x = conv_norm(inputs, STAGE_FILTERS[0], 1, "stem", relu=True)
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, blocks_per_stage + 1):
            name = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = conv_norm(x, filters, strides, f"{name}_conv1", relu=True)
            y = conv_norm(y, filters, 1, f"{name}_conv2", relu=False)
            shortcut = _shortcut_a(x, filters, trials) if strides == 2 else x
            x = keras.layers.Add(name=f"{name}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # float32 logits keep the softmax cross-entropy stable under a mixed-precision policy.
    if trials > 1:
        logits = PackedDense(trials, num_classes, kernel_initializer="he_normal",
                             dtype="float32", name="logits")(x)
    else:
        logits = keras.layers.Dense(
            num_classes, kernel_initializer="he_normal", dtype="float32", name="logits"
        )(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}")


resnet8 = functools.partial(build_resnet, 8)
resnet20 = functools.partial(build_resnet, 20)
resnet32 = functools.partial(build_resnet, 32)
