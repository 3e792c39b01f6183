"""A pack of trials, top to bottom: one data stream, one compiled program, K trials' records.

`train_pack(cfgs)` takes resolved Configs that differ only in eta_tilde (and weight decay)
and output_dir (sbt_keras/packing.py checks it) and leaves in every trial's output_dir
exactly what `train(cfg)` leaves there -- config.yaml, history.csv, result.yaml, tb/,
checkpoints/ (the same object graph, so training/snapshot.py and the instruments load a
packed trial like any other) -- and returns their results in order.

- Exact: each trial's network is built as `train` builds it (same seed, same builder) and
  trained by its own SummedGradientModel step inside the packed program
  (training/packed_model.py), on the batches its unpacked run would see.
- Per-trial divergence: a trial whose running loss turns NaN/Inf (or passes its
  --divergence_factor) is finished at that block exactly as an unpacked run finishes: its
  partial epoch is evaluated and recorded, result.yaml says `diverged` at that step, and it
  is dropped from the program; the others go on.
- Kill and resume: every trial checkpoints at the same steps. A pack resumes all its
  unfinished trials from the newest step at which each of them holds a readable checkpoint
  (a kill between two trials' saves leaves the earlier one common to all), forgetting any
  newer checkpoint of a trial so that no stale one is picked up later; finished trials
  (completed or diverged) are not trained again. A trial may also be resumed alone, or in
  another pack: the checkpoints are those of an unpacked run.
- SIGTERM: every trial saves its checkpoint at the next step boundary, then the pack stops
  with `preempted` in each open trial's result.yaml (exit 143), like an unpacked run.
- Multi-worker (--strategy=multi_worker), as an unpacked run (train.py): every worker calls
  `train_pack` with the same trials; the chief keeps the trials' records, the others write
  theirs to scratch copies (distribute.scratch_dir) deleted when they finish; all resume
  from the chief's checkpoints, which only the chief forgets, and check that they all
  restored the same step before training; a SIGTERM to any worker stops every worker at one
  agreed step (training/preemption.py), where every open trial saves.
"""
import contextlib
import dataclasses
import functools
import os
import time

import keras
import tensorflow as tf
from absl import logging

from sbt_keras import distribute, memory, packing, results
from sbt_keras.config import hparams_of
from sbt_keras.errors import ConfigError, OutOfMemory, Preempted, first_line
from sbt_keras.train import (STOP_STATUS, derived_settings, fit_phases, read_history,
                             seeded_source, write_config, write_running)
from sbt_keras import models
from sbt_keras.training import callbacks, norm_records, resume, schedules, snapshot, train_eval
from sbt_keras.training.builder import build_model
from sbt_keras.training.packed_model import PackedModel, prefix
from sbt_keras.training.preemption import agreed_stop


@dataclasses.dataclass
class _Trial:
    """One trial of the pack and everything the run keeps of it."""
    index: int
    cfg: object  # output_dir: where this process writes (a non-chief worker: scratch)
    stored: dict
    run_dir: str  # the trial's records, which every worker resumes from (the chief's)
    schedule: object = None
    network: object = None
    model: object = None  # its SummedGradientModel (a member of the packed model)
    divergence: object = None
    recorder: object = None
    callbacks: list = dataclasses.field(default_factory=list)
    checkpoint: object = None
    checkpointer: object = None  # its callbacks.Checkpointer (one of `callbacks`)
    history: list = dataclasses.field(default_factory=list)
    extra_variables: list = dataclasses.field(default_factory=list)
    done: bool = False
    seconds: float = None  # this session's training time, when it finished
    result: dict = None

    @property
    def out(self):
        return self.cfg.output_dir

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.run_dir))

    def logs(self, packed_logs):
        """The pack's logs of this trial under an unpacked run's names."""
        mine, val = prefix(self.index), "val_" + prefix(self.index)
        out = {}
        for key, value in (packed_logs or {}).items():
            if key.startswith(mine):
                out[key[len(mine):]] = value
            elif key.startswith(val):
                out["val_" + key[len(val):]] = value
        return out


def train_pack(cfgs, strategy=None, extra_callbacks=()):
    """Runs (or resumes, or returns the finished results of) the trials `cfgs` as one
    program; returns their results in order. `extra_callbacks` see the packed model and
    its logs (tests use them to inject faults). In a multi-worker cluster every process
    calls this with the same `cfgs` (the module docstring says who writes what)."""
    packing.check_pack(cfgs)
    lead = cfgs[0]
    info = lead.data_info()
    chief = distribute.is_chief(lead.strategy)
    trials = []
    for index, cfg in enumerate(cfgs):
        stored = resume.stored_config(cfg.output_dir)
        trial = _Trial(index=index, cfg=cfg, stored=stored, run_dir=cfg.output_dir)
        finished = resume.check_output_dir(cfg, info, stored)
        if finished is not None:
            logging.info("%s already holds this run's result (%s); nothing to do.",
                         cfg.output_dir, finished["status"])
            trial.done, trial.result = True, finished
        trial.cfg = distribute.as_written_here(cfg)  # resumed from the chief's, as train.py
        trials.append(trial)
    todo = [t for t in trials if not t.done]
    if not todo:
        return [t.result for t in trials]
    # The packed model's member index is the position among the trials trained now.
    for index, trial in enumerate(todo):
        trial.index = index

    strategy = strategy or distribute.make_strategy(lead.strategy, lead.tpu)
    replicas = strategy.num_replicas_in_sync
    bn_batch_size = lead.check_replicas(replicas)
    steps_per_epoch = info.num_train // lead.batch_size
    names = [t.name for t in trials]
    formulation = _formulation(lead, len(todo))
    for trial in todo:
        resume.check_bn_batch(trial.stored, bn_batch_size, replicas, trial.out)
        trial.schedule = schedules.from_config(trial.cfg, steps_per_epoch)
        derived = derived_settings(trial.cfg, info, replicas, bn_batch_size, trial.schedule)
        derived["pack"] = names  # trained in one program with these trials
        derived["pack_formulation"] = formulation
        write_config(trial.cfg, derived)
        write_running(trial.out)

    with _recording_failures(todo, lead, replicas):
        source = seeded_source(lead, strategy)

        # ------------------------------------------------------------ Models
        with strategy.scope():
            for trial in todo:
                keras.utils.set_random_seed(trial.cfg.seed)  # the weights `train` starts from
                trial.network, trial.model = build_model(trial.cfg, info, bn_batch_size,
                                                         trial.schedule)
            packed = _packed_model(formulation, lead, info, bn_batch_size, todo)
            packed.compile(steps_per_execution=lead.steps_per_execution,
                           jit_compile=lead.jit_compile)
        _check_pack_fits(lead, todo[0].network, len(todo))

        # ------------------------------------------------------------ Resume
        for trial in todo:
            trial.divergence = callbacks.DivergenceStop(trial.cfg.divergence_factor)
            metric_variables = [v for m in trial.model.metrics for v in m.variables]
            trial.extra_variables = metric_variables + [trial.divergence.reference]
            trial.checkpoint = tf.train.Checkpoint(
                model=trial.model, optimizer=trial.model.optimizer, metrics=metric_variables,
                divergence_reference=trial.divergence.reference)
            trial.history = read_history(trial.out)
        packed._maybe_symbolic_build()  # the optimizers' state exists before a restore
        start_step = restore_common(todo, forget=chief)
        if lead.strategy == "multi_worker":
            _check_same_step(strategy, start_step)
        packed.assemble()  # the grouped formulation's fused weights from the trials'
        plan = None
        for trial in todo:
            plan = resume.resume_plan(
                start_step, steps_per_epoch=steps_per_epoch, epochs=trial.cfg.epochs,
                steps_per_execution=trial.cfg.steps_per_execution,
                history_rows=len(trial.history))
        if start_step:
            logging.info("Resuming the pack %s at epoch %d, step %d.", "+".join(names),
                         plan.initial_epoch, start_step)

        # ------------------------------------------------------------ Train
        test_ds = source.eval_dataset(batch_size=lead.eval_batch_size)
        eval_steps = -(-info.num_test // lead.eval_batch_size)
        started = time.monotonic()
        with callbacks.Preemption() as preemption, contextlib.ExitStack() as stack:
            # Multi-worker: the workers agree on one step to stop at, where every open
            # trial saves (training/preemption.py); one acting alone would block the others.
            agreed = lead.strategy == "multi_worker"
            alone = None if agreed else preemption
            for trial in todo:
                manager = tf.train.CheckpointManager(
                    trial.checkpoint, os.path.join(trial.out, resume.CHECKPOINT_DIR),
                    max_to_keep=3)
                metric_variables = trial.extra_variables[:-1]
                trial.recorder = callbacks.EpochRecorder(
                    trial.out, batch_size=trial.cfg.batch_size, schedule=trial.schedule,
                    history=trial.history[:plan.history_rows],
                    hparams=hparams_of(trial.cfg, bn_batch_size) if start_step == 0 else None,
                    histogram_freq=trial.cfg.histogram_freq, network=trial.network,
                    probes=[lambda logs, net=trial.network: norm_records.mixing_weights(net)])
                snapshots = [callbacks.EpochSnapshots(
                    trial.checkpoint, functools.partial(snapshot.epoch_checkpoint_prefix,
                                                        trial.out),
                    trial.cfg.keep_checkpoint_every_epochs, trial.divergence)
                ] if trial.cfg.keep_checkpoint_every_epochs else []
                trial.checkpointer = callbacks.Checkpointer(
                    manager, trial.divergence, alone, steps_per_epoch,
                    trial.cfg.checkpoint_every_steps)
                trial.callbacks = [
                    callbacks.RestoreMetrics(metric_variables,
                                             [v.numpy() for v in metric_variables]
                                             if plan.mid_epoch else None),
                    trial.divergence, trial.recorder, _TrialLog(trial.name, trial.cfg.epochs),
                    trial.checkpointer, *snapshots]
            stops = [stack.enter_context(agreed_stop(
                strategy, preemption, _PackSave(packed, todo), steps_per_epoch))
            ] if agreed else []
            finish = functools.partial(_finish, lead=lead, info=info, start_step=start_step,
                                       started=started, names=names)
            dispatcher = PackCallbacks(todo, test_ds, eval_steps, finish)
            fit_phases(packed, source, lead, plan, steps_per_epoch, (test_ds, eval_steps),
                       [dispatcher, *stops, *extra_callbacks],
                       stopped=lambda: all(t.done for t in todo))
            for trial in todo:
                if not trial.done:
                    finish(trial)
    if not chief:
        for trial in todo:
            tf.io.gfile.rmtree(trial.out)  # the scratch copy (train.py does the same)
    return [t.result for t in trials]


class _PackSave:
    """What training/preemption.py's agreed_stop saves through at the agreed step: every
    open trial's own Checkpointer (each skips a step it saved already, or a diverged
    trial); `step` is the pack's global step (the packed model's own optimizer is unused)."""

    def __init__(self, packed, trials):
        self.packed = packed
        self.trials = trials
        self.manager = trials[0].checkpointer.manager  # for its directory

    def step(self):
        return self.packed.step

    def save(self):
        for trial in self.trials:
            if not trial.done:
                trial.checkpointer.save()
        return self.step()


def _formulation(lead, trials):
    """The formulation --pack_formulation chooses for this device (packing.formulation)."""
    device = "tpu" if lead.strategy == "tpu" else (
        "gpu" if tf.config.list_logical_devices("GPU") else "cpu")
    chosen = packing.formulation(lead, device, trials)
    logging.info("Pack of %d trials: %s formulation (--pack_formulation=%s, %s).",
                 trials, chosen, lead.pack_formulation, device)
    return chosen


def _packed_model(formulation, lead, info, bn_batch_size, todo):
    """The pack's program: K sub-graphs, or one fused network (training/grouped.py)."""
    members = [t.model for t in todo]
    if formulation == packing.SEPARATE:
        return PackedModel(members)
    from sbt_keras.training.grouped import GroupedPackModel

    fused = models.build(lead.model, input_shape=info.image_shape,
                         num_classes=info.num_classes, norm=lead.norm,
                         norm_dense=lead.norm_dense, trials=len(todo),
                         **lead.norm_options(bn_batch_size))
    return GroupedPackModel(fused, members, [t.schedule for t in todo])


class PackCallbacks(keras.callbacks.Callback):
    """Hands every trial of a pack its own callbacks' hooks with its own logs, as an
    unpacked run's `fit` would; finishes a trial that diverged."""

    def __init__(self, trials, test_ds, eval_steps, finish):
        super().__init__()
        self.trials = trials
        self.test_ds = test_ds
        self.eval_steps = eval_steps
        self.finish = finish
        self.epoch = 0

    def set_model(self, model):
        super().set_model(model)  # the packed model
        for trial in self.trials:
            for callback in trial.callbacks:
                callback.set_model(trial.model)

    def set_params(self, params):
        super().set_params(params)
        for trial in self.trials:
            for callback in trial.callbacks:
                callback.set_params(params)

    def _live(self):
        return [t for t in self.trials if not t.done]

    def _each(self, trials, hook, *args, logs=None):
        """`hook` of every trial's callbacks; a Preempted raised by one trial's checkpointer
        is re-raised once every trial had its turn (each saves its checkpoint first)."""
        stopped = None
        for trial in trials:
            mine = trial.logs(logs)
            for callback in trial.callbacks:
                try:
                    getattr(callback, hook)(*args, mine)
                except Preempted as error:
                    stopped = stopped or error
                    break
        if stopped is not None:
            raise stopped

    def on_train_begin(self, logs=None):
        self._each(self._live(), "on_train_begin")

    def on_train_end(self, logs=None):
        self._each(self._live(), "on_train_end", logs=logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._each(self._live(), "on_epoch_begin", epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self._each(self._live(), "on_train_batch_begin", batch)

    def on_train_batch_end(self, batch, logs=None):
        live = self._live()
        # The block's weights into every live trial's own network before its records.
        self.model.publish([t.index for t in live])
        try:
            self._each(live, "on_train_batch_end", batch, logs=logs)
        finally:
            for trial in live:
                if trial.divergence.diverged:
                    self._end_diverged(trial, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._each(self._live(), "on_epoch_end", epoch, logs=logs)

    def _end_diverged(self, trial, logs):
        """What an unpacked run does after its DivergenceStop: evaluate, record the partial
        epoch, stop -- for this trial only; the packed program goes on without it."""
        epoch_logs = trial.logs(logs)
        val = trial.model.evaluate(self.test_ds, steps=self.eval_steps, verbose=0,
                                   return_dict=True)
        epoch_logs.update({f"val_{k}": v for k, v in val.items()})
        for callback in trial.callbacks:
            callback.on_epoch_end(self.epoch, epoch_logs)
        self.finish(trial)
        live = self._live()
        if live:
            self.model.freeze(trial.index)
        else:
            self.model.stop_training = True


class _TrialLog(keras.callbacks.Callback):
    """One log line per epoch and trial (EpochLog, with the trial's name)."""

    def __init__(self, name, epochs):
        super().__init__()
        self.name, self.epochs = name, epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        nan = float("nan")
        logging.info("%s: epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f",
                     self.name, epoch + 1, self.epochs, logs.get("loss", nan),
                     logs.get("accuracy", nan), logs.get("val_loss", nan),
                     logs.get("val_accuracy", nan))


def _finish(trial, *, lead, info, start_step, started, names):
    """Writes a trial's result.yaml (and the HParams metric) once it is done."""
    seconds = time.monotonic() - started
    steps = int(trial.model.optimizer.iterations.numpy()) - start_step
    result = results.summarize(
        trial.recorder.rows, trial.cfg, info.num_classes, trial.divergence.diverged_at_step,
        session=(steps * trial.cfg.batch_size, seconds),
        worker=os.environ.get("KERASTUNER_TUNER_ID"))
    # The same records as the trial run alone (train.py): mix weights, generalization gap.
    result.update(**norm_records.summary(trial.network),
                  **train_eval.final_training_set_metrics(trial.cfg, trial.model, result))
    result["pack"] = names  # trained in one program with these trials
    trial.recorder.write_final("median_test_accuracy", result["test_accuracy"],
                               result["epochs_completed"])
    results.write_yaml(os.path.join(trial.out, results.RESULT_FILE), result)
    trial.done, trial.result, trial.seconds = True, result, seconds
    logging.info("%s: %s, test accuracy (median of final %d) %.4f", trial.out,
                 result["status"], lead.median_of, result["test_accuracy"])


def restore_common(trials, forget=True):
    """Restores every trial at the newest global step at which each of them holds a readable
    checkpoint in its run directory (the chief's, on every worker of a cluster) and returns
    it (0: none, everyone starts from its initial weights); with `forget` (the chief only:
    the checkpoints are its records) forgets every trial's checkpoints after that step.
    Every worker reads the same files, so all pick the same step."""

    listed = []
    for trial in trials:
        state = tf.train.get_checkpoint_state(
            os.path.join(trial.run_dir, resume.CHECKPOINT_DIR))
        paths = list(state.all_model_checkpoint_paths) if state else []
        listed.append({_step_of(p): p for p in paths})
    variables = [_state_variables(t) for t in trials]
    initial = [[v.numpy() for v in vs] for vs in variables]
    common = sorted(set.intersection(*(set(s) for s in listed)), reverse=True)
    chosen = 0
    for step in common:
        try:
            for trial, paths in zip(trials, listed):
                trial.checkpoint.restore(paths[step]).assert_existing_objects_matched()
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
            logging.warning("Checkpoint of step %d is unreadable in one trial of the pack "
                            "(%s: %s); trying an older step.", step, type(error).__name__,
                            first_line(error))
            continue
        chosen = step
        break
    if not chosen:
        if any(listed):
            logging.warning("No checkpoint step common to every trial of the pack is "
                            "readable; the pack starts from scratch.")
        for vs, values in zip(variables, initial):
            for variable, value in zip(vs, values):
                variable.assign(value)
    if forget:
        for trial, paths in zip(trials, listed):
            _forget_after(os.path.join(trial.run_dir, resume.CHECKPOINT_DIR), paths, chosen)
    return chosen


def _check_same_step(strategy, step):
    """RuntimeError unless every worker restored the pack at `step`. They read the same
    files, so they should; one resuming elsewhere (the chief's checkpoints changing under
    it) would go on in lockstep with the others from other weights."""
    mine = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([step], tf.int64))
    steps = sorted({int(s) for s in strategy.gather(mine, axis=0).numpy()})
    if steps != [step]:
        raise RuntimeError(f"the workers restored the pack at different steps ({steps}); "
                           f"re-run the same command on every worker")


def _state_variables(trial):
    return [*trial.model.variables, trial.model.optimizer.iterations, *trial.extra_variables]


def _step_of(path):
    return int(str(path).rsplit("-", 1)[1])


def _forget_after(directory, paths, step):
    """Deletes the checkpoints of `directory` after global step `step` and rewrites its
    checkpoint list without them (a later resume must not pick one up)."""

    later = [p for s, p in paths.items() if s > step]
    if not later:
        return
    for path in later:
        for name in tf.io.gfile.glob(path + ".*"):
            tf.io.gfile.remove(name)
    # Relative names, as CheckpointManager writes them: the directory may be moved.
    kept = [os.path.basename(p) for s, p in sorted(paths.items()) if s <= step]
    if kept:
        tf.compat.v1.train.update_checkpoint_state(directory, kept[-1],
                                                   all_model_checkpoint_paths=kept)
    else:
        tf.io.gfile.remove(os.path.join(directory, "checkpoint"))


def _check_pack_fits(cfg, network, k):
    """memory.check_run_fits for K networks at once: each holds its own activations."""
    if cfg.strategy == "tpu" or tf.config.list_logical_devices("GPU"):
        return
    available = memory.host_available_bytes()
    if available is None:
        return
    examples = cfg.batch_size // distribute.num_workers(cfg.strategy)
    need = k * memory.training_bytes(network, examples,
                                     2 if cfg.precision == "mixed_bfloat16" else 4)
    if need > available:
        raise ConfigError(
            f"--pack: {k} trials of --batch_size={cfg.batch_size} need at least "
            f"{need / memory.GIB:.1f} GiB for one packed step here, more than the "
            f"{available / memory.GIB:.1f} GiB available; lower --pack")


@contextlib.contextmanager
def _recording_failures(trials, cfg, replicas):
    """train.py's _recording_failures for every trial still open (not finished) when the
    pack stops early."""
    def record(status, error):
        for trial in trials:
            if not trial.done:
                results.write_yaml(os.path.join(trial.out, results.RESULT_FILE),
                                   {"status": status, "error": error})

    keras.mixed_precision.set_global_policy(cfg.precision)
    try:
        yield
    except tf.errors.ResourceExhaustedError as error:
        record("failed", f"out of memory: {error}")
        raise OutOfMemory(
            f"out of memory at --batch_size={cfg.batch_size} with {len(trials)} packed "
            f"trials; lower --pack or --batch_size ({first_line(error)})") from None
    except BaseException as error:
        record(STOP_STATUS.get(type(error).__name__, "failed"),
               f"{type(error).__name__}: {error}")
        raise
    finally:
        keras.mixed_precision.set_global_policy("float32")
