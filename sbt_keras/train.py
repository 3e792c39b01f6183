"""One training run, top to bottom: records -> strategy -> data -> model -> fit -> results.

`train(cfg)` takes a resolved `Config` and leaves in `cfg.output_dir`:
  config.yaml   every resolved setting, derived sizes and library versions
  history.csv   one row per epoch
  result.yaml   status, median-of-final-N test accuracy, throughput
  tb/           TensorBoard scalars (train/, test/) and HParams
  checkpoints/  model + optimizer after each epoch; a re-run of the same command resumes
"""
import contextlib
import functools
import os
import platform
import time

from absl import logging

from sbt_keras import claim, memory, models, results, storage, summary
from sbt_keras.config import Config, hparams_of
from sbt_keras.errors import OutOfMemory, first_line
from sbt_keras.training import (noise_records, norm_records, resume, sharpness_callback,
                                snapshot, train_eval, warm_start)
from sbt_keras.training.preemption import agreed_stop

# result.yaml status of a run that stopped before its end, by what stopped it.
STOP_STATUS = {"Preempted": "preempted", "KeyboardInterrupt": "interrupted"}


@claim.holding_output_dir  # one process per output directory (sbt_keras/claim.py)
def train(cfg: Config, strategy=None, extra_callbacks=()) -> dict:
    """Runs (or resumes, or returns the finished result of) the run `cfg` describes.

    `strategy` overrides `cfg.strategy` (tests pass logical-device strategies);
    `extra_callbacks` run after the built-in ones (tests use them to inject faults).

    In a multi-worker cluster every process calls this; the chief keeps the records in
    `cfg.output_dir`, the others write theirs to a scratch directory that is deleted when
    they finish, and all of them resume from the chief's checkpoints.
    """
    import tensorflow as tf

    from sbt_keras import distribute
    from sbt_keras.training import callbacks, progress, schedules
    from sbt_keras.training.builder import build_model

    # ------------------------------------------------------------------ Records
    info = cfg.data_info()
    stored = resume.stored_config(cfg.output_dir)  # {} for a new run
    finished = resume.check_output_dir(cfg, info, stored)
    if finished is not None:
        logging.info("%s already holds this run's result (%s); nothing to do.",
                     cfg.output_dir, finished["status"])
        return finished
    run_dir = cfg.output_dir  # where the records live; non-chief workers resume from it
    chief = distribute.is_chief(cfg.strategy)
    cfg = distribute.as_written_here(cfg)
    out = cfg.output_dir

    # ------------------------------------------------------------------ Strategy
    strategy = strategy or distribute.make_strategy(cfg.strategy, cfg.tpu, cfg.tpu_timeout)
    replicas = strategy.num_replicas_in_sync
    bn_batch_size = cfg.check_replicas(replicas)
    resume.check_bn_batch(stored, bn_batch_size, replicas, out)
    steps_per_epoch = info.num_train // cfg.batch_size
    schedule = schedules.from_config(cfg, steps_per_epoch)
    write_config(cfg, derived_settings(cfg, info, replicas, bn_batch_size, schedule))
    write_running(out)

    with _recording_failures(out, cfg, replicas):
        # -------------------------------------------------------------- Input pipeline
        source = seeded_source(cfg, strategy)

        # -------------------------------------------------------------- Model & optimizer
        with strategy.scope():
            network, model = build_model(cfg, info, bn_batch_size, schedule)
        memory.check_run_fits(cfg, network)
        summary.log_start(cfg, info, network, replicas, bn_batch_size, schedule)

        # -------------------------------------------------------------- Resume
        metric_variables = [v for m in model.metrics for v in m.variables]
        divergence = callbacks.DivergenceStop(cfg.divergence_factor)
        noise = [noise_records.NoiseRecorder(cfg.gns_ema)] if cfg.gns_every_steps else []
        history = read_history(out)
        checkpoint, manager, plan = resume.open_checkpoints(
            model, dict(metrics=metric_variables, divergence_reference=divergence.reference,
                        noise=[n.state for n in noise]),
            restore_from=run_dir, save_to=out, cfg=cfg, steps_per_epoch=steps_per_epoch,
            history_rows=len(history))
        start_step = plan.start_step
        warm_start.apply(cfg, network, start_step)  # --init_from, on a fresh start only
        if start_step:
            logging.info("Resuming %s at epoch %d, step %d.", out, plan.initial_epoch,
                         start_step)

        # -------------------------------------------------------------- Train
        test_ds = source.eval_dataset(batch_size=cfg.eval_batch_size)
        # Keras counts a per-worker dataset's per-replica batches as steps: say how many
        # global evaluation batches there are.
        eval_steps = -(-info.num_test // cfg.eval_batch_size)
        recorder = _epoch_recorder(cfg, schedule, history[:plan.history_rows], network,
                                   noise, hparams_of(cfg, bn_batch_size) if start_step == 0
                                   else None)
        restore_metrics = callbacks.RestoreMetrics(
            metric_variables, [v.numpy() for v in metric_variables] if plan.mid_epoch else None)
        snapshots = [callbacks.EpochSnapshots(
            checkpoint, functools.partial(snapshot.epoch_checkpoint_prefix, out),
            cfg.keep_checkpoint_every_epochs, divergence)
        ] if cfg.keep_checkpoint_every_epochs else []
        run_progress = progress.callbacks_for_run(cfg, steps_per_epoch)
        started = time.monotonic()
        with callbacks.Preemption() as preemption, contextlib.ExitStack() as stack:
            # Multi-worker: the workers agree on one step to stop at (training/preemption.py);
            # a worker acting alone on its SIGTERM would leave the others blocked.
            agreed = cfg.strategy == "multi_worker"
            alone = None if agreed else preemption
            checkpointer = callbacks.Checkpointer(manager, divergence, alone,
                                                  steps_per_epoch, cfg.checkpoint_every_steps)
            stops = [stack.enter_context(agreed_stop(strategy, preemption, checkpointer,
                                                     steps_per_epoch))] if agreed else []
            # Before the recorder: a measured epoch's row and checkpoint carry the value.
            measures = sharpness_callback.for_run(cfg, network, divergence, alone, strategy)
            fit_phases(model, source, cfg, plan, steps_per_epoch, (test_ds, eval_steps),
                       [restore_metrics, divergence, *noise, *measures, recorder,
                        *run_progress, callbacks.EpochLog(cfg.epochs), checkpointer,
                        *snapshots, *stops, *extra_callbacks],
                       stopped=lambda: divergence.diverged)
        session_steps = int(model.optimizer.iterations.numpy()) - start_step

        # -------------------------------------------------------------- Results
        result = _final_result(cfg, info, model, network, recorder, divergence.diverged_at_step,
                               (session_steps * cfg.batch_size, time.monotonic() - started))
    results.write_yaml(os.path.join(out, results.RESULT_FILE), result)
    if not chief:
        tf.io.gfile.rmtree(out)
    logging.info("%s: %s, test accuracy (median of final %d) %.4f", out, result["status"],
                 cfg.median_of, result["test_accuracy"])
    return result


def fit_phases(model, source, cfg, plan, steps_per_epoch, evaluation, callbacks, stopped):
    """Trains through the resume plan's phases (a partial epoch, then whole ones), each a
    `fit` on the data stream positioned where the phase starts, until `stopped()`.
    `evaluation` is (test dataset, its steps)."""
    test_ds, eval_steps = evaluation
    for phase in plan.phases:
        if stopped():
            break
        train_ds = source.train_dataset(
            batch_size=cfg.batch_size, seed=cfg.seed, epochs=phase.last,
            start_epoch=phase.first, start_step=phase.skip, augment=cfg.augment)
        model.fit(train_ds, epochs=phase.last, initial_epoch=phase.first,
                  steps_per_epoch=steps_per_epoch - phase.skip,
                  validation_data=test_ds, validation_steps=eval_steps,
                  verbose=0, shuffle=False,  # the pipeline shuffles, reproducibly
                  callbacks=callbacks)


def seeded_source(cfg, strategy):
    """Seeds every generator from --seed (and makes ops deterministic with
    --deterministic), then opens the data source: the start every run and pack shares."""
    import keras
    import tensorflow as tf

    from sbt_keras import data

    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    return data.source(cfg, strategy)


def _epoch_recorder(cfg, schedule, history, network, noise, hparams):
    """The callback that writes history.csv and TensorBoard, with the run's per-epoch
    probes: mixing weights, gradient noise, sharpness."""
    from sbt_keras.training import callbacks

    return callbacks.EpochRecorder(
        cfg.output_dir, batch_size=cfg.batch_size, schedule=schedule, history=history,
        hparams=hparams, histogram_freq=cfg.histogram_freq, network=network,
        probes=[lambda logs: norm_records.mixing_weights(network),
                *(n.epoch_values for n in noise), sharpness_callback.probe(cfg)])


def _final_result(cfg, info, model, network, recorder, diverged_at_step, session):
    """result.yaml's content from the recorded epochs and the final network; `session` is
    (examples, seconds) trained by this process. Writes the final TensorBoard value."""
    result = results.summarize(
        recorder.rows, cfg, info.num_classes, diverged_at_step, session=session,
        worker=os.environ.get("KERASTUNER_TUNER_ID"))  # which sweep worker ran it
    result.update(**noise_records.summary(recorder.rows), **norm_records.summary(network),
                  **train_eval.final_training_set_metrics(cfg, model, result))
    recorder.write_final("median_test_accuracy", result["test_accuracy"],
                         result["epochs_completed"])
    return result


@contextlib.contextmanager
def _recording_failures(out, cfg, replicas):
    """Records in result.yaml why a run stopped early, then lets the error propagate;
    out-of-memory becomes a one-line OutOfMemory naming what to lower. Resets the global
    mixed-precision policy the run set."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(cfg.precision)
    try:
        yield
    except tf.errors.ResourceExhaustedError as error:
        if storage.kind(error, writing=False):  # TF's word for a full disk too
            failure = storage.explain(out, error, writing=False)
            storage.try_write_yaml(os.path.join(out, results.RESULT_FILE),
                                   {"status": "failed", "error": str(failure)})
            raise failure from None
        storage.try_write_yaml(os.path.join(out, results.RESULT_FILE),
                               {"status": "failed", "error": f"out of memory: {error}"})
        raise OutOfMemory(
            f"out of memory at --batch_size={cfg.batch_size} ({cfg.batch_size // replicas} "
            f"per replica); lower --batch_size, or use --precision=mixed_bfloat16 or more "
            f"replicas ({first_line(error)})") from None
    except BaseException as error:  # record why it stopped, then let it propagate
        status = STOP_STATUS.get(type(error).__name__, "failed")
        failure = storage.explain(out, error, writing=False)  # a full disk anywhere
        storage.try_write_yaml(os.path.join(out, results.RESULT_FILE), {
            "status": status, "error": str(failure) if failure else
            f"{type(error).__name__}: {error}"})
        if failure is not None and failure is not error:
            raise failure from error
        raise
    finally:
        keras.mixed_precision.set_global_policy("float32")


def derived_settings(cfg, info, replicas, bn_batch_size, schedule):
    """config.yaml's `derived` section: what the settings come to on this data and strategy."""
    steps_per_epoch = info.num_train // cfg.batch_size
    return {
        "replicas": replicas,
        "per_replica_batch_size": cfg.batch_size // replicas,
        "bn_batch_size": bn_batch_size,  # the examples each BN statistic is taken over
        "learning_rate": cfg.batch_size * cfg.base_lr,  # eta = m * eta_tilde
        "num_train": info.num_train, "num_test": info.num_test,
        "num_classes": info.num_classes, "image_shape": list(info.image_shape),
        "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * cfg.epochs,
        "lr_decay_steps": list(schedule.boundaries), "warmup_steps": schedule.warmup_steps,
        "model_revision": models.spec(cfg.model).revision,
    }


def write_running(out):
    """result.yaml while training: a run killed with SIGKILL keeps this status, and host +
    pid tell a live run from a dead one."""
    results.write_yaml(os.path.join(out, results.RESULT_FILE), {
        "status": "running", "host": platform.node(), "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def write_config(cfg, derived):
    import keras
    import tensorflow as tf
    record = cfg.to_dict()
    record["derived"] = derived
    record["versions"] = {"python": platform.python_version(), "tensorflow": tf.__version__,
                          "keras": keras.__version__}
    results.write_yaml(os.path.join(cfg.output_dir, results.CONFIG_FILE), record)


def read_history(output_dir):
    return resume.read_history(output_dir)  # drops a damaged last row (issue 15)
