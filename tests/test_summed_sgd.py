"""The train step against independent computations of the paper's update (eq. 5 + L2)."""
import numpy as np
import pytest
import tensorflow as tf
import keras

from sbt_keras import models
from sbt_keras.layers import SubBatchNormalization
from sbt_keras.training.schedules import WarmupStepDecay
from sbt_keras.training.summed_sgd import SummedGradientModel, build_optimizer


def _batches(x, y, m):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(m, drop_remainder=True)


def _linear_softmax(dim, classes, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((dim,))
    dense = keras.layers.Dense(classes, kernel_initializer="he_normal",
                               bias_initializer=keras.initializers.RandomNormal(seed=1))
    return keras.Model(inputs, dense(inputs)), dense


@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_one_step_equals_closed_form_summed_gradient(m, weight_decay):
    # For logits z = xW + b and cross-entropy, dL_i/dW = x_i^T (softmax(z_i) - onehot(y_i)).
    rng = np.random.RandomState(m)
    x = rng.randn(m, 5).astype(np.float32)
    y = rng.randint(0, 3, size=m)
    net, dense = _linear_softmax(5, 3)
    model = SummedGradientModel(net, weight_decay, decayed_variables=[dense.kernel])
    base_lr = 0.05
    model.compile(optimizer=build_optimizer(base_lr))
    w0, b0 = (v.numpy().astype(np.float64) for v in (dense.kernel, dense.bias))

    model.fit(_batches(x, y, m), epochs=1, verbose=0)

    z = x.astype(np.float64) @ w0 + b0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(3)[y]
    grad_w = x.T.astype(np.float64) @ residual + m * weight_decay * w0  # sum + m*lambda*w
    grad_b = residual.sum(0)  # biases are not decayed
    np.testing.assert_allclose(dense.kernel.numpy(), w0 - base_lr * grad_w, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(dense.bias.numpy(), b0 - base_lr * grad_b, rtol=1e-5,
                               atol=1e-6)


def test_gradient_is_sum_of_per_example_gradients_for_a_conv_net():
    m, base_lr, weight_decay = 4, 0.01, 1e-3
    keras.utils.set_random_seed(3)
    net = models.build("resnet8", input_shape=(8, 8, 3), num_classes=5, norm="none")
    decayed = models.decayed_variables(net)
    rng = np.random.RandomState(0)
    x = rng.randn(m, 8, 8, 3).astype(np.float32)
    y = rng.randint(0, 5, size=m)
    before = [v.numpy().astype(np.float64) for v in net.trainable_variables]

    # Independent path: one example at a time, gradients summed by hand.
    total = [np.zeros_like(b) for b in before]
    for i in range(m):
        with tf.GradientTape() as tape:
            logits = net(x[i:i + 1], training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y[i:i + 1], logits,
                                                                from_logits=True)[0]
        for t, g in zip(total, tape.gradient(loss, net.trainable_variables)):
            t += g.numpy()
    decayed_ids = {id(v) for v in decayed}
    expected = [b - base_lr * (t + (m * weight_decay * b if id(v) in decayed_ids else 0))
                for b, t, v in zip(before, total, net.trainable_variables)]

    model = SummedGradientModel(net, weight_decay, decayed)
    model.compile(optimizer=build_optimizer(base_lr))
    model.fit(_batches(x, y, m), epochs=1, verbose=0)
    for v, e in zip(net.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6, err_msg=v.path)


@pytest.mark.parametrize("m", [2, 8])
def test_equals_mean_loss_sgd_with_eta_m_times_base_lr(m):
    # The paper's equivalence: eta_tilde on the sum == eta = m*eta_tilde on the mean loss
    # + (lambda/2)|w|^2. The reference is stock Keras: SGD on a mean loss with an L2
    # kernel regularizer, through compile/fit.
    base_lr, weight_decay, steps = 0.02, 5e-3, 3
    rng = np.random.RandomState(7)
    x = rng.randn(m * steps, 6).astype(np.float32)
    y = rng.randint(0, 4, size=m * steps)

    def build(regularizer):
        keras.utils.set_random_seed(11)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="relu", kernel_initializer="he_normal",
                                    kernel_regularizer=regularizer)(inputs)
        out = keras.layers.Dense(4, kernel_initializer="he_normal",
                                 kernel_regularizer=regularizer)(hidden)
        return keras.Model(inputs, out)

    reference = build(keras.regularizers.L2(weight_decay / 2))
    reference.compile(optimizer=keras.optimizers.SGD(m * base_lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    reference.fit(_batches(x, y, m), epochs=1, verbose=0)

    net = build(None)
    model = SummedGradientModel(net, weight_decay, models.decayed_variables(net))
    model.compile(optimizer=build_optimizer(base_lr))
    model.fit(_batches(x, y, m), epochs=1, verbose=0)
    for a, b in zip(net.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_mirrored_two_replicas_equals_single_device(norm, mirrored):
    # Same global batch m=8 for 3 steps. With BN, per-replica BN over 4 examples on 2
    # replicas must equal sub-batch BN with bn_batch_size=4 on one device.
    m, base_lr, weight_decay, steps = 8, 0.01, 1e-3, 3
    rng = np.random.RandomState(5)
    x = rng.randn(m * steps, 8, 8, 3).astype(np.float32)
    y = rng.randint(0, 10, size=m * steps).astype(np.int32)

    def run(strategy, init=None):
        with strategy.scope():
            keras.utils.set_random_seed(2)
            net = models.build("resnet8", input_shape=(8, 8, 3), num_classes=10, norm=norm,
                               bn_batch_size=4 if norm == "batch" else None)
            if init is not None:
                net.set_weights(init)
            start = net.get_weights()
            model = SummedGradientModel(net, weight_decay, models.decayed_variables(net))
            model.compile(optimizer=build_optimizer(base_lr))
        history = model.fit(_batches(x, y, m), epochs=1, verbose=0)
        return start, net.get_weights(), history.history["loss"][0]

    start, single, single_loss = run(tf.distribute.get_strategy())
    assert mirrored.num_replicas_in_sync == 2
    _, multi, multi_loss = run(mirrored, init=start)
    assert not all(np.array_equal(a, b) for a, b in zip(start, single))  # it did train
    for a, b in zip(single, multi):  # trainable and moving statistics alike
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(single_loss, multi_loss, rtol=1e-5)


@pytest.mark.parametrize("unrolled, block", [(4, 8), (3, 8), (2, 6)])
def test_unrolled_block_gives_the_same_updates(unrolled, block):
    # Unrolling only changes how the block's loop is traced: the weights after two blocks
    # (with BN and weight decay) must equal those of one step per loop iteration, bitwise.
    rng = np.random.RandomState(0)
    m = 4
    x = rng.randn(2 * block * m, 8, 8, 3).astype(np.float32)
    y = rng.randint(0, 5, size=2 * block * m)
    weights = []
    for unroll in (1, unrolled):
        keras.utils.set_random_seed(5)
        net = models.build("resnet8", input_shape=(8, 8, 3), num_classes=5, norm="batch",
                           bn_batch_size=2)
        model = SummedGradientModel(net, 1e-3, models.decayed_variables(net),
                                    unrolled_steps=unroll)
        model.compile(optimizer=build_optimizer(2.0 ** -6), steps_per_execution=block)
        model.fit(_batches(x, y, m), epochs=1, verbose=0, shuffle=False)
        assert int(model.optimizer.iterations.numpy()) == 2 * block
        weights.append([v.numpy() for v in net.variables])
    for reference, unrolled_value in zip(*weights):
        np.testing.assert_array_equal(unrolled_value, reference)


def _tiny_bn_net(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = SubBatchNormalization(bn_batch_size=2, momentum=0.5, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def _tiny_data(batches, m=4, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batches * m, 4, 4, 2).astype(np.float32)
    return x, rng.randint(0, 3, size=batches * m)


def test_save_and_load_round_trip(tmp_path):
    # Step 0 trains at the warm-up's 1/32, step 1 after the decay boundary: the next update
    # depends on the restored step too.
    net = _tiny_bn_net()
    model = SummedGradientModel(net, 1e-2, models.decayed_variables(net), unrolled_steps=2)
    model.compile(optimizer=build_optimizer(WarmupStepDecay(0.1, (1,), warmup_steps=1)))
    x, y = _tiny_data(2)
    model.fit(_batches(x[:4], y[:4], 4), verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.saving.load_model(path)

    assert type(loaded) is SummedGradientModel
    assert (loaded.weight_decay, loaded.unrolled_steps) == (1e-2, 2)
    assert sorted(v.path for v in loaded.network.variables if id(v) in loaded._decayed_ids) == [
        "conv/kernel", "logits/kernel"]
    assert int(loaded.optimizer.iterations.numpy()) == 1
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())  # inference mode
    for m in (model, loaded):
        m.fit(_batches(x[4:], y[4:], 4), verbose=0)
    assert len(loaded.variables) == len(model.variables)
    for a, b in zip(loaded.variables, model.variables):  # weights, BN statistics, step
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)


def test_fit_refuses_an_epoch_that_is_not_whole_blocks():
    net = _tiny_bn_net()
    model = SummedGradientModel(net, 0.0)
    model.compile(optimizer=build_optimizer(0.01), steps_per_execution=2)
    x, y = _tiny_data(5)
    data = _batches(x, y, 4)  # 5 batches
    message = r"steps_per_execution=2 does not divide the 5 steps per epoch"
    with pytest.raises(ValueError, match=message):
        model.fit(data.repeat(), steps_per_epoch=5, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.fit(data, verbose=0)  # the data's own length
    assert int(model.optimizer.iterations.numpy()) == 0
    model.fit(data.repeat(), steps_per_epoch=4, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 8
    model.evaluate(data, verbose=0)  # evaluation need not be whole blocks
