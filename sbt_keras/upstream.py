"""Every private Keras / keras-tuner / TensorFlow hook sbt_keras uses, in one place.

The pins in requirements.txt guard these; `tests/test_upstream.py` checks each one against
the installed libraries and fails naming this list when an upgrade renames, removes or
re-signs one. Where a public mechanism does the job it is used instead (keras-tuner's
distribution is read from its documented KERASTUNER_* environment variables, the grid
oracle is imported from the public `keras_tuner.oracles`).

Keras 3 (`sbt_keras/training/summed_sgd.py`, `SummedGradientModel`):
- `keras.Model._maybe_symbolic_build(iterator=None, data_batch=None)`, overridden. Under a
  strategy Keras pulls one input batch and MEAN-reduces it eagerly to build the model;
  under MultiWorkerMirroredStrategy that reduce fails on per-replica inputs. No upstream
  issue found; `tests/test_strategies.py`'s two-worker test reproduces it.
- `make_train_function(force=False)` / `make_test_function(force=False)`, overridden
  (public methods, private contract: Keras reads `self.train_function` /
  `self.test_function` back). Keras wraps every step of its multi-step loop in a `tf.cond`,
  and the optimizer's cross-replica merge fails there under Mirrored and MultiWorker
  strategies (keras-team/keras#19246).
- Attributes read: `steps_per_execution`, `jit_compile`, `distribute_strategy`,
  `train_function`, `test_function` (set by `compile` / `make_*_function`).
- `fit` hands the epoch's iterator to `_maybe_symbolic_build` before the first step, and
  `SummedGradientModel` reads its `num_batches`
  (`keras.src.trainers.epoch_iterator.EpochIterator`) there to refuse an epoch that is not
  whole blocks of `steps_per_execution` (the train function always runs a whole block). No
  public hook sees the epoch's step count before training starts.
- `PackedModel` (`sbt_keras/training/packed_model.py`) overrides the same
  `_maybe_symbolic_build`, and replaces `train_function` from a callback in the middle of
  `fit` when a packed trial diverges: Keras's `fit` reads `self.train_function` anew for
  every block of steps (and `evaluate` rebuilds a `test_function` set to None), so the
  retraced step, without the diverged trial, runs from the next block. Checked in
  `tests/test_upstream.py`.

Keras 3 (`sbt_keras/layers/trial_conv.py`, `TrialGroupedConv2D`, the grouped packs'
convolutions):
- `keras.layers.Conv2D.convolution_op(inputs, kernel)`, overridden (public name,
  undocumented as an extension point; `call` hands it the input and the kernel variable).
  It calls `tf.nn.conv2d` itself instead of `keras.ops.conv`, whose TF backend wraps every
  grouped convolution in `tf.function(jit_compile=True)` ("grouped convolutions are broken
  on CPU without XLA"): on CPU that path is 10-100x slower, and its kernel gradient let one
  group's NaN reach every group's (one diverged packed trial poisoned the others; measured
  2026-12-01, no upstream issue found). TF 2.21's own grouped kernel is checked exact and
  NaN-isolating by tests/test_packed.py.
- `GroupedPackModel` (`sbt_keras/training/grouped.py`) inherits `PackedModel`'s hooks
  above (`_maybe_symbolic_build`, `train_function` replaced on a freeze).

keras-tuner 1.4 (`sbt_keras/sweep.py`):
- `Oracle._compute_values_hash(values)` and `Oracle._tried_so_far` (the hashes of every
  point a trial was created for, saved in oracle.json): `parallel_grid.py` hands each
  worker the first point not in it, instead of GridSearchOracle's wait for a finished trial
  (which let `--sweep_workers=N` run at most two trials at a time). Overriding
  `populate_space` itself is keras-tuner's documented extension point.
- `Oracle._get_oracle_fname()`, `Oracle._get_trial_dir(trial_id)`,
  `Oracle._save_trial(trial)` and `Tuner._get_tuner_fname()`, `Tuner._is_worker()`:
  keras-tuner writes its oracle, trial and tuner JSON in place, so a kill during a save
  leaves truncated JSON that stops the resume; ours write them atomically. No upstream
  issue found.
- `Oracle._retry_queue` (a list of trial ids `create_trial` pops first) and
  `Oracle._run_times` (trial id -> runs so far), read and written by
  `sweep_faults.requeue_failed`: keras-tuner never runs a FAILED trial again, even in a
  new session, so a passing failure (full disk, a crashed input pipeline) would stay
  failed for good; re-running a sweep puts them back in the retry queue. No upstream issue
  found.

TensorFlow 2.21 (`sbt_keras/training/preemption.py`):
- `PreemptionCheckpointHandler._stop_cluster_wise_termination_watcher_thread()` and
  `_stop_poll_termination_signal_thread()`, called when a multi-worker run ends without a
  preemption: the handler stops its two watcher threads itself only before its `exit_fn`,
  and otherwise in `__del__`, which nothing promises to run before the chief (which hosts
  the coordination service the threads block on) exits. No upstream issue found.

TensorFlow 2.21 (`sbt_keras/training/grouped.py`, the grouped packs' update):
- `tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)` (defined in
  `tensorflow.python.distribute.merge_call_interim`): the per-slice update is applied to
  every replica's copy of a variable in a cross-replica merge, through the same call
  Keras's TF optimizer uses for its own updates (it merges only where the strategy needs
  it), so a grouped pack updates as an unpacked run does under every strategy.

Log texts matched, not hooks (`sbt_keras/console.py`; if an upgrade rewords one, that line is
simply shown again): TensorFlow's native start-up lines without a GPU (cudart_stub's "Could
not find cuda drivers", cuda_platform's "failed call to cuInit", port.cc's "oneDNN custom
operations are on", absl's "All log messages before absl::InitializeLog()" banner) and
tf.function's "... triggered tf.function retracing" warning.
"""
import inspect

# (what, owner, attribute, parameter names after self; None: an attribute, not a method).
# Instance attributes are checked on an instance the test builds (see test_upstream.py).
KERAS_METHODS = (
    ("keras.Model", "_maybe_symbolic_build", ("iterator", "data_batch")),
    ("keras.Model", "make_train_function", ("force",)),
    ("keras.Model", "make_test_function", ("force",)),
    ("keras.layers.Conv2D", "convolution_op", ("inputs", "kernel")),
)
KERAS_MODEL_ATTRIBUTES = ("steps_per_execution", "jit_compile", "distribute_strategy",
                          "train_function", "test_function")
TUNER_METHODS = (
    ("keras_tuner.Oracle", "_compute_values_hash", ("values",)),
    ("keras_tuner.Oracle", "populate_space", ("trial_id",)),
    ("keras_tuner.Oracle", "_get_oracle_fname", ()),
    ("keras_tuner.Oracle", "_get_trial_dir", ("trial_id",)),
    ("keras_tuner.Oracle", "_save_trial", ("trial",)),
    ("keras_tuner.Tuner", "_get_tuner_fname", ()),
    ("keras_tuner.Tuner", "_is_worker", ()),
)
TF_METHODS = (
    ("tensorflow.python.distribute.merge_call_interim", "maybe_merge_call",
     ("fn", "strategy", "args", "kwargs")),
    ("tensorflow.python.distribute.failure_handling.failure_handling."
     "PreemptionCheckpointHandler", "_stop_cluster_wise_termination_watcher_thread", ()),
    ("tensorflow.python.distribute.failure_handling.failure_handling."
     "PreemptionCheckpointHandler", "_stop_poll_termination_signal_thread", ()),
)
EPOCH_ITERATOR = ("keras.src.trainers.epoch_iterator.EpochIterator", "num_batches")
GRID_ORACLE_ATTRIBUTES = ("_tried_so_far",)
ORACLE_RETRY_ATTRIBUTES = ("_retry_queue", "_run_times")


def parameter_names(function):
    """The parameter names of `function` after `self`."""
    names = list(inspect.signature(function).parameters)
    return tuple(names[1:] if names and names[0] == "self" else names)
