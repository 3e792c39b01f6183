"""CIFAR ResNets of He et al. (2015a) §4.2: depth 6n+2, 16/32/64 filters, option-A shortcuts.

Keras is imported inside the functions, so the model registry reads the constants below
without TensorFlow.
"""
import functools

STAGE_FILTERS = (16, 32, 64)
NORM_CHANNELS = STAGE_FILTERS  # every conv is normalized
# Downsampling at the deepest normalized conv: stride 2 opens every stage after the first.
NORM_STRIDE = 2 ** (len(STAGE_FILTERS) - 1)


def _conv3x3(x, filters, strides, use_bias, name):
    """A 3x3 convolution of `x`; stride 2 zero-pads one pixel on every side explicitly.

    TF's "same" padding of a stride-2 3x3 conv on an even size pads only bottom/right,
    centring output pixel i on input pixel 2i + 1, while the option-A shortcut keeps
    pixel 2i. Symmetric padding (He et al.'s pad 1) centres it on 2i, aligning the two
    branches of the block; output size and parameters are those of "same".
    """
    import keras

    padding = "same"
    if strides == 2:
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(
        filters, 3, strides=strides, padding=padding, use_bias=use_bias,
        kernel_initializer="he_normal", name=name,
    )(x)


def _shortcut_a(x, filters):
    """Parameter-free shortcut: take the even pixels (2i, 2j), zero-pad the new channels."""
    from keras import ops

    x = x[:, ::2, ::2, :]
    extra = filters - x.shape[-1]
    return ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])


def build_resnet(
    depth, *, input_shape=(32, 32, 3), num_classes=10, norm="batch", norm_dense=True,
    norm_options=None,
):
    """Builds a CIFAR ResNet of `depth` = 6n+2 layers as a functional model that outputs logits.

    `norm_options` go to every normalization layer (`sbt_keras.layers.norm_layer`).
    `norm_dense` is accepted for a common builder signature and ignored: the only dense
    layer is the classifier.
    """
    import keras

    from sbt_keras.layers import normalized

    del norm_dense
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    use_bias = norm == "none"

    options = norm_options or {}

    def conv_norm(x, filters, strides, name, relu):
        x = _conv3x3(x, filters, strides, use_bias, name)
        x = normalized(x, norm, channels=filters, layer_name=f"{name}_norm", **options)
        return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input(shape=input_shape, name="images")
    x = conv_norm(inputs, STAGE_FILTERS[0], 1, "stem", relu=True)
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, blocks_per_stage + 1):
            name = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = conv_norm(x, filters, strides, f"{name}_conv1", relu=True)
            y = conv_norm(y, filters, 1, f"{name}_conv2", relu=False)
            shortcut = _shortcut_a(x, filters) if strides == 2 else x
            x = keras.layers.Add(name=f"{name}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # float32 logits keep the softmax cross-entropy stable under a mixed-precision policy.
    logits = keras.layers.Dense(
        num_classes, kernel_initializer="he_normal", dtype="float32", name="logits"
    )(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}")


resnet8 = functools.partial(build_resnet, 8)
resnet20 = functools.partial(build_resnet, 20)
resnet32 = functools.partial(build_resnet, 32)
