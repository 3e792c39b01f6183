"""The private Keras / keras-tuner / TensorFlow hooks of sbt_keras/upstream.py still exist
as used."""
import importlib

import keras
import keras_tuner
import pytest

from sbt_keras import upstream

WHY = ("an upgrade changed a private hook sbt_keras relies on; see the list in "
       "sbt_keras/upstream.py and re-check the workaround named there")


def _resolve(dotted):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("owner, name, params",
                         upstream.KERAS_METHODS + upstream.TUNER_METHODS
                         + upstream.TF_METHODS)
def test_private_methods_keep_their_signature(owner, name, params):
    cls = _resolve(owner)
    assert hasattr(cls, name), f"{owner}.{name} is gone: {WHY}"
    found = upstream.parameter_names(getattr(cls, name))
    assert found == params, f"{owner}.{name}{found} was {params}: {WHY}"


def test_compiled_model_has_the_attributes_read():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    for name in upstream.KERAS_MODEL_ATTRIBUTES:
        assert hasattr(model, name), f"keras.Model.{name} is gone: {WHY}"


def test_the_epoch_iterator_reports_its_batch_count():
    owner, name = upstream.EPOCH_ITERATOR
    assert isinstance(getattr(_resolve(owner), name, None), property), \
        f"{owner}.{name} is gone: {WHY}"


def _grid_oracle():
    hp = keras_tuner.HyperParameters()
    hp.Choice("batch_size", [2, 4])
    return keras_tuner.oracles.GridSearchOracle(
        objective=keras_tuner.Objective("test_accuracy", "max"), hyperparameters=hp)


def test_grid_oracle_has_the_started_points_attribute():
    oracle = _grid_oracle()
    for name in upstream.GRID_ORACLE_ATTRIBUTES:
        assert hasattr(oracle, name), f"GridSearchOracle.{name} is gone: {WHY}"


def test_oracle_has_the_retry_state_requeue_failed_uses():
    oracle = _grid_oracle()
    for name in upstream.ORACLE_RETRY_ATTRIBUTES:
        assert hasattr(oracle, name), f"Oracle.{name} is gone: {WHY}"
    assert isinstance(oracle._retry_queue, list)
    assert oracle._run_times["never seen"] == 0  # a defaultdict(int)-like counter
    state = oracle.get_state()  # saved and reloaded with the oracle
    assert "retry_queue" in state and "run_times" in state


def test_points_started_are_saved_with_the_oracle():
    # parallel_grid.py hands out the points not in _tried_so_far; a resumed sweep relies
    # on keras-tuner saving and restoring that set.
    oracle = _grid_oracle()
    oracle._tried_so_far.add(oracle._compute_values_hash({"batch_size": 2}))
    state = oracle.get_state()
    other = _grid_oracle()
    other.set_state(state)
    assert other._tried_so_far == oracle._tried_so_far, WHY


def test_fit_reads_the_train_function_anew_for_every_block():
    # PackedModel.freeze swaps train_function from a callback in the middle of fit.
    import numpy as np

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    calls = []

    class Swap(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                original = self.model.train_function

                def replaced(iterator):
                    calls.append(1)
                    return original(iterator)

                self.model.train_function = replaced

    x, y = np.zeros((8, 2), np.float32), np.zeros((8, 1), np.float32)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[Swap()])
    assert len(calls) == 2, f"fit kept its own train function: {WHY}"


def test_the_merge_call_grouped_packs_use_is_exported_where_they_call_it():
    import tensorflow as tf
    from tensorflow.python.distribute import merge_call_interim

    assert tf.__internal__.distribute.interim.maybe_merge_call is \
        merge_call_interim.maybe_merge_call, WHY
