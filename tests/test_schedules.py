"""Schedule values at the paper's boundaries, against numbers written out by hand."""
import pytest
import tensorflow as tf

from sbt_keras.config import Config
from sbt_keras.training import schedules


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_step_decay_at_half_and_three_quarters():
    # 1000 iterations, base 0.1: 0.1 for k < 500, 0.01 for 500 <= k < 750, then 0.001.
    s = schedules.WarmupStepDecay(0.1, boundaries=(500, 750), decay_factor=0.1)
    got = _values(s, [0, 499, 500, 749, 750, 999])
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-6)


def test_gradual_warmup_from_one_32nd_over_five_percent():
    # 5% of 1000 iterations = 50 warm-up steps, from 0.1/32 linearly up to 0.1.
    s = schedules.WarmupStepDecay(0.1, boundaries=(500, 750), warmup_steps=50,
                                  warmup_start_factor=1 / 32)
    got = _values(s, [0, 25, 49, 50, 51, 500, 750])
    expected = [0.1 / 32, 0.1 * (1 / 32 + (31 / 32) * 25 / 50),
                0.1 * (1 / 32 + (31 / 32) * 49 / 50), 0.1, 0.1, 0.01, 0.001]
    assert got == pytest.approx(expected, rel=1e-6)


def test_from_config_uses_fractions_or_epochs():
    cfg = Config(model="resnet8", dataset="synthetic", base_lr=0.25, batch_size=8, epochs=82,
                 warmup=True).resolve()
    s = schedules.from_config(cfg, steps_per_epoch=100)  # 8200 iterations
    assert s.boundaries == (4100, 6150)
    assert s.warmup_steps == 410
    assert float(s(0)) == pytest.approx(0.25 / 32)
    assert float(s(410)) == pytest.approx(0.25)
    by_epoch = Config(model="resnet8", dataset="synthetic", base_lr=1.0, batch_size=8,
                      epochs=90, lr_decay_epochs=(30, 60, 80)).resolve()
    s = schedules.from_config(by_epoch, steps_per_epoch=10)
    assert s.boundaries == (300, 600, 800)
    assert _values(s, [299, 300, 600, 800]) == pytest.approx([1.0, 0.1, 0.01, 0.001])


def test_get_config_round_trip():
    s = schedules.WarmupStepDecay(0.5, (10, 20), 0.2, 5, 0.25)
    t = schedules.WarmupStepDecay(**s.get_config())
    assert _values(s, range(25)) == _values(t, range(25))


@pytest.mark.parametrize("fraction, numerator, denominator",
                         [(0.5, 1, 2), (0.75, 3, 4), (0.05, 1, 20), (0.29, 29, 100)])
def test_steps_at_rounds_halves_up_exactly(fraction, numerator, denominator):
    # floor(n/d * total + 1/2) in integers: (2 n total + d) // (2 d). 0.29 * 50 is
    # 14.499999999999998 in floats; round() sends 0.5 * 1001 = 500.5 to the even 500.
    for total in list(range(1, 400)) + [1001, 2 ** 53 + 1]:
        want = (2 * numerator * total + denominator) // (2 * denominator)
        assert schedules.steps_at(fraction, total) == want, (fraction, total)
    assert schedules.decay_boundaries(1001, 7, (0.5, 0.75)) == (501, 751)


def test_from_config_rounds_boundaries_and_warmup_half_up():
    cfg = Config(model="resnet8", dataset="synthetic", base_lr=0.25, batch_size=8, epochs=41,
                 warmup=True).resolve()
    s = schedules.from_config(cfg, steps_per_epoch=10)  # 410 iterations
    assert s.boundaries == (205, 308) and s.warmup_steps == 21  # 307.5, 20.5 round up
    s = schedules.from_config(cfg, steps_per_epoch=5)  # 205 iterations
    assert s.boundaries == (103, 154) and s.warmup_steps == 10  # 102.5, 153.75, 10.25


@pytest.mark.parametrize("boundary", [2 ** 24 + 1, 2 ** 33 + 1])
def test_boundaries_compare_steps_exactly_past_float32(boundary):
    # float32 rounds 2**24 + 1 to 2**24: a float comparison would decay one step early.
    s = schedules.WarmupStepDecay(1.0, boundaries=(boundary,), decay_factor=0.5,
                                  warmup_steps=4)
    steps = tf.constant([boundary - 1, boundary, boundary + 1], tf.int64)
    assert s(steps).numpy().tolist() == [1.0, 0.5, 0.5]
    iterations = tf.Variable(boundary - 1, dtype=tf.int64)  # as the optimizer holds it
    assert float(s(iterations)) == 1.0
    # The warm-up ramp is unaffected: 1/32 + (31/32) * k / 4.
    assert _values(s, [0, 2, 4]) == pytest.approx([1 / 32, 1 / 32 + 31 / 64, 1.0], rel=1e-6)
