"""epsilon-sharpness measured while training: `--sharpness=final`, `--sharpness_every=K`.

At the end of each measured epoch (every K-th, and/or the last) the network's
epsilon-sharpness (sbt_keras/sharpness.py; the first of --sharpness_epsilons, subspace
dimension --sharpness_p, L-BFGS-B budget --sharpness_maxiter) is measured on a fixed sample
of --sharpness_sample un-augmented training examples (train_sample.py, seed 0: the same
examples at every epoch and in every run of a sweep; the subspace A is drawn with seed 0
too), batch norm in inference mode. The value goes into the epoch's history.csv row
(columns `sharpness`, `sharpness_seconds`), TensorBoard (train/sharpness), and, for the
last epoch, result.yaml and a sweep's results.csv (`sharpness`).

When it runs, and why: in `on_epoch_end`, after the evaluation and BEFORE the history row
and the epoch-end checkpoint (the callback sits before EpochRecorder and Checkpointer), and
hands its values to them in the epoch's logs. So the row is written once, with the value,
and the run's invariant "an epoch-end checkpoint always has its row" stays true. A kill
during the measurement leaves neither row nor checkpoint of that epoch: the resumed run
redoes the epoch (from its last checkpoint) and the measurement; nothing is half recorded.
The price is redoing that much training; SIGTERM during a measurement stops it at the next
evaluation and ends the run as preempted at once, for the same resume.

Measuring does not change training: FlatLoss evaluates in inference mode (no moving
statistic is updated), restores the weights bit for bit, touches neither the optimizer nor
the metrics, and draws its randomness from its own numpy generators.
tests/test_sharpness_callback.py checks identical histories and weights with and without.
`wall_seconds` includes the measurement; `sharpness_seconds` says how much of it that was.
"""
import math
import time

import keras
from absl import logging

from sbt_keras.errors import ConfigError, Preempted
from sbt_keras.training import train_sample

COLUMNS = ("sharpness", "sharpness_seconds")


def enabled(cfg):
    return cfg.sharpness == "final" or cfg.sharpness_every > 0


def probe(cfg):
    """The EpochRecorder probe of this run's sharpness columns: the values the callback put
    in the epoch's logs, empty at epochs it does not measure; {} when it measures nothing."""
    columns = COLUMNS if enabled(cfg) else ()
    return lambda logs: {c: float(logs[c]) if c in logs else None for c in columns}


def measured(cfg, epoch):
    """Whether the end of `epoch` (1-based) is measured."""
    return ((cfg.sharpness == "final" and epoch == cfg.epochs)
            or (cfg.sharpness_every > 0 and epoch % cfg.sharpness_every == 0))


def for_run(cfg, network, divergence, preemption=None, strategy=None):
    """[SharpnessCallback] for a run that measures, else []. Loads the sample and checks
    --sharpness_p against the network's parameter count (ConfigError) before training."""
    if not enabled(cfg):
        return []
    size = sum(int(math.prod(v.shape)) for v in network.trainable_variables)
    if cfg.sharpness_p > size:
        raise ConfigError(f"--sharpness_p={cfg.sharpness_p} is larger than the network's "
                          f"{size} trainable parameters; use at most {size}, or 0 for the "
                          f"full space")
    images, labels = train_sample.standardized(cfg, cfg.sharpness_sample)
    replicated = strategy is not None and strategy.num_replicas_in_sync > 1
    return [SharpnessCallback(
        network, images, labels, due=lambda epoch: measured(cfg, epoch),
        epsilon=cfg.sharpness_epsilons[0], p=cfg.sharpness_p, maxiter=cfg.sharpness_maxiter,
        divergence=divergence, preemption=preemption,
        strategy=strategy if replicated else None)]


class SharpnessCallback(keras.callbacks.Callback):
    """Puts `sharpness` and `sharpness_seconds` into the logs of each measured epoch.

    due(epoch) -> bool, epoch 1-based; p: subspace dimension, 0 for the full space.
    divergence: DivergenceStop (nothing is measured once training diverged); preemption:
    callbacks.Preemption or None; strategy: None, or the strategy to split chunks over.
    """

    def __init__(self, network, images, labels, *, due, epsilon, p, maxiter, divergence,
                 preemption=None, strategy=None, seed=train_sample.SAMPLE_SEED):
        super().__init__()
        self.network, self.images, self.labels = network, images, labels
        self.due, self.epsilon, self.p, self.maxiter = due, epsilon, p, maxiter
        self.divergence, self.preemption, self.strategy = divergence, preemption, strategy
        self.seed = seed

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.divergence.diverged or not self.due(epoch + 1):
            return
        from sbt_keras.sharpness import measure_sharpness

        def stop_if_preempted(epsilon, value):
            if self.preemption is not None and self.preemption.requested:
                raise Preempted(f"preempted while measuring the sharpness at the end of "
                                f"epoch {epoch + 1}; the epoch is redone on resume")

        started = time.monotonic()
        result, = measure_sharpness(
            self.network, self.images, self.labels, epsilons=(self.epsilon,),
            p=self.p or None, seed=self.seed, maxiter=self.maxiter, strategy=self.strategy,
            on_evaluation=stop_if_preempted)
        logs["sharpness"] = result.phi
        logs["sharpness_seconds"] = time.monotonic() - started
        logging.info("epoch %d: sharpness %.4g (eps %g, %s, N = %d, %d evaluations, %.1f s)",
                     epoch + 1, result.phi, self.epsilon,
                     f"p = {self.p}" if self.p else "full space", len(self.labels),
                     result.evaluations, logs["sharpness_seconds"])
