"""Learning-rate schedule over iterations: Goyal-style gradual warm-up, then step decay.

The schedule returns the *base* learning rate eta_tilde(k) applied to the summed gradient,
so the mean-gradient learning rate is eta(k) = batch_size * eta_tilde(k). At iteration k
(0-based, the k-th update):

    multiplier(k) = decay_factor ** #{b in boundaries : k >= b}
                    * (start + (1 - start) * k / warmup_steps   if k < warmup_steps else 1)

With the paper's settings: start = 1/32, warmup_steps = 5% of all iterations, boundaries at
50% and 75% of all iterations, decay_factor = 0.1.
"""

import keras
from keras import ops

from sbt_keras.config import steps_at


def decay_boundaries(total_steps, steps_per_epoch, fractions=(), epochs=()):
    """Iteration indices at which the learning rate is multiplied by the decay factor.

    `epochs` (if given) wins over `fractions`; fractions are of all iterations (steps_at).
    """
    if epochs:
        return tuple(int(e) * steps_per_epoch for e in epochs)
    return tuple(steps_at(f, total_steps) for f in fractions)


@keras.saving.register_keras_serializable(package="sbt_keras")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """eta_tilde(k): optional linear warm-up, then piecewise-constant decay."""

    def __init__(self, base_lr, boundaries=(), decay_factor=0.1, warmup_steps=0,
                 warmup_start_factor=1.0 / 32):
        self.base_lr = float(base_lr)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)

    def __call__(self, step):
        # Steps are compared as integers: float32 is inexact past 2**24 steps (ImageNet at
        # m=4 runs 2.9e7). Only the warm-up ramp's fraction is a float.
        step = ops.cast(step, "int64")
        multiplier = ops.ones_like(step, dtype="float32")
        for boundary in self.boundaries:
            multiplier = ops.where(step >= boundary, multiplier * self.decay_factor,
                                   multiplier)
        if self.warmup_steps > 0:
            start = self.warmup_start_factor
            ramp = start + (1.0 - start) * ops.cast(step, "float32") / float(self.warmup_steps)
            multiplier = ops.where(step < self.warmup_steps, multiplier * ramp, multiplier)
        return self.base_lr * multiplier

    def get_config(self):
        return {"base_lr": self.base_lr, "boundaries": list(self.boundaries),
                "decay_factor": self.decay_factor, "warmup_steps": self.warmup_steps,
                "warmup_start_factor": self.warmup_start_factor}


def from_config(cfg, steps_per_epoch):
    """The schedule a resolved Config asks for."""
    total = cfg.epochs * steps_per_epoch
    boundaries = decay_boundaries(total, steps_per_epoch, cfg.lr_decay_fractions,
                                  cfg.lr_decay_epochs)
    warmup_steps = steps_at(cfg.warmup_fraction, total) if cfg.warmup else 0
    return WarmupStepDecay(cfg.base_lr, boundaries, cfg.lr_decay_factor, warmup_steps,
                           cfg.warmup_start_factor)
