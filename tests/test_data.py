"""Tests for sbt_keras.data: readers checked against independent numpy parses, the
augmentation checked against a hand-written numpy crop, and the pipeline's
determinism/resume contract checked on tiny arrays."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import sbt_keras.data as data
from sbt_keras.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def _np_parse(path, label_bytes, count):
    """Independent parse of the first `count` records of a CIFAR binary file."""
    rec = np.fromfile(path, np.uint8).reshape(-1, label_bytes + 3072)[:count]
    labels = rec[:, label_bytes - 1].astype(np.int32)
    images = rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels, rec


def _write_cifar10_layout(root, records=(2,) * 6):
    """Tiny valid CIFAR-10 files (zeros) with the given record counts."""
    os.makedirs(root, exist_ok=True)
    for name, n in zip(CIFAR10_FILES, records):
        np.zeros(n * 3073, np.uint8).tofile(os.path.join(root, name))


# ---------------------------------------------------------------- binary reader


def test_cifar10_binary_matches_numpy_parse(cifar10_dir):
    splits = data.load("cifar10", cifar_dir=cifar10_dir)
    assert splits.num_classes == 10
    assert splits.train.images.shape == (4660, 32, 32, 3)
    assert splits.test.images.shape == (846, 32, 32, 3)
    assert splits.train.images.dtype == np.uint8 and splits.train.labels.dtype == np.int32
    for arrays in (splits.train, splits.test):
        assert arrays.labels.min() >= 0 and arrays.labels.max() <= 9

    # The published CIFAR-10 label sequences: data_batch_1 opens frog, truck, truck, deer,
    # automobile, ...; test_batch opens cat, ship, ship, airplane, frog, ...
    np.testing.assert_array_equal(splits.train.labels[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
    np.testing.assert_array_equal(splits.test.labels[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    bin_dir = os.path.join(cifar10_dir, "cifar-10-batches-bin")
    for arrays, fname in ((splits.train, "data_batch_1.bin"), (splits.test, "test_batch.bin")):
        images, labels, rec = _np_parse(os.path.join(bin_dir, fname), 1, 10)
        np.testing.assert_array_equal(arrays.labels[:10], labels)
        np.testing.assert_array_equal(arrays.images[:10], images)
        # HWC with RGB planes: pixel (0, 0) is bytes 1, 1+1024, 1+2048 of the record.
        np.testing.assert_array_equal(arrays.images[0, 0, 0], rec[0, [1, 1 + 1024, 1 + 2048]])
        # Row-major within a plane: pixel (1, 2) red is byte 1 + 32 + 2.
        assert arrays.images[0, 1, 2, 0] == rec[0, 1 + 32 + 2]

    # Train files are concatenated in order: record 0 of data_batch_2 follows batch 1.
    per_file = 4660 // 5
    images2, labels2, _ = _np_parse(os.path.join(bin_dir, "data_batch_2.bin"), 1, 1)
    assert splits.train.labels[per_file] == labels2[0]
    np.testing.assert_array_equal(splits.train.images[per_file], images2[0])


def test_cifar100_layout_reads_fine_label(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-100-binary"  # nested layout, path given is the parent
    root.mkdir()
    expected = {}
    for name, n in (("train.bin", 5), ("test.bin", 3)):
        coarse = rng.integers(0, 20, n, dtype=np.uint8)
        fine = rng.integers(20, 100, n, dtype=np.uint8)  # disjoint from coarse on purpose
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        np.concatenate([coarse[:, None], fine[:, None], pixels], axis=1).tofile(root / name)
        expected[name] = (fine, pixels.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))

    info = data.describe("cifar100", cifar_dir=str(tmp_path))
    assert (info.num_train, info.num_test, info.num_classes) == (5, 3, 100)
    splits = data.load("cifar100", cifar_dir=str(tmp_path))
    for arrays, name in ((splits.train, "train.bin"), (splits.test, "test.bin")):
        np.testing.assert_array_equal(arrays.labels, expected[name][0])
        np.testing.assert_array_equal(arrays.images, expected[name][1])


def test_check_dir_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="--cifar_dir"):
        data.cifar_binary.check_dir("cifar10", str(tmp_path / "nope"))


def test_check_dir_missing_file(tmp_path):
    _write_cifar10_layout(str(tmp_path))
    os.remove(tmp_path / "data_batch_3.bin")
    with pytest.raises(ConfigError, match="--cifar_dir") as err:
        data.describe("cifar10", cifar_dir=str(tmp_path))
    assert "data_batch_3.bin" in str(err.value)
    assert "\n" not in str(err.value)


def test_check_dir_empty_file(tmp_path):
    _write_cifar10_layout(str(tmp_path), records=(2, 2, 2, 2, 2, 0))
    with pytest.raises(ConfigError, match="--cifar_dir.*test_batch.bin.*empty"):
        data.cifar_binary.check_dir("cifar10", str(tmp_path))


def test_check_dir_truncated_file(cifar10_dir, tmp_path):
    src = os.path.join(cifar10_dir, "cifar-10-batches-bin")
    dst = tmp_path / "cifar-10-batches-bin"
    shutil.copytree(src, dst)
    os.chmod(dst, 0o755)  # the shared copy may be read-only; keep tmp cleanup working
    raw = (dst / "data_batch_4.bin").read_bytes()
    os.chmod(dst / "data_batch_4.bin", 0o644)
    (dst / "data_batch_4.bin").write_bytes(raw[:-5])
    with pytest.raises(ConfigError, match="truncated record") as err:
        data.cifar_binary.check_dir("cifar10", str(tmp_path))
    assert "--cifar_dir" in str(err.value) and "data_batch_4.bin" in str(err.value)


# ---------------------------------------------------------------- describe()


def test_describe_subset_and_caps(cifar10_dir):
    info = data.describe("cifar10", cifar_dir=cifar10_dir)
    assert info == data.DataInfo(4660, 846, 10, (32, 32, 3))
    capped = data.describe("cifar10", cifar_dir=cifar10_dir, train_examples=100, test_examples=7)
    assert (capped.num_train, capped.num_test) == (100, 7)
    with pytest.raises(ConfigError, match="--train_examples=4661"):
        data.describe("cifar10", cifar_dir=cifar10_dir, train_examples=4661)
    with pytest.raises(ConfigError, match="--test_examples=847"):
        data.describe("cifar10", cifar_dir=cifar10_dir, test_examples=847)


def test_describe_without_files():
    assert data.describe("cifar10") == data.DataInfo(50000, 10000, 10, (32, 32, 3))
    assert data.describe("cifar100").num_classes == 100
    info = data.describe("synthetic", image_size=16, num_classes=4, synthetic_train=40, synthetic_test=9)
    assert info == data.DataInfo(40, 9, 4, (16, 16, 3))
    assert data.describe("cifar10", train_examples=50000).num_train == 50000
    with pytest.raises(ConfigError, match="--train_examples=50001"):
        data.describe("cifar10", train_examples=50001)
    with pytest.raises(ConfigError, match="--test_examples=-1"):
        data.describe("cifar10", test_examples=-1)
    with pytest.raises(ConfigError, match="--num_classes=1"):
        data.describe("synthetic", num_classes=1)


def test_describe_unknown_dataset():
    with pytest.raises(ConfigError) as err:
        data.describe("foo")
    msg = str(err.value)
    assert "--dataset=foo" in msg
    assert all(name in msg for name in data.DATASETS)


def test_import_does_not_load_tensorflow():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", "import sys, sbt_keras.data; print('tensorflow' in sys.modules)"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- augmentation


def _coordinate_images(batch, size=32):
    """image[i, y, x] = ((y+1)*100 + (x+1), i, 7): padding (0) is distinguishable."""
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = np.zeros((batch, size, size, 3), np.float32)
    img[..., 0] = (y + 1) * 100 + (x + 1)
    img[..., 1] = np.arange(batch)[:, None, None]
    img[..., 2] = 7
    return img


def test_pad_crop_flip_matches_numpy_per_example():
    import tensorflow as tf

    from sbt_keras.data import augment

    images = _coordinate_images(64)
    out = augment.pad_crop_flip(tf.constant(images), tf.constant([3, 4], tf.int64)).numpy()
    assert out.shape == images.shape

    offsets, flips = [], []
    for i in range(64):
        # The centre pixel is never padding (offset <= 8, pad 4), so it pins the crop.
        centre = int(out[i, 16, 16, 0])
        src_y, src_x = centre // 100 - 1, centre % 100 - 1
        flipped = out[i, 16, 17, 0] < out[i, 16, 15, 0]
        oy = src_y - 16 + 4
        # Column c of the output reads padded column ox + c, or ox + 31 - c if flipped.
        ox = src_x + 4 - (31 - 16 if flipped else 16)
        assert 0 <= oy <= 8 and 0 <= ox <= 8
        expected = np.pad(images[i], [(4, 4), (4, 4), (0, 0)])[oy : oy + 32, ox : ox + 32]
        if flipped:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out[i], expected)
        offsets.append((oy, ox))
        flips.append(flipped)

    oys, oxs = zip(*offsets)
    assert len(set(oys)) > 3 and len(set(oxs)) > 3  # independent per example
    assert len(set(offsets)) > 10
    assert 0 < sum(flips) < 64


def test_pad_crop_flip_seeding():
    import tensorflow as tf

    from sbt_keras.data import augment

    images = tf.constant(_coordinate_images(16))
    a = augment.pad_crop_flip(images, tf.constant([1, 2], tf.int32)).numpy()
    b = augment.pad_crop_flip(images, tf.constant([1, 2], tf.int32)).numpy()
    c = augment.pad_crop_flip(images, tf.constant([1, 3], tf.int32)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_channel_stats_and_standardize():
    from sbt_keras.data import augment

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1500, 4, 4, 3), dtype=np.uint8)  # > one chunk
    mean, std = augment.channel_stats(images)
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-5)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    z = augment.standardize(images.astype(np.float32), mean, std)
    np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.reshape(-1, 3).std(0), 1, atol=1e-4)


# ---------------------------------------------------------------- pipelines


def _indexed_arrays(n, size=8):
    """Example i is the constant image i with label i."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    return data.Arrays(np.ascontiguousarray(images), np.arange(n, dtype=np.int32))


def _collect(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


MEAN = np.array([10.0, 20.0, 30.0], np.float32)
STD = np.array([2.0, 4.0, 8.0], np.float32)


def test_train_dataset_epochs_batches_and_standardization():
    from sbt_keras.data import pipeline

    arrays = _indexed_arrays(50)
    ds = pipeline.train_dataset(arrays, batch_size=8, seed=5, epochs=3, augment=False, mean=MEAN, std=STD)
    assert int(ds.cardinality()) == 3 * 6
    batches = _collect(ds)
    assert len(batches) == 18
    orders = []
    for e in range(3):
        labels = np.concatenate([y for _, y in batches[6 * e : 6 * e + 6]])
        assert len(np.unique(labels)) == 48  # each index at most once, 2 dropped
        assert set(labels) <= set(range(50))
        orders.append(labels)
    assert not np.array_equal(orders[0], orders[1])
    for x, y in batches:
        assert x.shape == (8, 8, 8, 3) and x.dtype == np.float32 and y.dtype == np.int32
        expected = (arrays.images[y].astype(np.float32) - MEAN) / STD
        np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_train_dataset_resume_and_seed():
    from sbt_keras.data import pipeline

    arrays = _indexed_arrays(40)
    kw = dict(batch_size=8, epochs=3, augment=True, mean=MEAN, std=STD)
    full = _collect(pipeline.train_dataset(arrays, seed=9, **kw))
    again = _collect(pipeline.train_dataset(arrays, seed=9, **kw))
    tail = _collect(pipeline.train_dataset(arrays, seed=9, start_epoch=1, **kw))
    other = _collect(pipeline.train_dataset(arrays, seed=10, **kw))

    assert len(full) == 15 and len(tail) == 10
    for (xa, ya), (xb, yb) in zip(full, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[5:], tail):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(np.concatenate([y for _, y in full]), np.concatenate([y for _, y in other]))


def test_train_dataset_pads_with_black():
    from sbt_keras.data import pipeline

    arrays = data.Arrays(np.full((64, 8, 8, 3), 200, np.uint8), np.zeros(64, np.int32))
    (x, _), = _collect(pipeline.train_dataset(arrays, batch_size=64, seed=0, epochs=1, augment=True, mean=MEAN, std=STD))
    raw = np.round(x * STD + MEAN)
    assert set(np.unique(raw)) == {0.0, 200.0}  # padding is 0 in pixel space


def test_train_dataset_batch_too_large():
    from sbt_keras.data import pipeline

    with pytest.raises(ConfigError, match="--batch_size=11"):
        pipeline.train_dataset(_indexed_arrays(10), batch_size=11, seed=0, epochs=1, augment=False, mean=MEAN, std=STD)


def test_eval_dataset_keeps_order_and_pads_the_remainder_with_weight_zero():
    from sbt_keras.data import pipeline

    arrays = _indexed_arrays(50)
    batches = [tuple(t.numpy() for t in b) for b in
               pipeline.eval_dataset(arrays, batch_size=8, mean=MEAN, std=STD)]
    assert [len(y) for _, y, _ in batches] == [8] * 7  # 50 examples + 6 weight-0 copies
    y = np.concatenate([y for _, y, _ in batches])
    w = np.concatenate([w for _, _, w in batches])
    np.testing.assert_array_equal(w, [1.0] * 50 + [0.0] * 6)
    np.testing.assert_array_equal(y[:50], np.arange(50))
    x = np.concatenate([x for x, _, _ in batches])[:50]
    np.testing.assert_allclose(x, (arrays.images.astype(np.float32) - MEAN) / STD, rtol=1e-6)


def test_pad_with_weights_streams():
    from sbt_keras.data import pipeline

    examples = tf.data.Dataset.from_tensor_slices((np.arange(5.0), np.arange(5)))
    padded = pipeline.pad_with_weights(examples, num_examples=5, batch_size=2)
    batches = list(padded.batch(2))
    assert [b[0].numpy().tolist() for b in batches] == [[0, 1], [2, 3], [4, 0]]
    assert [b[2].numpy().tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    exact = list(pipeline.pad_with_weights(examples.take(4), num_examples=4,
                                           batch_size=2).batch(2))
    assert len(exact) == 2 and exact[-1][2].numpy().tolist() == [1, 1]
    # A stream of single tensors, not tuples (eval_dataset pads its indices).
    indices = pipeline.pad_with_weights(tf.data.Dataset.range(3), num_examples=3, batch_size=4)
    assert [(int(i), float(w)) for i, w in indices] == [(0, 1), (1, 1), (2, 1), (0, 0)]


@pytest.mark.parametrize("settings, message", [
    (dict(batch_size=0), "--batch_size=0 must be at least 1"),
    (dict(batch_size=11), "--batch_size=11 is larger than the 10 training examples"),
    (dict(start_epoch=4), "start epoch 4 is outside 0..3"),
    (dict(start_epoch=-1), "start epoch -1 is outside 0..3"),
    (dict(start_step=2), "start step 2 is outside epoch 0's 2 batches"),
    (dict(start_epoch=3, start_step=1), "start step 1 is outside epoch 3's 2 batches"),
])
def test_check_train_steps_refuses(settings, message):
    from sbt_keras.data import pipeline

    kw = dict(batch_size=4, epochs=3, start_epoch=0, start_step=0)
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.check_train_steps(10, **{**kw, **settings})


def test_check_train_steps_counts_full_batches():
    from sbt_keras.data import pipeline

    kw = dict(batch_size=4, epochs=3)
    assert pipeline.check_train_steps(10, start_epoch=0, start_step=0, **kw) == 2  # 10 // 4
    assert pipeline.check_train_steps(10, start_epoch=2, start_step=1, **kw) == 2
    assert pipeline.check_train_steps(10, start_epoch=3, start_step=0, **kw) == 2  # finished
    with pytest.raises(ConfigError, match="--eval_batch_size=0"):
        pipeline.check_eval_batch_size(0)
    pipeline.check_eval_batch_size(1)


def test_apply_options_is_deterministic_with_the_given_sharding():
    from sbt_keras.data import pipeline

    policy = tf.data.experimental.AutoShardPolicy
    shared = pipeline.apply_options(tf.data.Dataset.range(4)).options()
    assert shared.deterministic and shared.experimental_distribute.auto_shard_policy == policy.DATA
    own = pipeline.apply_options(tf.data.Dataset.range(4), auto_shard=policy.OFF).options()
    assert own.deterministic and own.experimental_distribute.auto_shard_policy == policy.OFF


# ---------------------------------------------------------------- synthetic / tfds


def test_synthetic_deterministic_and_learnable():
    kw = dict(synthetic_train=200, synthetic_test=100, image_size=12, num_classes=5)
    a = data.load("synthetic", seed=3, **kw)
    b = data.load("synthetic", seed=3, **kw)
    c = data.load("synthetic", seed=4, **kw)
    assert a.train.images.shape == (200, 12, 12, 3) and a.test.images.shape == (100, 12, 12, 3)
    assert a.train.images.dtype == np.uint8 and a.train.labels.dtype == np.int32
    assert a.num_classes == 5 and set(a.train.labels) == set(range(5))
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)
    # Learnable: nearest class-mean colour (a feature crops and flips keep) beats chance easily.
    colour = lambda arr: arr.images.reshape(len(arr), -1, 3).mean(1)
    centres = np.stack([colour(a.train)[a.train.labels == k].mean(0) for k in range(5)])
    dist = ((colour(a.test)[:, None] - centres[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == a.test.labels).mean() > 0.6
    capped = data.load("synthetic", seed=3, train_examples=50, **kw)
    np.testing.assert_array_equal(capped.train.images, a.train.images[:50])


def test_tfds_path_with_mock(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=7):
        splits = data.load("cifar10", data_dir=str(tmp_path), download=False)
        assert splits.train.images.shape == (7, 32, 32, 3) and splits.train.images.dtype == np.uint8
        assert splits.test.labels.shape == (7,) and splits.test.labels.dtype == np.int32
        assert splits.num_classes == 10
        assert splits.train.labels.min() >= 0 and splits.train.labels.max() <= 9
        assert len(data.load("cifar10", data_dir=str(tmp_path), download=False, train_examples=5).train) == 5
        with pytest.raises(ConfigError, match="--train_examples=8"):
            data.load("cifar10", data_dir=str(tmp_path), download=False, train_examples=8)


def test_tfds_missing_data_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        data.load("cifar10", data_dir=str(tmp_path), download=False)
    assert "--cifar_dir" in str(err.value) and "--data_dir" in str(err.value)
    assert "\n" not in str(err.value)


def test_train_dataset_resume_mid_epoch():
    from sbt_keras.data import pipeline

    arrays = _indexed_arrays(40)
    kw = dict(batch_size=8, epochs=3, augment=True, mean=MEAN, std=STD, seed=4)
    full = _collect(pipeline.train_dataset(arrays, **kw))
    ds = pipeline.train_dataset(arrays, start_epoch=1, start_step=3, **kw)
    assert int(ds.cardinality()) == 10 - 3
    tail = _collect(ds)
    assert len(tail) == 7
    for (xa, ya), (xb, yb) in zip(full[5 + 3:], tail):  # epoch 1 batch 3 onwards, exactly
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ConfigError, match="start step 5"):
        pipeline.train_dataset(arrays, start_epoch=1, start_step=5, **kw)
