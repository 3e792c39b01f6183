"""The gradient noise scale over training (McCandlish et al. 2018), from the squared norms
the train step measures every `--gns_every_steps` steps (training/summed_sgd.py).

`NoiseRecorder` feeds each measurement to a `GradientNoiseScale` (separately smoothed,
bias-corrected |G|^2 and tr(Sigma); sbt_keras/gradient_noise.py), keeps its state in
variables the run checkpoints (a resumed run continues the same averages), and gives each
epoch's values to the history, TensorBoard and result.yaml.
"""
import math

import keras
import tensorflow as tf

from sbt_keras.gradient_noise import GradientNoiseScale
from sbt_keras.training.summed_sgd import NOISE_LOGS

COLUMNS = ("gns_grad_sq", "gns_trace", "gns_b_simple")


class NoiseRecorder(keras.callbacks.Callback):
    """Smooths the measured norms; `epoch_values()` is an EpochRecorder probe."""

    def __init__(self, ema):
        super().__init__()
        self.scale = GradientNoiseScale(ema)
        # The smoothed state, checkpointed: (updates, |G|^2 average, tr(Sigma) average).
        self.state = tf.Variable([0.0, 0.0, 0.0], dtype=tf.float64, trainable=False,
                                 name="gradient_noise_state")

    def on_train_begin(self, logs=None):
        steps, grad_sq, trace = self.state.numpy()
        self.scale = GradientNoiseScale.from_state(
            {"ema": self.scale.ema, "steps": int(steps), "grad_sq_ema": float(grad_sq),
             "trace_ema": float(trace)})

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if NOISE_LOGS[0] not in logs:
            return
        small_sq, big_sq, b_small, b_big = (float(logs[k]) for k in NOISE_LOGS)
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return  # a diverging step: DivergenceStop ends the run
        self.scale.update(small_sq, big_sq, b_small, b_big)
        state = self.scale.get_state()
        self.state.assign([state["steps"], state["grad_sq_ema"], state["trace_ema"]])

    def epoch_values(self, logs=None):
        """{column: smoothed value at the epoch's end} (NaN before the first measurement);
        an EpochRecorder probe."""
        return dict(zip(COLUMNS, (self.scale.grad_sq, self.scale.trace,
                                  self.scale.b_simple)))


def summary(rows):
    """result.yaml's gradient-noise entries from the history rows: the final smoothed
    B_simple, and its mean over the epochs that have one."""
    values = [r.get("gns_b_simple") for r in rows]
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not finite:
        return {}
    return {"gns_b_simple": finite[-1], "gns_b_simple_mean": sum(finite) / len(finite)}
