"""The sharp-minima figures (tools.figures --kind=sharpness, warm_start) on hand-written
results/history/config/result files: the plotted data must be what the files hold."""
import pathlib

import matplotlib.pyplot as plt
import pytest

from sbt_keras import results
from sbt_keras.sweep import RESULT_COLUMNS
from tools import figures

HISTORY = ("epoch", "step", "train_loss", "test_accuracy", "sharpness")


def _trial(sweep, name, m, lr, acc, history):
    trial = sweep / "trials" / name
    results.write_csv(trial / results.HISTORY_FILE, history, HISTORY)
    return dict(trial=name, batch_size=m, log2_base_lr=lr, bn_batch_size=m, seed=0,
                status="completed", test_accuracy=acc, trial_dir=f"trials/{name}")


@pytest.fixture
def sharp_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    blank = ""  # an epoch without a measurement: the history's cell is empty
    rows = [
        # m = 16: the better trial is lr -8 (0.50 > 0.40); its epoch 2 was not measured.
        _trial(sweep, "m16_lr-10", 16, -10, 0.40, [
            dict(epoch=1, step=10, train_loss=2.0, test_accuracy=0.3, sharpness=99.0)]),
        _trial(sweep, "m16_lr-8", 16, -8, 0.50, [
            dict(epoch=1, step=10, train_loss=1.5, test_accuracy=0.4, sharpness=10.0),
            dict(epoch=2, step=20, train_loss=1.2, test_accuracy=0.45, sharpness=blank),
            dict(epoch=3, step=30, train_loss=0.9, test_accuracy=0.5, sharpness=8.0)]),
        _trial(sweep, "m1024_lr-10", 1024, -10, 0.30, [
            dict(epoch=1, step=1, train_loss=2.2, test_accuracy=0.2, sharpness=12.0),
            dict(epoch=2, step=2, train_loss=1.8, test_accuracy=0.3, sharpness=30.0)]),
    ]
    results.write_csv(sweep / "results.csv", rows, RESULT_COLUMNS)
    return sweep


def test_sharpness_curves_are_the_best_trials_measured_epochs(sharp_sweep, tmp_path):
    rows = figures.load_rows(str(sharp_sweep))
    assert figures.sharpness_by_batch(rows) == {
        16: ((1, 3), (1.5, 0.9), (10.0, 8.0)),
        1024: ((1, 2), (2.2, 1.8), (12.0, 30.0))}
    drawn = []
    real = plt.Axes.plot

    def spy(ax, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(args[0]), list(args[1])))
        return real(ax, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Axes, "plot", spy)
        paths = figures.plot_sharpness(rows, str(tmp_path / "fig"))
    assert drawn == [("m = 16", [1.5, 0.9], [10.0, 8.0]),
                     ("m = 1024", [2.2, 1.8], [12.0, 30.0])]
    assert pathlib.Path(paths[0]).read_bytes()[:4] == b"\x89PNG"


def _run(directory, config, record=None):
    results.write_yaml(directory / results.CONFIG_FILE, config)
    if record is not None:
        results.write_yaml(directory / results.RESULT_FILE, record)
    return str(directory)


def test_warm_start_points_read_init_from_and_results(tmp_path):
    source = _run(tmp_path / "sb", dict(epochs=6, init_from=""), dict(epochs_completed=6))
    runs = [
        _run(tmp_path / "lb4", dict(init_from=f"{source}:4"),
             dict(test_accuracy=0.45, sharpness=7.5)),
        _run(tmp_path / "lb0", dict(init_from=f"{source}:0"),
             dict(test_accuracy=0.30, sharpness=20.0)),
        # No epoch: the source's newest checkpoint, its last completed epoch (6).
        _run(tmp_path / "lbnew", dict(init_from=source), dict(test_accuracy=0.5)),
        _run(tmp_path / "cold", dict(init_from=""), dict(test_accuracy=0.1)),  # not warm
        _run(tmp_path / "unfinished", dict(init_from=f"{source}:2")),  # no result yet
    ]
    points = figures.warm_start_points(runs)
    assert [(e, a, s) for e, a, s, _ in points] == [
        (0, 0.30, 20.0), (4, 0.45, 7.5), (6, 0.5, None)]
    drawn = []
    real = plt.Axes.plot

    def spy(ax, *args, **kwargs):
        drawn.append((list(args[0]), list(args[1])))
        return real(ax, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Axes, "plot", spy)
        paths = figures.plot_warm_start(runs, str(tmp_path / "fig"))
    assert drawn == [([0, 4, 6], [30.0, 45.0, 50.0]), ([0, 4], [20.0, 7.5])]
    assert pathlib.Path(paths[1]).exists()
