"""The figure-cost arithmetic (sbt_keras/cost.py, tools/figure_cost.py) against hand-worked
numbers; nothing is timed."""
import pytest

from sbt_keras import cost
from tools import figure_cost

# One trial's step: 6 ms + 2 ms per example; a pack of 8: 24 ms + 8 ms per example.
SINGLE = {2: 10.0, 4: 14.0}
PACKED = {2: 40.0, 4: 56.0}


def test_step_time_is_linear_in_m_and_extrapolates_the_last_segment():
    assert cost.interpolated_seconds(SINGLE, 3) == pytest.approx(0.012)
    assert cost.interpolated_seconds(SINGLE, 8) == pytest.approx(0.022)  # 6 + 2·8 ms


def test_figure_seconds_by_hand():
    # m = 2: 100 steps + 60 test examples / 2 / 3 = 110 step-times; m = 4: 50 + 5 = 55.
    trials = [(2, 100, 60, 8), (4, 50, 60, 8)]
    single, packed = cost.figure_seconds(trials, SINGLE, PACKED, k=8, overhead_s=1.0)
    assert single == pytest.approx(110 * 0.010 + 55 * 0.014 + 2.0)
    assert packed == pytest.approx(110 * 0.040 / 8 + 55 * 0.056 / 8 + 2.0)
    # Alone in its pack (one eta_tilde at its m), a trial costs what it costs unpacked.
    alone = [(2, 100, 60, 1)]
    assert cost.figure_seconds(alone, SINGLE, PACKED, k=8) == pytest.approx((1.1, 1.1))


def test_hours_table_sums_a_figures_sweeps():
    trials = [(2, 3600, 0, 8)]  # 3,600 steps: 36 s at 10 ms, 18 s at 40 ms / 8
    grids = {"fig13": (("resnet32", "batch"), trials),
             "fig13_cifar100": (("resnet32", "batch"), trials)}
    times = {"resnet32:batch": {"single": SINGLE, "packed": PACKED}}
    (row,) = figure_cost.hours_table(grids, times, k=8)
    overhead = 2 * cost.DOCUMENTED_TRIAL_OVERHEAD_S
    assert row[:3] == ("13", 2, "resnet32:batch")
    assert row[3] == pytest.approx((2 * 36 + overhead) / 3600)
    assert row[4] == pytest.approx((2 * 3600 * 0.040 / 8 + overhead) / 3600)


def test_figure_grid_is_the_sweeps():
    # Fig. 4: ResNet-32, m = 4 ... 1024 at one eta_tilde, 82 epochs of CIFAR-10.
    pair, trials = figure_cost.figure_trials("experiments/figures/fig04.flags")
    assert pair == ("resnet32", "batch")
    assert [t[0] for t in trials] == [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert trials[0] == (4, 82 * 12500, 82 * 10000, 1)  # one eta_tilde: nothing to pack
    _, fig1 = figure_cost.figure_trials("experiments/figures/fig01.flags", k=8)
    assert sorted(t[3] for t in fig1 if t[0] == 2) == [5] * 5 + [8] * 8
