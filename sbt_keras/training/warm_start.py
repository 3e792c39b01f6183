"""Warm starts: `--init_from=RUN_DIR[:EPOCH]` (Keskar et al. 2017, Sec. 4: large-batch
training started from a small-batch iterate).

A fresh run (no checkpoint of its own) starts from every variable of the source run's
network at the end of EPOCH (default: its newest checkpoint; earlier epochs need the
source to have been trained with --keep_checkpoint_every_epochs): trainable weights, BN
moving statistics and any other network state (batch renorm's step counter). Everything
else is the new run's own: a fresh optimizer whose step count starts at 0, so its learning
rate schedule, warm-up and decay start from the beginning; its data order and
augmentation from its own --seed. A resumed warm-started run resumes from its own
checkpoints and never reads the source again.

`check_source` (called by Config.resolve, no TensorFlow) refuses, in one line, a source
that is not a run directory, holds no checkpoint (at EPOCH), or is another model,
normalization or data shape; `apply` (called once by train.py after the model is built)
copies the weights and refuses variables that still differ in shape.
"""
from absl import logging

from sbt_keras.errors import ConfigError

SAME_MODEL = ("model", "norm", "norm_dense")


def parse(text):
    """'RUN_DIR[:EPOCH]' -> (run_dir, epoch or None); a trailing ':digits' is the epoch."""
    head, separator, tail = text.rpartition(":")
    if separator and tail.isdigit() and head:
        return head, int(tail)
    return text, None


def check_source(cfg, info):
    """ConfigError (one line) unless `cfg.init_from` is a run of the same model and data
    shape with a checkpoint at the asked epoch. `info`: cfg's DataInfo."""
    from sbt_keras.training import snapshot

    flag = f"--init_from={cfg.init_from}"
    run_dir, epoch = parse(cfg.init_from)
    try:
        stored = snapshot.read_config(run_dir)
    except ConfigError as error:
        raise ConfigError(f"{flag}: {error}") from None
    differences = [f"{k} {stored.get(k)!r} here {getattr(cfg, k)!r}" for k in SAME_MODEL
                   if stored.get(k) != getattr(cfg, k)]
    derived = stored.get("derived") or {}
    if list(derived.get("image_shape") or []) != list(info.image_shape):
        differences.append(f"image shape {derived.get('image_shape')} here "
                           f"{list(info.image_shape)}")
    if derived.get("num_classes") != info.num_classes:
        differences.append(f"{derived.get('num_classes')} classes here {info.num_classes}")
    if differences:
        raise ConfigError(f"{flag} is another network: source {'; '.join(differences)}; "
                          f"warm-start from a run of the same model, normalization and data "
                          f"shape")
    checkpoints = snapshot.available(run_dir)
    if not checkpoints:
        raise ConfigError(f"{flag}: {run_dir} holds no checkpoint to start from")
    steps_per_epoch = derived["steps_per_epoch"]
    if epoch is not None and epoch * steps_per_epoch not in checkpoints:
        kept = ", ".join(snapshot._epoch_names(checkpoints, steps_per_epoch))
        raise ConfigError(f"{flag}: {run_dir} has no checkpoint at the end of epoch {epoch} "
                          f"(kept: {kept}); train the source with "
                          f"--keep_checkpoint_every_epochs to keep earlier epochs")


def apply(cfg, network, start_step):
    """Copies the source network's variables into `network` when the run starts fresh
    (start_step == 0) with --init_from; returns the source Snapshot (None otherwise)."""
    if not cfg.init_from or start_step:
        return None
    from sbt_keras.training import snapshot

    run_dir, epoch = parse(cfg.init_from)
    source = snapshot.load(run_dir, epoch)
    mine, theirs = network.weights, source.network.weights
    shapes = [tuple(v.shape) for v in mine], [tuple(v.shape) for v in theirs]
    if shapes[0] != shapes[1]:
        first = next((f"{a.path} {tuple(a.shape)} vs {tuple(b.shape)}"
                      for a, b in zip(mine, theirs) if tuple(a.shape) != tuple(b.shape)),
                     f"{len(mine)} vs {len(theirs)} variables")
        raise ConfigError(f"--init_from={cfg.init_from}: the source network's variables "
                          f"differ from this run's ({first})")
    for variable, value in zip(mine, theirs):
        variable.assign(value.numpy())
    logging.info("Warm start: %s's network at epoch %g (step %d); fresh optimizer.",
                 run_dir, source.epoch, source.step)
    return source
