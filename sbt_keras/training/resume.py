"""Resuming a run: what its directory already holds, and what training does next.

`resume_plan` is the decision, a pure function of step counts: which epochs `fit` runs and
from which batch, and which history rows stay. `check_output_dir` refuses a directory that
holds something else; `restore_latest` loads the newest readable checkpoint. The data
stream is a pure function of (seed, epoch, batch) (data/pipeline.py), so a run resumed at
(epoch, batch) sees exactly the batches an uninterrupted run would.
"""
import csv
import dataclasses
import io
import os
import re

from absl import logging

from sbt_keras import models, results, storage
from sbt_keras.config import EXECUTION_FIELDS, legacy_values
from sbt_keras.errors import ConfigError, DamagedRecord, first_line

CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One `fit` call: epochs [first, last), the first of them starting at batch `skip`."""
    first: int
    last: int
    skip: int


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What a run does next, given the global step its checkpoint holds."""
    start_step: int
    initial_epoch: int  # the epoch the checkpoint is in (0-based)
    skip: int  # steps of `initial_epoch` already done; > 0: resumed mid-epoch
    phases: tuple  # Phase, ...; empty when every epoch is done
    history_rows: int  # history.csv rows that stay; later ones are redone

    @property
    def mid_epoch(self):
        """The epoch's running metric sums come from the checkpoint, not from zero."""
        return self.skip > 0


def resume_plan(start_step, *, steps_per_epoch, epochs, steps_per_execution,
                history_rows) -> ResumePlan:
    """The plan for a run whose newest checkpoint is at global step `start_step` (0: none)
    and whose history.csv has `history_rows` rows.

    A run resumed mid-epoch first finishes that epoch from its next batch, then trains the
    remaining epochs from their first batch: two `fit` calls, since `fit` starts every epoch
    at batch 0. Raises ConfigError if the checkpoint sits inside a block of
    `steps_per_execution` steps (Keras runs whole blocks), and RuntimeError if history.csv
    lacks a row of an epoch the checkpoint has finished (an epoch end is only saved after
    its row is written, so that means the records were changed by hand).
    """
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    initial_epoch, skip = divmod(start_step, steps_per_epoch)
    if skip % steps_per_execution:
        raise ConfigError(f"the checkpoint is at step {start_step}, inside a block of "
                          f"--steps_per_execution={steps_per_execution}; resume with a "
                          f"divisor of {skip}")
    if history_rows < initial_epoch:
        raise RuntimeError(f"the checkpoint at step {start_step} is past epoch "
                           f"{initial_epoch}, but history.csv has {history_rows} rows; the "
                           f"records are inconsistent, start a new --output_dir")
    phases = []
    if skip:
        phases.append(Phase(initial_epoch, initial_epoch + 1, skip))
    first_whole = initial_epoch + (1 if skip else 0)
    if first_whole < epochs:
        phases.append(Phase(first_whole, epochs, 0))
    return ResumePlan(start_step=start_step, initial_epoch=initial_epoch, skip=skip,
                      phases=tuple(phases), history_rows=initial_epoch)


def restore_latest(directory, checkpoint, model, *, steps_per_epoch=None, history_rows=None):
    """Restores the newest readable checkpoint in `directory`; returns its global step
    (0: none).

    A truncated or corrupted newest checkpoint is reported and the previous one used; if
    none is readable the run starts from its initial weights. The checkpoints are those the
    state file lists and every `ckpt-N.index` beside it, so a damaged or lost state file
    loses none. With `history_rows` (and `steps_per_epoch`), checkpoints past the epochs
    history.csv holds (its damaged last row was dropped) are passed over for an earlier one,
    from which the missing rows are recomputed; DamagedRecord if only such ones are readable.
    """
    paths = checkpoint_paths(directory)
    if not paths:
        return 0
    past = []
    if history_rows is not None:
        past = [p for p in paths if (_step_of(p) or 0) // steps_per_epoch > history_rows]
        paths = [p for p in paths if p not in past]
        if past:
            logging.warning("%s: history.csv has %d epoch rows but checkpoint(s) %s are past "
                            "them; resuming from an earlier one, the missing rows are "
                            "recomputed", directory, history_rows,
                            ", ".join(os.path.basename(p) for p in past))
    initial = [v.numpy() for v in model.variables] + [model.optimizer.iterations.numpy()]
    for path in reversed(paths):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
            return int(model.optimizer.iterations.numpy())
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
            logging.warning("Checkpoint %s is unreadable (%s: %s); trying an older one.",
                            path, type(error).__name__, first_line(error))
    for variable, value in zip([*model.variables, model.optimizer.iterations], initial):
        variable.assign(value)
    if past:
        raise DamagedRecord(
            f"{os.path.dirname(directory.rstrip('/'))}: history.csv holds {history_rows} "
            f"epochs, but the only readable checkpoints ({os.path.basename(past[-1])}, ...) "
            f"are past them, so the missing rows cannot be recomputed; restore history.csv "
            f"from a copy, or delete {directory} to train again from scratch")
    logging.warning("No readable checkpoint in %s; starting from scratch.", directory)
    return 0


STATE_FILE = "checkpoint"  # tf.train.CheckpointManager's list of checkpoints
_CKPT = re.compile(r"ckpt-(\d+)$")


def _step_of(prefix):
    match = _CKPT.search(os.path.basename(prefix))
    return int(match.group(1)) if match else None


def _read_state(directory):
    """(listed prefixes, damaged): the checkpoints the state file lists."""
    import tensorflow as tf

    state_path = os.path.join(directory, STATE_FILE)
    if not tf.io.gfile.exists(state_path):
        return [], False
    try:
        state = tf.train.get_checkpoint_state(directory)  # None for unparseable text
    except Exception:  # noqa: BLE001 - empty or undecodable state file
        state = None
    if state is None:
        return [], True
    return [os.path.join(directory, os.path.basename(p))
            for p in state.all_model_checkpoint_paths], False


def checkpoint_paths(directory):
    """Checkpoint prefixes in `directory`, oldest first: the state file's list and every
    `ckpt-N.index` file there, so that a garbage or lost state file loses no checkpoint."""
    import tensorflow as tf

    listed, damaged = _read_state(directory)
    if damaged:
        logging.warning("The checkpoint state file %s is unreadable; using the ckpt-* "
                        "files beside it.", os.path.join(directory, STATE_FILE))
    found = [name[:-len(".index")] for name in
             tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))]
    paths = {os.path.basename(p): os.path.join(directory, os.path.basename(p))
             for p in listed + found}
    return sorted(paths.values(), key=lambda p: (_step_of(p) is None, _step_of(p) or 0))


def repair_state(directory):
    """Rewrites a garbage checkpoint state file from the ckpt-* files (tf.train's
    CheckpointManager would otherwise fail on it, or forget the checkpoints)."""
    import tensorflow as tf

    _, damaged = _read_state(directory)
    if not damaged:
        return
    paths = checkpoint_paths(directory)
    if paths:
        tf.compat.v1.train.update_checkpoint_state(
            directory, paths[-1], all_model_checkpoint_paths=paths)
    else:
        tf.io.gfile.remove(os.path.join(directory, STATE_FILE))


def read_history(output_dir):
    """history.csv's rows, without a damaged tail: a partial last line (a write cut short
    on a filesystem without atomic rename, a copy cut short) and any row after the first
    incomplete or non-numeric one are dropped with a warning; the resume recomputes them."""
    path = os.path.join(output_dir, results.HISTORY_FILE)
    if not results.exists(path):
        return []
    if results.is_url(path):
        import tensorflow as tf
        with tf.io.gfile.GFile(path, "rb") as f:
            raw = f.read()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    text = raw.decode("utf-8", "replace")
    complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
    rows = [{k: results._number(v) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(complete))]
    good = []
    for row in rows:
        values = [row.get(column) for column in results.HISTORY_COLUMNS]
        if (None in row or not all(isinstance(v, (int, float)) for v in values)
                or row["epoch"] != len(good) + 1):
            break
        good.append(row)
    dropped = len(rows) - len(good) + (complete != text)
    if dropped:
        logging.warning("%s: dropped %d damaged row(s) after epoch %d; they are recomputed "
                        "from the checkpoint", path, dropped, len(good))
    return good


def open_checkpoints(model, extra, *, restore_from, save_to, cfg, steps_per_epoch,
                     history_rows):
    """(checkpoint, manager, plan): the checkpoint of `model`, its optimizer and the `extra`
    trackables ({name: variable or list}), with the newest readable checkpoint of run
    directory `restore_from` restored, a manager saving into run directory `save_to` (a
    multi-worker run's non-chief workers restore the chief's and save to scratch), and the
    plan that follows from the restored step. The checkpoint's `write` and the manager's
    `save` report a full disk as such (storage.py)."""
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, **extra)
    save_dir = os.path.join(save_to, CHECKPOINT_DIR)
    own = save_to == restore_from  # this process keeps the records it resumes from
    if own:
        repair_state(save_dir)
    manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=3)
    start_step = restore_latest(
        os.path.join(restore_from, CHECKPOINT_DIR), checkpoint, model,
        **(dict(steps_per_epoch=steps_per_epoch, history_rows=history_rows) if own else {}))
    plan = resume_plan(start_step, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                       steps_per_execution=cfg.steps_per_execution, history_rows=history_rows)
    return (storage.guard_checkpoint(checkpoint, save_dir), storage.guard_manager(manager),
            plan)


def stored_config(output_dir):
    """The config.yaml a directory already holds, or {}."""
    path = os.path.join(output_dir, results.CONFIG_FILE)
    return (results.read_yaml(path) or {}) if results.exists(path) else {}


def check_output_dir(cfg, info, stored):
    """None for a new or resumable run; the stored result if this run already finished.

    Raises ConfigError if the directory holds a sweep, or a different run: other settings
    (execution-only ones aside), or other data sizes (a CIFAR subset where the full set
    was, say, under the same paths).
    """
    if results.exists(os.path.join(cfg.output_dir, results.SWEEP_FILE)):
        raise ConfigError(f"--output_dir={cfg.output_dir} holds a sweep, not a single run; "
                          f"choose another --output_dir")
    if not stored:
        return None
    mine = cfg.to_dict()
    stored = {**legacy_values(), **stored}  # records from before a setting existed
    different = sorted(k for k in mine if k not in EXECUTION_FIELDS
                       and stored.get(k) != mine[k])
    shown = [f"{k}: {stored.get(k)!r} -> {mine[k]!r}" for k in different]
    sizes = stored.get("derived") or {}
    revision = sizes.get("model_revision", 1)
    if revision != models.spec(cfg.model).revision:
        shown.append(f"{cfg.model} revision {revision} -> {models.spec(cfg.model).revision}"
                     f" (docs/changes.md)")
    for key, now in (("num_train", info.num_train), ("num_test", info.num_test)):
        if key in sizes and sizes[key] != now:
            shown.append(f"{key}: {sizes[key]!r} -> {now!r}")
    if shown and not trained(cfg.output_dir):
        # Nothing was trained there (it stopped before its first checkpoint, e.g. failing to
        # download the data): its records protect nothing, and the corrected command
        # replaces them.
        logging.info("%s holds the records of a run that never trained (%s); replacing them.",
                     cfg.output_dir, ", ".join(shown[:3]))
        return None
    if shown:
        raise ConfigError(f"--output_dir={cfg.output_dir} holds a different run "
                          f"({', '.join(shown[:3])}); choose a new --output_dir or delete "
                          f"the old one")
    result_path = os.path.join(cfg.output_dir, results.RESULT_FILE)
    if results.exists(result_path):
        result = results.read_yaml(result_path) or {}
        if result.get("status") in ("completed", "diverged"):
            return result
    return None


def trained(output_dir):
    """Whether a run directory holds any training: a history row or a checkpoint."""
    history = os.path.join(output_dir, results.HISTORY_FILE)
    if results.exists(history) and results.read_csv(history):
        return True
    return results.exists(os.path.join(output_dir, CHECKPOINT_DIR, "checkpoint"))


def check_bn_batch(stored, bn_batch_size, replicas, output_dir):
    """Refuses resuming on a replica count that changes the BN batch: --bn_batch_size=0
    means "the per-replica batch", so another replica count would silently resume with
    other BN statistics."""
    before = stored.get("derived", {})
    if before.get("bn_batch_size", bn_batch_size) != bn_batch_size:
        raise ConfigError(
            f"--output_dir={output_dir} was trained with BN over {before['bn_batch_size']} "
            f"examples on {before.get('replicas')} replicas; on {replicas} it would be "
            f"{bn_batch_size}: resume with {before.get('replicas')} replicas")
