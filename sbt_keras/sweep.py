"""A resumable keras-tuner grid over (m, eta_tilde, bn batch size, epochs, seed).

Distributed: with KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT set,
keras-tuner's chief process serves the grid and every worker process (another machine, or
another process on the same GPU) runs the trials it is handed; all share one output_dir.

Layout of a sweep's output_dir:
  sweep.yaml            the base config, the grid (union over extensions), skipped points
  results.csv / .yaml   one row per point, rewritten atomically after every trial
  trials/<point>/       a full run directory per point (see train.py), named by its values
  tuner/<grid hash>/    keras-tuner's own state
  events.*              the TensorBoard HParams experiment (tensorboard --logdir output_dir)

Resume works at two levels. Trial directories are named by the point's values, not by
keras-tuner's trial id, so a re-run of a finished point returns its stored result at once and
an interrupted one resumes from its last epoch checkpoint. keras-tuner's GridSearchOracle
walks the grid with a cursor it does not save, so after a reload it either stops early or
raises KeyError (keras-tuner issue 1055); `ResumableGridOracle` needs no cursor: it hands out
the first point not started yet (parallel_grid.py), from the set keras-tuner does save. The
private keras-tuner hooks this touches are listed in `sbt_keras/upstream.py`.
"""
import hashlib
import json
import math
import os

import keras_tuner
from absl import logging

from sbt_keras import distribute
from sbt_keras import grid as grid_lib
from sbt_keras import packing, results
from sbt_keras import children, sweep_faults
from sbt_keras.parallel_grid import HandOutEveryPointAtOnce
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError, DamagedRecord, first_line
from sbt_keras.config import EXECUTION_FIELDS, legacy_values
from sbt_keras.train import train
from sbt_keras.training.progress import SweepProgress

SWEEP_FILE = results.SWEEP_FILE  # its presence marks a sweep directory
RESULTS_STEM = "results"
TRIALS_DIR = "trials"
OBJECTIVE = "test_accuracy"
RESULT_COLUMNS = ("trial", "norm", "batch_size", "log2_base_lr", "base_lr", "bn_batch_size",
                  "epochs", "seed", "status", "test_accuracy", "best_test_accuracy",
                  "final_train_loss", "epochs_completed", "steps", "wall_seconds",
                  # the instruments: docs/normalization.md, gradient_noise.md, sharp_minima.md
                  "alpha_batch_mean", "gns_b_simple", "gns_b_simple_mean",
                  "final_test_accuracy", "train_eval_accuracy", "train_eval_loss",
                  "generalization_gap", "sharpness", "trial_dir", "reason")


def run_sweep(base: Config, grid: grid_lib.Grid, extra_callbacks=(), pack=1):
    """Runs every valid point of `grid` (skipping finished ones); returns the result rows.
    `pack` > 1 or "auto" trains points that differ only in eta_tilde as packs
    (packed_sweep.py)."""
    out = base.output_dir
    distributed = distribute.has_tuner_chief()
    if distributed:
        _share_devices()
    # Points the strategy's replicas cannot split are skipped like other invalid points;
    # a keras-tuner chief only hands out points, so it creates no strategy.
    trains = not distributed or not distribute.is_tuner_chief()
    replicas = (distribute.make_strategy(base.strategy, base.tpu, base.tpu_timeout)
                .num_replicas_in_sync if trains else 1)
    valid, skipped = grid_lib.split_points(base, grid, lambda p: trial_dir(out, p), replicas)
    packing.check_grid(base, valid, pack)
    sweep_grid = _check_sweep_dir(base, grid, skipped)
    configs = {p.name: cfg for p, cfg in valid}
    skipped_names = {p.name: reason for p, reason in skipped}
    for name, reason in skipped_names.items():
        logging.warning("Skipping %s: %s", name, reason)
    if not distributed or distribute.is_tuner_chief():
        _write_hparams_config(out, sweep_grid)
    if packing.enabled(pack):  # keras-tuner hands out packs of points instead
        from sbt_keras import packed_sweep
        packed_sweep.search(out, grid, valid, skipped, pack, extra_callbacks)
        return write_results(out)

    hp = keras_tuner.HyperParameters()
    for field, values in grid.axes:  # best_lr is a function of batch_size, not an axis
        hp.Choice(field, list(values), default=values[0])
    oracle = ResumableGridOracle(
        objective=keras_tuner.Objective(OBJECTIVE, direction="max"), hyperparameters=hp,
        # Skipped points fail on purpose: real failures are counted by FailureLimit instead.
        max_consecutive_failed_trials=sweep_faults.NO_KERAS_TUNER_LIMIT)
    axes = [f for f, _ in grid.axes]
    points = {tuple(p.as_dict()[f] for f in axes): p for p in grid.points()}
    progress = SweepProgress(out, valid, len(skipped))  # trial headers, ETA, best so far
    tuner = _GridTuner(
        oracle=oracle, run_point=progress.wrap(lambda point: _run_point(
            out, point, configs, skipped_names, extra_callbacks)),
        point_of=lambda values: points[tuple(values[f] for f in axes)],
        directory=os.path.join(out, "tuner"),
        project_name=_grid_hash(grid), overwrite=False,
        failure_limit=base.sweep_failure_limit)
    retried = (sweep_faults.requeue_failed(tuner, skipped_names)
               if not distributed or distribute.is_tuner_chief() else [])
    tuner.search(verbose=0)
    rows = write_results(out)
    logging.info(sweep_faults.summary(rows, retried))
    progress.finished()
    return rows


def run_local_workers(argv, workers):
    """Runs the same sweep command as a keras-tuner chief plus `workers` worker processes on
    this machine (several trials at once: on one device, or one GPU each); returns the
    worst exit code."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "sbt_keras.run", *argv[1:]],
                              env={**os.environ, **extra, **children.parent_environment()})
             for extra in worker_environments(workers, port, _local_gpus())]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C or SIGTERM: stop the children too; re-run to resume
        for p in procs:
            p.terminate()
        for p in procs:  # each saves its checkpoint on SIGTERM before it exits
            p.wait()
        raise
    return max(codes, key=abs)


def worker_environments(workers, port, gpus):
    """The environment additions of the chief and each of `workers` local workers.

    With several GPUs, worker i sees only GPU i mod len(gpus) (N workers on N GPUs: one
    each; more workers than GPUs share them round-robin); with one GPU all workers share
    it. The chief only hands out grid points and is kept off the GPUs.
    """
    common = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}
    envs = [{**common, "KERASTUNER_TUNER_ID": "chief"}]
    if gpus:
        envs[0]["CUDA_VISIBLE_DEVICES"] = ""
    for i in range(workers):
        env = {**common, "KERASTUNER_TUNER_ID": f"worker{i}"}
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        envs.append(env)
    return envs


def _local_gpus():
    """This machine's GPU ids as CUDA_VISIBLE_DEVICES names them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() not in ("", "-1")]
    import tensorflow as tf
    return [str(i) for i in range(len(tf.config.list_physical_devices("GPU")))]


def _share_devices():
    """Several worker processes on one GPU: allocate memory as needed, not all at once."""
    import tensorflow as tf
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as error:  # devices already initialised
            logging.warning("Could not enable GPU memory growth: %s", error)


def trial_dir(output_dir, point):
    return os.path.join(output_dir, TRIALS_DIR, point.name)


def _run_point(out, point, configs, skipped_names, extra_callbacks):
    if point.name in skipped_names:
        raise keras_tuner.errors.FailedTrialError(skipped_names[point.name])
    try:
        result = train(configs[point.name], extra_callbacks=extra_callbacks)
    except Exception:  # a failed trial's row shows its error at once
        write_results(out)
        raise
    write_results(out)
    return {OBJECTIVE: result[OBJECTIVE]}


class _GridTuner(sweep_faults.FailureLimit, keras_tuner.Tuner):
    """Each trial is a full sbt_keras run; there is no hypermodel to build."""

    def __init__(self, oracle, run_point, point_of, **kwargs):
        super().__init__(oracle=oracle, hypermodel=None, **kwargs)
        self._run_point = run_point
        self._point_of = point_of  # keras-tuner's values -> our grid Point

    def run_trial(self, trial, *args, **kwargs):
        return self._run_point(self._point_of(trial.hyperparameters.values))

    def save(self):  # as keras-tuner's, with the tuner's own state file written atomically
        if not self._is_worker():
            self.oracle.save()
        _save_json_atomic(self._get_tuner_fname(), self.get_state())


# ---------------------------------------------------------------------- sweep records
def _check_sweep_dir(base, grid, skipped):
    """Refuses a directory holding another sweep or a single run; extends the grid otherwise.

    Returns the union grid (as {field: values}) now recorded in sweep.yaml.
    """
    out = base.output_dir
    path = os.path.join(out, SWEEP_FILE)
    mine = _comparable(base, grid)
    union = grid.as_dict()
    skipped_rows = {p.name: {"reason": reason, **p.as_dict()} for p, reason in skipped}
    if results.exists(os.path.join(out, results.CONFIG_FILE)):
        raise ConfigError(f"--output_dir={out} holds a single run, not a sweep; choose "
                          f"another --output_dir")
    if results.exists(path):
        stored = results.read_yaml(path) or {}
        theirs = stored.get("base", {})
        # A setting added since that sweep ran: it ran with the setting's legacy value.
        theirs = {**{k: v for k, v in legacy_values().items() if k in mine}, **theirs}
        _refuse_other_settings(out, theirs, mine)
        union = _union_grid(out, stored.get("grid") or {}, union)
        # Earlier points skipped by a smaller grid stay listed after an extension.
        skipped_rows = {**(stored.get("skipped") or {}), **skipped_rows}
    results.write_yaml(path, {"base": mine, "grid": union, "skipped": skipped_rows})
    return union


def _refuse_other_settings(out, theirs, mine):
    different = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if different:  # a key only one side has is a setting the other side sweeps
        shown = ", ".join(f"{k}: {_shown(theirs, k)} -> {_shown(mine, k)}" for k in different)
        raise ConfigError(f"--output_dir={out} holds a sweep with other settings ({shown}); "
                          f"use the same settings to resume or extend it, or choose a new "
                          f"--output_dir")


def _shown(settings, key):
    return repr(settings[key]) if key in settings else "swept"


def _union_grid(out, stored, union):
    """The stored grid extended by this one; best_log2_base_lr stays a {m: lr} mapping."""
    union = dict(union)
    for field, values in stored.items():
        if field != grid_lib.BEST_LR:
            union[field] = sorted(set(union.get(field, [])) | set(values))
    theirs, mine = stored.get(grid_lib.BEST_LR) or {}, union.get(grid_lib.BEST_LR) or {}
    changed = sorted(m for m in set(theirs) & set(mine) if theirs[m] != mine[m])
    if changed:  # the earlier sweep was extended since: two rates per m would mix in a curve
        m = changed[0]
        raise ConfigError(f"--output_dir={out} ran batch_size {m} at log2_base_lr "
                          f"{theirs[m]}, but --grid_best_lr_from now gives {mine[m]}; "
                          f"choose a new --output_dir")
    if theirs or mine:
        union[grid_lib.BEST_LR] = dict(sorted({**theirs, **mine}.items()))
    return union


def _comparable(base, grid):
    """Settings that must agree between a sweep and its extension: every run setting but the
    execution-only ones and the swept ones. The learning rate is fixed unless it is swept
    (or picked per m by --grid_best_lr_from); the seed unless --seeds > 1 sweeps it."""
    swept = {f for f, _ in grid.axes}
    if "log2_base_lr" in swept or grid.best_lr:
        swept |= {"base_lr", "log2_base_lr"}
    values = {k: v for k, v in base.to_dict().items()
              if k not in EXECUTION_FIELDS and k not in swept}
    if "base_lr" in values:  # one number, however it was given (--base_lr or --log2_base_lr)
        rate, log2_rate = values.pop("base_lr"), values.pop("log2_base_lr")
        values["log2_base_lr"] = float(log2_rate if rate is None else math.log2(rate))
    return values


def _grid_hash(grid):
    return "grid-" + hashlib.sha1(json.dumps(grid.as_dict(), sort_keys=True).encode()
                                  ).hexdigest()[:10]


def write_results(output_dir):
    """Rebuilds results.csv/.yaml from the trial directories (and skipped points)."""
    rows = []
    trials = os.path.join(output_dir, TRIALS_DIR)
    for name in sorted(results.listdir(trials)) if results.isdir(trials) else []:
        directory = os.path.join(trials, name)
        config_path = os.path.join(directory, results.CONFIG_FILE)
        result_path = os.path.join(directory, results.RESULT_FILE)
        if not (results.exists(config_path) and results.exists(result_path)):
            continue
        try:
            cfg = results.read_yaml(config_path)
            result = results.read_yaml(result_path) or {}
        except DamagedRecord as error:  # a row that says so, not a stopped sweep
            rows.append({"trial": name, "status": "damaged", "reason": str(error),
                         "trial_dir": os.path.relpath(directory, output_dir)})
            continue
        row = {k: cfg.get(k) for k in ("norm", "batch_size", "log2_base_lr", "base_lr",
                                       "bn_batch_size", "epochs", "seed")}
        # The BN batch the trial used (bn_batch_size=0 means the per-replica batch).
        row["bn_batch_size"] = (cfg.get("derived") or {}).get("bn_batch_size",
                                                               row["bn_batch_size"])
        row.update({k: result.get(k) for k in RESULT_COLUMNS if k in result})
        if result.get("error"):  # a failed trial's error, kept until it completes
            row["reason"] = first_line(result["error"], None)
        row.update(trial=name, trial_dir=os.path.relpath(directory, output_dir))
        rows.append(row)
    sweep_path = os.path.join(output_dir, SWEEP_FILE)
    sweep = (results.read_yaml(sweep_path) or {}) if results.exists(sweep_path) else {}
    # A skipped point names only its swept values; the fixed ones (the norm, unless swept)
    # come from the sweep's settings, so its row sorts and reads like the others.
    fixed = {k: v for k, v in (sweep.get("base") or {}).items() if k in grid_lib.AXES}
    for name, info in sorted((sweep.get("skipped") or {}).items()):
        rows.append({"trial": name, "status": "skipped", **fixed, **info})
    rows.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in grid_lib.AXES))
    results.write_csv(os.path.join(output_dir, RESULTS_STEM + ".csv"), rows, RESULT_COLUMNS)
    results.write_yaml(os.path.join(output_dir, RESULTS_STEM + ".yaml"), rows)
    return rows


def _sort_key(value):
    return (value is None, value if value is not None else 0)


# ---------------------------------------------------------------------- TensorBoard
def _write_hparams_config(output_dir, union_grid):
    """The HParams experiment: swept values as discrete domains, the paper's metrics."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    hparams = [hp.HParam(field, hp.Discrete(values))
               for field, values in _hparam_domains(union_grid).items()]
    metrics = [hp.Metric("median_test_accuracy", display_name="test accuracy (median of final)"),
               hp.Metric("accuracy", group="test", display_name="test accuracy"),
               hp.Metric("loss", group="train", display_name="train loss")]
    with tf.summary.create_file_writer(output_dir).as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)


def _hparam_domains(union_grid):
    """{hparam: values}: the swept fields, and with --grid_best_lr_from the rates it picked
    (eta_tilde is then a function of m, but still a setting each trial reports)."""
    domains = {f: v for f, v in union_grid.items() if f != grid_lib.BEST_LR}
    if grid_lib.BEST_LR in union_grid:
        domains["log2_base_lr"] = sorted(set(union_grid[grid_lib.BEST_LR].values()))
    return domains


# ---------------------------------------------------------------------- keras-tuner fix
class ResumableGridOracle(HandOutEveryPointAtOnce, keras_tuner.oracles.GridSearchOracle):
    """A GridSearchOracle that hands every worker a different point at once
    (parallel_grid.py), so no grid cursor needs saving (see module docstring), and writes its state files atomically: keras-tuner writes them in place, so a kill during
    a save would leave truncated JSON that stops the sweep's resume."""

    def save(self):
        _save_json_atomic(self._get_oracle_fname(), self.get_state())

    def _save_trial(self, trial):
        _save_json_atomic(os.path.join(self._get_trial_dir(trial.trial_id), "trial.json"),
                          trial.get_state())


def _save_json_atomic(path, state):
    results.write_text_atomic(path, json.dumps(state))
