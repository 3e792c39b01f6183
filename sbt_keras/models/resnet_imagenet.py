"""ResNet-50 v1 of He et al. (2015a) Table 1, the paper's ImageNet model (§3.1, §3.5).

This is v1 as published: the stride-2 downsampling of stages 2-4 sits on the FIRST 1x1
convolution of the stage's first bottleneck block, not on its 3x3 convolution as in the
later "v1.5" variant (torchvision, Goyal et al.'s code), which costs more compute for
slightly higher accuracy.

Keras is imported inside `resnet50`, so the model registry reads the constants below
without TensorFlow.
"""
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
STEM_CHANNELS = 64
NORM_CHANNELS = (STEM_CHANNELS,) + STAGE_WIDTHS + tuple(w * EXPANSION for w in STAGE_WIDTHS)
# Downsampling at the deepest normalized conv: stem conv and pool, then stages 2-4.
NORM_STRIDE = 2 * 2 * 2 ** (len(STAGE_WIDTHS) - 1)


def resnet50(
    *, input_shape=(224, 224, 3), num_classes=1000, norm="batch", norm_dense=True,
    norm_options=None,
):
    """Builds ResNet-50 v1 as a functional model that outputs logits.

    Stem 7x7/2 conv + norm + ReLU and 3x3/2 max-pool, then bottleneck blocks
    (1x1, 3x3, 1x1 x4) in stages of 3, 4, 6, 3 with a projection shortcut (1x1 conv +
    norm, strided like the block) opening every stage, a ReLU after each residual add,
    global average pooling and a dense classifier. Every conv is followed by the chosen
    normalization and has a bias only when there is none. `norm_dense` is accepted for a
    common builder signature and ignored: the only dense layer is the classifier.

    Pixel alignment follows He et al.'s released (Caffe) model: the stem conv and pool as
    commented below; a strided 1x1 conv samples the even pixels (2i, 2j) in both branches
    of a block ("same" adds no padding to a 1x1 kernel, like their pad 0).
    """
    import keras

    from sbt_keras.layers import normalized

    del norm_dense
    use_bias = norm == "none"

    options = norm_options or {}  # for every normalization layer (layers.norm_layer)

    def conv_norm(x, filters, kernel, strides, name, relu, pad=None):
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        x = keras.layers.Conv2D(
            filters, kernel, strides=strides, padding="valid" if pad else "same",
            use_bias=use_bias, kernel_initializer="he_normal", name=name,
        )(x)
        x = normalized(x, norm, channels=filters, layer_name=f"{name}_norm", **options)
        return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def bottleneck(x, width, strides, name, project):
        y = conv_norm(x, width, 1, strides, f"{name}_conv1", relu=True)
        y = conv_norm(y, width, 3, 1, f"{name}_conv2", relu=True)
        y = conv_norm(y, width * EXPANSION, 1, 1, f"{name}_conv3", relu=False)
        if project:
            x = conv_norm(x, width * EXPANSION, 1, strides, f"{name}_shortcut", relu=False)
        y = keras.layers.Add(name=f"{name}_add")([y, x])
        return keras.layers.ReLU(name=f"{name}_relu")(y)

    inputs = keras.Input(shape=input_shape, name="images")
    # He et al.'s (Caffe) stem conv pads 3 on every side, centring output pixel i on input
    # pixel 2i; "same" would pad 2 top/left and 3 bottom/right and centre it on 2i + 1.
    x = conv_norm(inputs, STEM_CHANNELS, 7, 2, "stem_conv", relu=True, pad=3)
    # Their pool has no padding and rounds its output size up, a 3x3 window on pixels
    # 2i..2i+2, the last one clipped at the edge: on the stem's even-sized output that is
    # exactly "same" here (which pads bottom/right only, with -inf).
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (blocks, width) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS), start=1):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = bottleneck(x, width, strides, f"stage{stage}_block{block}", project=block == 1)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # float32 logits keep the softmax cross-entropy stable under a mixed-precision policy.
    logits = keras.layers.Dense(
        num_classes, kernel_initializer="he_normal", dtype="float32", name="logits"
    )(x)
    return keras.Model(inputs, logits, name="resnet50")
