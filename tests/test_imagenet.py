"""ImageNet: ResNet-50 v1 checked against keras.applications and the published count, and
the streamed imagenet2012 pipeline checked on a mocked tfds builder whose JPEGs have
controlled sizes (normal and tiny), against independent crops and its own contracts."""

import collections
import os
import pathlib
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sbt_keras import models, results
from sbt_keras.models import resnet_imagenet
from sbt_keras.data import imagenet, pipeline
from sbt_keras.errors import ConfigError
from sbt_keras.layers import SubBatchNormalization

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- ResNet-50


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _convs(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


@pytest.fixture(scope="module")
def resnet50():
    return models.build("resnet50")


def test_resnet50_parameter_count_matches_keras_applications(resnet50):
    reference = keras.applications.ResNet50(weights=None)
    conv_biases = sum(_count([layer.bias]) for layer in _convs(reference))
    # Keras' application gives its convs biases; ours has none (BN follows every conv).
    # Everything else, BN gamma/beta and moving statistics included, is the same.
    assert conv_biases == 26_560
    trainable = _count(resnet50.trainable_variables)
    assert trainable == _count(reference.trainable_variables) - conv_biases
    assert trainable == 25_557_032  # He et al.'s "25.6M"
    assert _count(resnet50.non_trainable_variables) == _count(reference.non_trainable_variables)
    assert _count(resnet50.non_trainable_variables) == 53_120  # BN moving mean + variance
    # Same convolutions, kernel for kernel and stride for stride (keras' ResNet50 is v1).
    shapes = lambda m: collections.Counter((tuple(c.kernel.shape), c.strides) for c in _convs(m))
    assert shapes(resnet50) == shapes(reference)


def test_resnet50_layer_structure(resnet50):
    convs = _convs(resnet50)
    dense = [layer for layer in resnet50.layers if isinstance(layer, keras.layers.Dense)]
    assert len(convs) == 53 and len(dense) == 1
    assert len([c for c in convs if c.name.endswith("_shortcut")]) == 4
    assert not any(c.use_bias for c in convs)
    assert len([l for l in resnet50.layers if isinstance(l, SubBatchNormalization)]) == 53
    assert all(c.kernel_initializer.__class__.__name__ == "HeNormal" for c in convs + dense)
    # v1: the stride sits on the first 1x1 conv of stages 2-4, and on their projections.
    strided = {c.name for c in convs if c.strides == (2, 2)}
    assert strided == {"stem_conv"} | {f"stage{s}_block1_{c}" for s in (2, 3, 4)
                                       for c in ("conv1", "shortcut")}
    assert all(resnet50.get_layer(f"stage{s}_block1_conv1").kernel_size == (1, 1)
               for s in (2, 3, 4))
    assert resnet50.get_layer("stem_conv").kernel_size == (7, 7)
    # 224 -> 112 (stem) -> 56 (pool) -> 56, 28, 14, 7 at the end of the four stages.
    ends = {1: "stage1_block3", 2: "stage2_block4", 3: "stage3_block6", 4: "stage4_block3"}
    sizes = [resnet50.get_layer(f"{ends[s]}_relu").output.shape[1:] for s in (1, 2, 3, 4)]
    assert sizes == [(56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)]
    assert resnet50.output.shape == (None, 1000) and resnet50.output.dtype == "float32"
    assert dense[0].activation is keras.activations.linear


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_resnet50_small_input_forward(norm):
    model = models.build("resnet50", input_shape=(64, 64, 3), num_classes=10, norm=norm,
                         bn_batch_size=1)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits = model(x, training=True)
    assert logits.shape == (2, 10) and logits.dtype == "float32"
    assert np.all(np.isfinite(logits.numpy()))
    assert all(c.use_bias == (norm == "none") for c in _convs(model))


def test_resnet50_registered():
    assert models.spec("resnet50").weight_decay == 1e-4
    assert models.builder("resnet50") is resnet_imagenet.resnet50


# ---------------------------------------------------------------- preprocessing

MEAN = np.array(imagenet.MEAN, np.float32)
STD = np.array(imagenet.STD, np.float32)


def _normalized(x):
    return (np.asarray(x, np.float32) - MEAN) / STD


def _random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_eval_preprocess_centre_crop_without_resize():
    # Shorter side already 256: the resize is the identity and the crop is pure indexing.
    rows, cols = np.meshgrid(np.arange(256), np.arange(300), indexing="ij")
    image = np.stack([rows, cols % 256, cols // 256], axis=-1).astype(np.uint8)
    got = imagenet.eval_preprocess(image).numpy()
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    raw = got * STD + MEAN
    np.testing.assert_allclose(raw[..., 0], rows[16:240, 38:262], atol=1e-3)
    np.testing.assert_allclose(raw[..., 1] + 256 * raw[..., 2], cols[16:240, 38:262], atol=1e-3)


@pytest.mark.parametrize("shape, resized", [((300, 400), (256, 341)), ((400, 300), (341, 256)),
                                            ((5, 7), (256, 358))])
def test_eval_preprocess_matches_independent_resize_and_slice(shape, resized):
    image = _random_image(*shape)
    big = tf.image.resize(image, resized, method="bilinear", antialias=False).numpy()
    top, left = (resized[0] - 224) // 2, (resized[1] - 224) // 2
    want = _normalized(big[top:top + 224, left:left + 224])
    got = imagenet.eval_preprocess(tf.constant(image)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got, imagenet.eval_preprocess(image).numpy())


@pytest.mark.parametrize("shape", [(300, 400), (7, 5)])
def test_train_crop_params_ranges(shape):
    draws = [imagenet.train_crop_params(shape, tf.constant([s, 7], tf.int64)) for s in range(200)]
    scales, flips = [], []
    for scale, size, offset, flip in draws:
        scale, size, offset = int(scale), size.numpy(), offset.numpy()
        short, long_ = (0, 1) if shape[0] <= shape[1] else (1, 0)
        assert 256 <= scale <= 480
        assert size[short] == scale
        assert size[long_] == round(shape[long_] * scale / shape[short])
        assert np.all(offset >= 0) and np.all(offset + 224 <= size)  # window inside the image
        scales.append(scale)
        flips.append(bool(flip))
    assert min(scales) < 280 and max(scales) > 456 and len(set(scales)) > 100
    assert 0.35 < np.mean(flips) < 0.65


def test_train_preprocess_is_resize_crop_flip_of_its_params():
    image = _random_image(300, 400, seed=1)
    flipped_seen = set()
    for s in range(6):
        seed = tf.constant([s, 3], tf.int64)
        _, size, (top, left), flip = imagenet.train_crop_params(image.shape[:2], seed)
        big = tf.image.resize(image, size, method="bilinear", antialias=False).numpy()
        want = big[int(top):int(top) + 224, int(left):int(left) + 224]
        want = want[:, ::-1] if flip else want
        got = imagenet.train_preprocess(image, seed).numpy()
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, _normalized(want), rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(got, imagenet.train_preprocess(image, seed).numpy())
        flipped_seen.add(bool(flip))
    assert flipped_seen == {True, False}
    tiny = imagenet.train_preprocess(_random_image(5, 7), tf.constant([0, 1], tf.int64))
    assert tiny.shape == (224, 224, 3) and np.all(np.isfinite(tiny.numpy()))


# ---------------------------------------------------------------- mocked tfds

# Example i of the fake split: a JPEG of size _SIZES[i % 3], label i. Record "files" of
# _FILE_SIZE examples are permuted by ReadConfig.shuffle_seed when shuffle_files is set.
_SIZES = ((300, 400), (5, 7), (400, 300))
_NUM_FAKE = 20
_FILE_SIZE = 4
_SMALL = dict(crop=32, scale_range=(40, 56))  # fast variant for the stream contracts


def _fake_jpegs():
    if not hasattr(_fake_jpegs, "cache"):
        _fake_jpegs.cache = [tf.io.encode_jpeg(_random_image(*_SIZES[i % 3], seed=i)).numpy()
                             for i in range(_NUM_FAKE)]
    return _fake_jpegs.cache


def _fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Stands in for FileReaderBuilder._as_dataset; understands "name" and "name[:N]"."""
    del self
    assert decoders and isinstance(decoders["image"], tfds.decode.SkipDecoding)
    name, n = re.fullmatch(r"(\w+)(?:\[:(\d+)\])?", str(split)).groups()
    index = np.arange(int(n) if n else _NUM_FAKE)
    if shuffle_files:
        assert read_config.shuffle_seed is not None  # else tfds reads in a random order
        files = np.array_split(index, -(-len(index) // _FILE_SIZE))
        order = np.random.default_rng(read_config.shuffle_seed).permutation(len(files))
        index = np.concatenate([files[i] for i in order])
    jpegs = _fake_jpegs()
    return tf.data.Dataset.from_tensor_slices({
        "image": [jpegs[i] for i in index],
        "label": index.astype(np.int64) + (1000 if name == "validation" else 0),
        "file_name": [f"{name}_{i}.JPEG" for i in index],
    })


def _manual_dir(tmp_path):
    """A manual dir holding (empty) ILSVRC2012 archives: enough for check_available."""
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in imagenet.MANUAL_FILES:
        (manual / name).touch()
    return str(manual)


@pytest.fixture
def fake_imagenet(tmp_path):
    """Keyword arguments for the dataset functions, valid while the mock is active."""
    manual = _manual_dir(tmp_path)
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset):
        yield dict(data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def _collect(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


def _decoded(i):
    return tf.io.decode_jpeg(_fake_jpegs()[i], channels=3)


def test_train_batches_shapes_full_batches_and_cardinality(fake_imagenet):
    ds = imagenet.train_dataset(batch_size=4, seed=0, epochs=2, train_examples=10,
                                **fake_imagenet)
    assert int(ds.cardinality()) == 2 * 2  # 10 // 4 = 2 full batches per epoch
    batches = _collect(ds)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32 and np.all(np.isfinite(x))
        assert y.shape == (4,) and y.dtype == np.int32
    epochs = [np.concatenate([y for _, y in batches[e * 2:e * 2 + 2]]) for e in (0, 1)]
    for labels in epochs:
        assert len(set(labels)) == 8 and set(labels) <= set(range(10))  # first 10, 2 dropped
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_train_examples_are_preprocessed_with_their_own_seed(fake_imagenet):
    ds = imagenet.train_dataset(batch_size=3, seed=5, epochs=2, start_epoch=1, **_SMALL,
                                **fake_imagenet, train_examples=_NUM_FAKE)
    root = pipeline.root_seed(5)
    for step, (x, y) in enumerate(_collect(ds.take(2))):
        for j, label in enumerate(y):
            key = pipeline.stream_seed(root, imagenet._AUGMENT_STREAM, 1, step * 3 + j)
            want = imagenet.train_preprocess(_decoded(label), key, **_SMALL).numpy()
            np.testing.assert_array_equal(x[j], want)


def test_train_determinism_and_seed(fake_imagenet):
    kw = dict(batch_size=4, epochs=2, train_examples=_NUM_FAKE, **_SMALL, **fake_imagenet)
    first = _collect(imagenet.train_dataset(seed=3, **kw).take(2))
    again = _collect(imagenet.train_dataset(seed=3, **kw).take(2))
    other = _collect(imagenet.train_dataset(seed=4, **kw).take(2))
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_train_resume_mid_epoch_equals_uninterrupted_stream(fake_imagenet):
    kw = dict(batch_size=6, seed=2, epochs=2, train_examples=_NUM_FAKE, **_SMALL,
              **fake_imagenet)
    full = _collect(imagenet.train_dataset(**kw))
    assert len(full) == 2 * 3
    for start_epoch, start_step in ((0, 2), (1, 1)):
        ds = imagenet.train_dataset(start_epoch=start_epoch, start_step=start_step, **kw)
        skipped = start_epoch * 3 + start_step
        assert int(ds.cardinality()) == 6 - skipped
        tail = _collect(ds)
        assert len(tail) == 6 - skipped
        for (xa, ya), (xb, yb) in zip(full[skipped:], tail):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    assert int(imagenet.train_dataset(start_epoch=2, **kw).cardinality()) == 0


def test_train_bad_settings(fake_imagenet):
    kw = dict(seed=0, epochs=2, **fake_imagenet)
    with pytest.raises(ConfigError, match="--batch_size=11"):
        imagenet.train_dataset(batch_size=11, train_examples=10, **kw)
    with pytest.raises(ConfigError, match="start step 2"):
        imagenet.train_dataset(batch_size=4, train_examples=10, start_step=2, **kw)
    with pytest.raises(ConfigError, match=f"--train_examples={imagenet.NUM_TRAIN + 1}"):
        imagenet.train_dataset(batch_size=4, train_examples=imagenet.NUM_TRAIN + 1, **kw)


def test_eval_batches_order_padding_and_centre_crops(fake_imagenet):
    ds = imagenet.eval_dataset(batch_size=4, test_examples=10, **fake_imagenet)
    assert int(ds.cardinality()) == 3
    batches = _collect(ds)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    w = np.concatenate([b[2] for b in batches])
    assert x.shape == (12, 224, 224, 3) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(w, [1.0] * 10 + [0.0] * 2)
    np.testing.assert_array_equal(y, list(range(1000, 1010)) + [1000, 1000])
    for i in range(10):
        np.testing.assert_array_equal(x[i], imagenet.eval_preprocess(_decoded(i)).numpy())
    full = imagenet.eval_dataset(batch_size=8, test_examples=0, **fake_imagenet)
    assert int(full.cardinality()) == imagenet.NUM_VALIDATION // 8  # metadata-free: 50000
    with pytest.raises(ConfigError, match=f"--test_examples={imagenet.NUM_VALIDATION + 1}"):
        imagenet.eval_dataset(batch_size=8, test_examples=imagenet.NUM_VALIDATION + 1,
                              **fake_imagenet)
    with pytest.raises(ConfigError, match="--eval_batch_size=0"):
        imagenet.eval_dataset(batch_size=0, **fake_imagenet)


# ---------------------------------------------------------------- distributed input

# (workers W, replicas R): one worker with 1 or 2 replicas, two workers with 1 or 2 each.
_LAYOUTS = [(1, 1), (1, 2), (2, 2), (2, 4)]


def _context(workers, worker, replicas):
    # What tf.distribute hands to the dataset function of worker `worker`.
    return tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                      num_replicas_in_sync=replicas)


def _replica_batches(per_worker, workers, replicas, steps):
    """{(step, replica): batch} from each worker's per-replica batches: worker w's local
    replicas (global ids w*R/W ...) take its consecutive batches in turn, as tf.distribute's
    multi-device iterator hands them out (round robin)."""
    local = replicas // workers
    out = {}
    for worker, batches in enumerate(per_worker):
        assert len(batches) == steps * local
        for k, batch in enumerate(batches):
            step, j = divmod(k, local)
            out[step, worker * local + j] = batch
    return out


@pytest.mark.parametrize("workers, replicas", _LAYOUTS)
def test_train_worker_shares_are_slices_of_the_one_device_batches(fake_imagenet, workers,
                                                                  replicas):
    m = 8  # 20 examples: 2 global batches per epoch
    kw = dict(batch_size=m, seed=2, epochs=2, train_examples=_NUM_FAKE, **_SMALL,
              **fake_imagenet)
    one_device = _collect(imagenet.train_dataset(**kw))
    assert len(one_device) == 4
    per_replica = m // replicas
    for start_epoch, start_step in ((0, 0), (0, 1), (1, 1)):  # and resumed mid-epoch
        want = one_device[start_epoch * 2 + start_step:]
        per_worker = []
        for w in range(workers):
            ds = imagenet.train_dataset(input_context=_context(workers, w, replicas),
                                        start_epoch=start_epoch, start_step=start_step, **kw)
            assert int(ds.cardinality()) == len(want) * replicas // workers
            per_worker.append(_collect(ds))
        got = _replica_batches(per_worker, workers, replicas, len(want))
        for step, (x, y) in enumerate(want):
            for r in range(replicas):  # (a) replica r: examples [r*m/R, (r+1)*m/R) of the step
                gx, gy = got[step, r]
                assert gx.shape == (per_replica, 32, 32, 3) and gy.dtype == np.int32
                np.testing.assert_array_equal(gx, x[r * per_replica:(r + 1) * per_replica])
                np.testing.assert_array_equal(gy, y[r * per_replica:(r + 1) * per_replica])
            # (b) the replicas of all workers together: exactly the one-device global batch
            np.testing.assert_array_equal(
                np.concatenate([got[step, r][0] for r in range(replicas)]), x)
            np.testing.assert_array_equal(
                np.concatenate([got[step, r][1] for r in range(replicas)]), y)


@pytest.mark.parametrize("workers", [1, 2])
def test_train_workers_decode_only_their_share(fake_imagenet, monkeypatch, workers):
    decoded = []
    real_decode = imagenet._decode

    def counting_decode(image_bytes):
        image_bytes = tf.py_function(lambda b: decoded.append(1) or b, [image_bytes], tf.string)
        return real_decode(tf.ensure_shape(image_bytes, []))

    monkeypatch.setattr(imagenet, "_decode", counting_decode)
    kw = dict(batch_size=8, seed=2, epochs=1, train_examples=_NUM_FAKE, **_SMALL,
              **fake_imagenet)
    for w in range(workers):
        _collect(imagenet.train_dataset(input_context=_context(workers, w, 2), **kw))
    # 2 steps of m = 8: each worker decodes its 8 / W per step, 16 in all, however many W.
    assert len(decoded) == 16


@pytest.mark.parametrize("workers, replicas", [(1, 2), (2, 2), (2, 4)])
def test_eval_worker_shares_count_every_example_once(fake_imagenet, workers, replicas):
    m, num = 8, 10  # padded to 16: 2 global batches, the second with 6 weight-0 copies
    kw = dict(batch_size=m, test_examples=num, crop=32, **fake_imagenet)
    one_device = _collect(imagenet.eval_dataset(**kw))
    assert len(one_device) == 2
    per_replica = m // replicas
    per_worker = []
    for w in range(workers):
        ds = imagenet.eval_dataset(input_context=_context(workers, w, replicas), **kw)
        assert int(ds.cardinality()) == 2 * replicas // workers
        per_worker.append(_collect(ds))
    got = _replica_batches(per_worker, workers, replicas, 2)
    labels, weights = [], []
    for step, (x, y, wt) in enumerate(one_device):
        for r in range(replicas):
            gx, gy, gw = got[step, r]
            assert gx.shape == (per_replica, 32, 32, 3) and gw.dtype == np.float32
            part = slice(r * per_replica, (r + 1) * per_replica)
            np.testing.assert_array_equal(gx, x[part])
            np.testing.assert_array_equal(gy, y[part])
            np.testing.assert_array_equal(gw, wt[part])
            labels.extend(gy)
            weights.extend(gw)
    labels, weights = np.array(labels), np.array(weights)
    # Every real validation example exactly once with weight 1; the padding weighs 0.
    assert sorted(labels[weights == 1]) == list(range(1000, 1000 + num))
    assert np.sum(weights == 0) == 16 - num and set(weights) == {0.0, 1.0}


def test_mirrored_strategy_gets_consecutive_halves(fake_imagenet, mirrored):
    """The real tf.distribute path (one worker, 2 local replicas): each replica of step b
    holds its consecutive half of the one-device global batch b."""
    kw = dict(batch_size=4, seed=1, epochs=1, start_step=1, train_examples=_NUM_FAKE,
              **_SMALL, **fake_imagenet)
    want = _collect(imagenet.train_dataset(**kw))
    dist = imagenet.train_dataset(strategy=mirrored, **kw)
    steps = 0
    for (x, y), (wx, wy) in zip(dist, want, strict=True):
        xs = [t.numpy() for t in mirrored.experimental_local_results(x)]
        ys = [t.numpy() for t in mirrored.experimental_local_results(y)]
        np.testing.assert_array_equal(np.concatenate(xs), wx)
        np.testing.assert_array_equal(np.concatenate(ys), wy)
        assert [len(v) for v in ys] == [2, 2]
        steps += 1
    assert steps == 4  # 20 // 4 batches, one skipped

    ev = dict(batch_size=4, test_examples=6, crop=32, **fake_imagenet)
    want = _collect(imagenet.eval_dataset(**ev))
    for batch, wanted in zip(imagenet.eval_dataset(strategy=mirrored, **ev), want, strict=True):
        for got, w in zip(batch, wanted):
            np.testing.assert_array_equal(
                np.concatenate([t.numpy() for t in mirrored.experimental_local_results(got)]), w)


def test_distributed_input_bad_layouts(fake_imagenet, mirrored):
    kw = dict(seed=0, epochs=1, train_examples=_NUM_FAKE, **_SMALL, **fake_imagenet)
    with pytest.raises(ConfigError, match="batch size 6 cannot be split evenly over 4"):
        imagenet.train_dataset(batch_size=6, input_context=_context(2, 0, 4), **kw)
    with pytest.raises(ValueError, match="not both"):
        imagenet.train_dataset(batch_size=4, strategy=mirrored,
                               input_context=_context(1, 0, 2), **kw)


# ---------------------------------------------------------------- preparing the data


def test_only_the_chief_prepares(tmp_path, mirrored):
    assert imagenet._is_chief(None) and imagenet._is_chief(mirrored)
    manual = _manual_dir(tmp_path)  # preparable, but not prepared
    with pytest.raises(ConfigError, match="not the chief") as err:
        imagenet._builder(str(tmp_path / "tfds"), manual, chief=False)
    msg = str(err.value)
    assert "\n" not in msg and "tfds build imagenet2012" in msg and "docs/imagenet.md" in msg
    assert not (tmp_path / "tfds" / "imagenet2012").exists()  # nothing written


# ---------------------------------------------------------------- check_available


def test_check_available_without_data_or_archives(tmp_path):
    with pytest.raises(ConfigError) as err:
        imagenet.check_available(str(tmp_path / "tfds"), None)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("--data_dir", "--manual_dir", "docs/imagenet.md",
                   "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                   str(tmp_path / "tfds" / "downloads" / "manual")):
        assert needle in msg


def test_check_available_with_archives_or_prepared(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "ILSVRC2012_img_train.tar").touch()
    with pytest.raises(ConfigError, match="lacks ILSVRC2012_img_val.tar;"):
        imagenet.check_available(str(tmp_path / "tfds"), str(manual))
    (manual / "ILSVRC2012_img_val.tar").touch()
    imagenet.check_available(str(tmp_path / "tfds"), str(manual))  # tfds would prepare it

    default_manual = tmp_path / "tfds" / "downloads" / "manual"
    default_manual.mkdir(parents=True)
    for name in imagenet.MANUAL_FILES:
        (default_manual / name).touch()
    imagenet.check_available(str(tmp_path / "tfds"), None)

    # Prepared = tfds metadata in <data_dir>/imagenet2012/<version>; no archives needed.
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path / "prepared"))
    variant = tmp_path / "prepared" / "imagenet2012" / str(builder.version)
    variant.mkdir(parents=True)
    builder.info.write_to_directory(str(variant))
    imagenet.check_available(str(tmp_path / "prepared"), str(tmp_path / "nowhere"))

    (variant / "dataset_info.json").write_text("{}")  # damaged metadata
    with pytest.raises(ConfigError, match="tfds could not open imagenet2012") as err:
        imagenet.check_available(str(tmp_path / "prepared"), None)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- a whole run


def _fake_with_imagenet_labels(self, split, **kwargs):
    # The stream tests mark validation labels with +1000; a model needs them < 1000.
    ds = _fake_as_dataset(self, split, **kwargs)
    return ds.map(lambda ex: {**ex, "label": ex["label"] % imagenet.NUM_CLASSES})


def test_training_run_on_mocked_imagenet(tmp_path):
    from sbt_keras.config import Config
    from sbt_keras.train import train

    manual = _manual_dir(tmp_path)
    with tfds.testing.mock_data(as_dataset_fn=_fake_with_imagenet_labels):
        cfg = Config(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                     manual_dir=manual, model="resnet8", norm="batch", augment=True,
                     train_examples=8, test_examples=6, batch_size=4, eval_batch_size=4,
                     base_lr=2.0 ** -8, epochs=1, median_of=1,
                     output_dir=str(tmp_path / "run")).resolve()
        result = train(cfg)
    assert result["status"] == "completed" and result["steps"] == 2
    stored = results.read_yaml(tmp_path / "run" / "config.yaml")["derived"]
    assert stored["image_shape"] == [224, 224, 3] and stored["num_classes"] == 1000
    assert abs(result["test_accuracy"] * 6 - round(result["test_accuracy"] * 6)) < 1e-5


def _checkpoint(out):
    reader = tf.train.load_checkpoint(str(out / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name and "save_counter" not in name}


def test_mirrored_run_on_mocked_imagenet_matches_one_device(tmp_path, mirrored):
    """2 replicas of m/2 each (BN over m/2) equal one device with bn_batch_size = m/2:
    weights, BN statistics, optimizer step and the padded evaluation's metric totals."""
    from sbt_keras.config import Config
    from sbt_keras.train import train

    manual = _manual_dir(tmp_path)
    values = dict(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"), manual_dir=manual,
                  model="resnet8", norm="batch", augment=True, train_examples=8,
                  test_examples=6, batch_size=4, eval_batch_size=4, base_lr=2.0 ** -8,
                  epochs=1, median_of=1, seed=3)
    with tfds.testing.mock_data(as_dataset_fn=_fake_with_imagenet_labels):
        train(Config(**values, bn_batch_size=2, output_dir=str(tmp_path / "one")).resolve())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(Config(**values, output_dir=str(tmp_path / "two")).resolve(),
                           strategy=mirrored)
    assert result["status"] == "completed" and result["steps"] == 2
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    got, want = _checkpoint(tmp_path / "two"), _checkpoint(tmp_path / "one")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_missing_imagenet_is_one_line_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sbt_keras.run", "--dataset=imagenet2012", "--model=resnet50",
         f"--data_dir={tmp_path / 'tfds'}", "--base_lr=0.001", f"--output_dir={tmp_path / 'r'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--manual_dir" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()
