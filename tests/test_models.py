"""Model builders: shapes, hand-counted parameter totals, initialization, weight-decay scope."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sbt_keras import models
from sbt_keras.errors import ConfigError
from sbt_keras.layers import SubBatchNormalization

NORMS = ("none", "batch")


def _trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def _layers_of(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


# Hand counts for 10 classes at 32x32. With BN a conv has no bias and its BN adds 2*C
# trainable (gamma, beta); without BN the conv has a C bias instead.
#
# Reduced AlexNet, conv kernels k*k*Cin*Cout:
#   conv1 5*5*3*16 = 1,200   conv2 3*3*16*48 = 6,912   conv3 3*3*48*96 = 41,472
#   conv4 3*3*96*64 = 55,296  conv5 3*3*64*64 = 36,864  -> 141,744; channels 16+48+96+64+64 = 288
#   pools after conv1, conv2, conv5: 32 -> 16 -> 8 -> 4, flatten 4*4*64 = 1,024
#   fc1 1,024*256+256 = 262,400  fc2 256*256+256 = 65,792  logits 256*10+10 = 2,570 -> 330,762
#   none:                141,744 + 288       + 330,762             = 472,794
#   batch, convs only:   141,744 + 2*288     + 330,762             = 473,082
#   batch everywhere:    473,082 + 2*(256+256)                     = 474,106
#
# CIFAR ResNet, depth 6n+2, option-A shortcuts are parameter-free:
#   stem 3*3*3*16 = 432 + BN 32; logits 64*10+10 = 650           -> 1,114
#   stage1 block: 2 * 3*3*16*16 = 4,608 + BN 2*32 = 64           -> 4,672 each (n blocks)
#   stage2 first: 3*3*16*32 = 4,608 + 3*3*32*32 = 9,216 + BN 128 -> 13,952
#   stage2 other: 2 * 9,216 + 128                                -> 18,560 each (n-1 blocks)
#   stage3 first: 3*3*32*64 = 18,432 + 3*3*64*64 = 36,864 + 256  -> 55,552
#   stage3 other: 2 * 36,864 + 256                               -> 73,984 each (n-1 blocks)
#   total(n) = 1,114 + 13,952 + 55,552 + 4,672 n + (18,560 + 73,984)(n-1)
#            = 70,618 + 4,672 n + 92,544 (n-1)
#   n=1 (ResNet-8):  70,618 +  4,672            =  75,290
#   n=3 (ResNet-20): 70,618 + 14,016 + 185,088  = 269,722  (He et al.: 0.27M)
#   n=5 (ResNet-32): 70,618 + 23,360 + 370,176  = 464,154  (He et al.: 0.46M)
#   without BN: BN params 32 + 448 n are replaced by biases 16 + 224 n, i.e. minus 16 + 224 n:
#   ResNet-8 75,290 - 240 = 75,050; ResNet-20 269,722 - 688 = 269,034;
#   ResNet-32 464,154 - 1,136 = 463,018
#
# ResNet-50 (checked against keras.applications in test_imagenet.py): 25,557,032 with BN
# at 1000 classes, of which the classifier is 2,048*1,000+1,000 = 2,049,000; at 10 classes
# it is 2,048*10+10 = 20,490 -> 23,528,522. The 53 convs output 26,560 channels in all
# (stem 64; stage widths w = 64, 128, 256, 512 with n = 3, 4, 6, 3 blocks give
# n*6w + 4w each: 1,408 + 3,584 + 10,240 + 11,264), so without BN: 23,501,962.
PARAMS = {
    ("alexnet_reduced", "none"): 472_794,
    ("alexnet_reduced", "batch"): 474_106,
    ("resnet8", "none"): 75_050,
    ("resnet8", "batch"): 75_290,
    ("resnet20", "none"): 269_034,
    ("resnet20", "batch"): 269_722,
    ("resnet32", "none"): 463_018,
    ("resnet32", "batch"): 464_154,
    ("resnet50", "none"): 23_501_962,
    ("resnet50", "batch"): 23_528_522,
}
# Convolution + dense layers: AlexNet 5 + 3; ResNet 6n+2 = depth; ResNet-50 53 + 1.
WEIGHT_LAYERS = {"alexnet_reduced": 8, "resnet8": 8, "resnet20": 20, "resnet32": 32,
                 "resnet50": 54}


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("norm", NORMS)
def test_builds_logits_and_pinned_parameter_count(name, norm):
    keras.utils.set_random_seed(0)
    model = models.build(name, norm=norm, num_classes=10, input_shape=(32, 32, 3))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)

    logits = model(x, training=True)

    assert isinstance(model, keras.Model) and type(model).__name__ == "Functional"
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits.numpy()))
    assert _trainable_count(model) == PARAMS[(name, norm)]
    # Logits, not probabilities: no softmax at the end.
    assert model.layers[-1].activation is keras.activations.linear


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("norm", NORMS)
def test_builds_on_8x8_inputs(name, norm):
    model = models.build(name, norm=norm, input_shape=(8, 8, 3), num_classes=7, bn_batch_size=2)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    for training in (True, False):
        logits = model(x, training=training)
        assert logits.shape == (4, 7) and np.all(np.isfinite(logits.numpy()))


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("norm", NORMS)
def test_layer_structure(name, norm):
    model = models.build(name, norm=norm, input_shape=(8, 8, 3))
    convs = _layers_of(model, keras.layers.Conv2D)
    dense = _layers_of(model, keras.layers.Dense)
    bns = _layers_of(model, SubBatchNormalization)
    assert len(convs) + len(dense) == WEIGHT_LAYERS[name]
    # A conv bias only where no normalization follows; dense layers always keep theirs.
    assert all(conv.use_bias == (norm == "none") for conv in convs)
    assert all(layer.use_bias for layer in dense)
    expected_bns = 0 if norm == "none" else len(convs) + len(dense) - 1  # all but the logits
    assert len(bns) == expected_bns


def test_alexnet_norm_dense_false_normalizes_convs_only():
    model = models.build("alexnet_reduced", norm="batch", norm_dense=False)
    bns = _layers_of(model, SubBatchNormalization)
    assert len(bns) == 5
    assert all(bn.name.startswith("conv") for bn in bns)
    assert _trainable_count(model) == 473_082  # see PARAMS comment


def test_resnet_ignores_norm_dense():
    with_dense = models.build("resnet8", norm_dense=True, input_shape=(8, 8, 3))
    without = models.build("resnet8", norm_dense=False, input_shape=(8, 8, 3))
    assert _trainable_count(with_dense) == _trainable_count(without)


def test_bn_settings_reach_every_bn_layer():
    model = models.build("resnet8", bn_batch_size=4, bn_momentum=0.5, bn_epsilon=1e-5,
                         input_shape=(8, 8, 3))
    bns = _layers_of(model, SubBatchNormalization)
    assert bns and all((bn.bn_batch_size, bn.momentum, bn.epsilon) == (4, 0.5, 1e-5) for bn in bns)


@pytest.mark.parametrize("name, layer_name", [("alexnet_reduced", "fc1"),
                                              ("resnet20", "stage3_block2_conv1")])
def test_kernels_are_he_normal(name, layer_name):
    keras.utils.set_random_seed(1)
    model = models.build(name)
    kernel = model.get_layer(layer_name).kernel.numpy()
    fan_in = int(np.prod(kernel.shape[:-1]))  # k*k*Cin for convs, inputs for dense
    assert kernel.size > 30_000  # enough samples for a 10% tolerance on the std
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / fan_in), rtol=0.1)
    assert abs(kernel.mean()) < 0.1 * np.sqrt(2.0 / fan_in)
    for layer in _layers_of(model, (keras.layers.Conv2D, keras.layers.Dense)):
        if layer.use_bias:
            assert not np.any(layer.bias.numpy())


def test_option_a_shortcut_is_subsample_and_zero_pad():
    # With zero kernels and no norm the residual branch of the first stage-2 block is zero,
    # so the block outputs relu(shortcut) = relu(x[:, ::2, ::2, :] with 8 zero channels on
    # each side of the 16 real ones).
    model = models.build("resnet8", norm="none", input_shape=(8, 8, 3))
    for layer in _layers_of(model, keras.layers.Conv2D):
        layer.kernel.assign(np.zeros(layer.kernel.shape))
    block = keras.Model(model.get_layer("stage2_block1_conv1_pad").input,
                        model.get_layer("stage2_block1_relu").output)
    feature = np.random.default_rng(3).normal(size=(2, 8, 8, 16)).astype(np.float32)

    got = block(feature).numpy()

    zeros = np.zeros((2, 4, 4, 8))
    want = np.concatenate([zeros, np.maximum(feature[:, ::2, ::2, :], 0), zeros], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _numpy_conv(x, kernel, stride, pad):
    """Zero-pad `pad` pixels on every side, then cross-correlate with `stride`, float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    rows, cols = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], rows, cols, kernel.shape[-1]))
    for i in range(rows):
        for j in range(cols):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, kernel.astype(np.float64))
    return out


def _submodel(model, first, last):
    return keras.Model(model.get_layer(first).input, model.get_layer(last).output)


@pytest.mark.parametrize("pixel", [(2, 4), (3, 5), (6, 0)])
def test_strided_conv_is_centred_on_the_pixel_the_shortcut_keeps(pixel):
    # A delta image through the stage-2 strided conv with only the centre tap set (input
    # channel c to output channel c + 8, the shortcut's slot for c): the output must be the
    # option-A shortcut, x[2i, 2j] with 8 zero channels each side. An even pixel (2a, 2b)
    # lands on (a, b); an odd one is skipped by both. "same" padding would pick 2i + 1.
    model = models.build("resnet8", norm="none", input_shape=(8, 8, 3))
    conv = model.get_layer("stage2_block1_conv1")
    kernel = np.zeros(conv.kernel.shape, np.float32)
    for c in range(16):
        kernel[1, 1, c, c + 8] = 1.0
    conv.kernel.assign(kernel)
    delta = np.zeros((1, 8, 8, 16), np.float32)
    delta[0, pixel[0], pixel[1], 3] = 1.0

    got = _submodel(model, "stage2_block1_conv1_pad", "stage2_block1_conv1")(delta).numpy()

    want = np.zeros((1, 4, 4, 32))
    if pixel[0] % 2 == 0 and pixel[1] % 2 == 0:
        want[0, pixel[0] // 2, pixel[1] // 2, 3 + 8] = 1.0
    np.testing.assert_array_equal(got, want)


def test_strided_conv_is_a_pad_1_convolution():
    keras.utils.set_random_seed(4)
    model = models.build("resnet8", norm="none", input_shape=(8, 8, 3))
    conv = model.get_layer("stage3_block1_conv1")
    conv.bias.assign(np.random.default_rng(8).normal(size=conv.bias.shape))
    x = np.random.default_rng(9).normal(size=(2, 4, 4, 32)).astype(np.float32)

    got = _submodel(model, "stage3_block1_conv1_pad", "stage3_block1_conv1")(x).numpy()

    want = _numpy_conv(x, conv.kernel.numpy(), stride=2, pad=1) + conv.bias.numpy()
    assert got.shape == (2, 2, 2, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def resnet50_16px():
    keras.utils.set_random_seed(5)
    return models.build("resnet50", norm="none", input_shape=(16, 16, 3), num_classes=2)


def test_resnet50_stem_conv_pads_3_and_pool_matches_caffe(resnet50_16px):
    # He et al.'s released model: conv1 7x7/2 pad 3; pool1 3x3/2 without padding, output
    # size rounded up, so window i covers rows 2i..2i+2, clipped at the edge.
    model = resnet50_16px
    conv = model.get_layer("stem_conv")
    conv.bias.assign(np.random.default_rng(10).normal(size=conv.bias.shape))
    x = np.random.default_rng(11).normal(size=(2, 16, 16, 3)).astype(np.float32)

    stem = _submodel(model, "stem_conv_pad", "stem_conv")(x).numpy()
    want = _numpy_conv(x, conv.kernel.numpy(), stride=2, pad=3) + conv.bias.numpy()
    np.testing.assert_allclose(stem, want, rtol=1e-4, atol=1e-4)

    relu = np.maximum(want, 0)  # 8x8
    pooled = np.stack([np.stack([relu[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                                 for j in range(4)], 1) for i in range(4)], 1)
    got = _submodel(model, "stem_conv_pad", "stem_pool")(x).numpy()
    np.testing.assert_allclose(got, pooled, rtol=1e-4, atol=1e-4)


def test_resnet50_strided_1x1_convs_sample_even_pixels_in_both_branches(resnet50_16px):
    model = resnet50_16px
    x = np.random.default_rng(12).normal(size=(1, 4, 4, 256)).astype(np.float32)
    for name in ("stage2_block1_conv1", "stage2_block1_shortcut"):
        conv = model.get_layer(name)
        got = conv(x).numpy()
        want = np.einsum("nhwc,co->nhwo", x[:, ::2, ::2].astype(np.float64),
                         conv.kernel.numpy()[0, 0]) + conv.bias.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_decayed_variables_are_exactly_the_kernels(name):
    model = models.build(name, norm="batch", input_shape=(8, 8, 3))
    decayed = models.decayed_variables(model)
    kernels = [layer.kernel for layer in _layers_of(model, (keras.layers.Conv2D,
                                                            keras.layers.Dense))]
    assert len(decayed) == WEIGHT_LAYERS[name]
    assert {id(v) for v in decayed} == {id(v) for v in kernels}
    assert all(v.name == "kernel" for v in decayed)
    excluded = {id(v) for bn in _layers_of(model, SubBatchNormalization)
                for v in bn.weights}
    excluded |= {id(layer.bias) for layer in _layers_of(model, keras.layers.Dense)}
    assert not excluded & {id(v) for v in decayed}
    everything = models.decayed_variables(model, scope="all")
    assert {id(v) for v in everything} == {id(v) for v in model.trainable_variables}


def test_decayed_variables_unknown_scope():
    model = models.build("resnet8", input_shape=(8, 8, 3))
    with pytest.raises(ConfigError, match=r"^--weight_decay_on=bias is unknown"):
        models.decayed_variables(model, scope="bias")


def test_registries():
    assert models.spec("alexnet_reduced").weight_decay == 5e-4
    assert all(models.spec(f"resnet{d}").weight_decay == 1e-4 for d in (8, 20, 32))
    with pytest.raises(ConfigError, match=r"^--model=vgg is unknown; choose one of alexnet_"
                                          r"reduced, resnet8, resnet20, resnet32, resnet50$"):
        models.build("vgg")
    with pytest.raises(ConfigError, match="--norm=xyz"):
        models.build("resnet8", norm="xyz")


def test_fit_step_updates_moving_statistics():
    model = models.build("resnet8", input_shape=(8, 8, 3), bn_batch_size=2, bn_momentum=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(4).normal(size=(8, 8, 8, 3)).astype(np.float32) + 1.0
    y = np.arange(8) % 10
    bn = model.get_layer("stem_norm")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.all(bn.moving_mean.numpy() != 0)
    assert np.all(np.isfinite(model.predict(x, verbose=0)))


def test_mixed_precision_keeps_float32_logits():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.build("resnet8", input_shape=(8, 8, 3), bn_batch_size=2)
        x = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype(np.float32)
        logits = model(x, training=True)
        assert model.get_layer("stem_norm").compute_dtype == "float16"
    finally:
        keras.config.set_dtype_policy(previous)
    assert logits.dtype == "float32" and np.all(np.isfinite(logits.numpy()))


# Every normalization in every model; instance statistics need spatial inputs, so AlexNet
# leaves its dense layers unnormalized with those.
NEW_NORMS = ("batch_renorm", "group", "instance", "layer", "mix")


# resnet20/32 share resnet8's builder; ResNet-50 takes seconds to build: those run in
# `make test-all`.
@pytest.mark.parametrize("name", [n if n in ("alexnet_reduced", "resnet8")
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in models.MODELS])
@pytest.mark.parametrize("norm", NEW_NORMS)
def test_every_norm_builds_and_trains_in_every_model(name, norm):
    side = 32 if name == "resnet50" else 8  # ResNet-50 downsamples 32x
    keras.utils.set_random_seed(0)
    model = models.build(name, norm=norm, input_shape=(side, side, 3), num_classes=5,
                         norm_dense=norm != "instance", bn_batch_size=2,
                         gn_groups=models.spec(name).gn_groups)
    x = np.random.default_rng(2).normal(size=(4, side, side, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_sum(logits ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    assert logits.shape == (4, 5) and np.all(np.isfinite(logits.numpy()))
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert np.all(np.isfinite(model(x, training=False).numpy()))
