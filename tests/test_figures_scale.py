"""Figures at the paper's scale: 11 batch sizes x 13 base learning rates (no training)."""
import itertools
import math

import matplotlib.colors as mcolors
import pytest

from sbt_keras import results
from tools import figures

SIZES = [2 ** k for k in range(1, 12)]  # m = 2 ... 2048
RATES = list(range(-12, 1))  # log2 eta_tilde = -12 ... 0


def paper_grid():
    """Rows like a Fig. 8 sweep: large m at large eta_tilde diverges (several m at each of
    the largest rates), the rest peak at a rate that grows with m."""
    rows = []
    for m, lr in itertools.product(SIZES, RATES):
        diverged = lr + math.log2(m) / 2 > -3
        accuracy = 0.1 if diverged else 0.9 - 0.01 * abs(lr + 8) - 0.005 * math.log2(m)
        rows.append(dict(trial=f"m{m}_lr{lr}", batch_size=m, log2_base_lr=lr,
                         bn_batch_size=m, seed=0, test_accuracy=accuracy,
                         status="diverged" if diverged else "completed"))
    return rows


@pytest.fixture
def rows(tmp_path):
    rows = paper_grid()
    results.write_csv(tmp_path / "results.csv", rows, list(rows[0]))
    return figures.load_rows(str(tmp_path))  # as the command reads them


def test_every_m_has_its_own_colour_and_the_legend_is_sorted_by_m(rows):
    fig, ax = figures.lr_figure(rows)
    lines = [line for line in ax.get_lines() if line.get_label().startswith("m = ")]
    assert [line.get_label() for line in lines] == [f"m = {m}" for m in SIZES]
    colours = [mcolors.to_rgb(line.get_color()) for line in lines]
    # Distinct, and clearly so: neighbours on the colormap differ by > 0.05 in some channel.
    gaps = [max(abs(a - b) for a, b in zip(c1, c2)) for c1, c2 in zip(colours, colours[1:])]
    assert min(gaps) > 0.05, gaps
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[:len(SIZES)] == [f"m = {m}" for m in SIZES]
    assert any(label.startswith("chance (10%)") for label in legend)
    assert any(label.startswith("diverged") for label in legend)


def test_every_diverged_point_is_drawn_where_it_can_be_seen(rows):
    fig, ax = figures.lr_figure(rows)
    markers = [(x, y) for line in ax.get_lines() if line.get_marker() == "x"
               for x, y in zip(line.get_xdata(), line.get_ydata())]
    diverged = [r for r in rows if r["status"] == "diverged"]
    assert len(diverged) >= 2 * len(RATES) // 3  # several at each large eta_tilde
    assert len(markers) == len(diverged)
    assert len(set(markers)) == len(markers)  # none hidden under another
    for r in diverged:  # each within 0.2 grid steps of its rate, at chance
        assert any(abs(x - r["log2_base_lr"]) <= 0.2 + 1e-9 and y == pytest.approx(10)
                   for x, y in markers)


def test_the_figure_files_are_written(rows, tmp_path):
    paths = figures.plot_lr(rows, str(tmp_path / "fig_lr"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg"]


def test_curves_have_whole_epoch_ticks(tmp_path):
    run = tmp_path / "m8"
    results.write_csv(run / "history.csv", [
        dict(epoch=e, step=10 * e, train_loss=2.0 / e, test_accuracy=0.1 * e)
        for e in (1, 2, 3)], results.HISTORY_COLUMNS)
    fig, (left, right) = figures.curves_figure([str(run)])
    fig.canvas.draw()
    for ax in (left, right):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
