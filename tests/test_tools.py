"""Figure and table tools on a fixed results fixture (no training)."""
import pathlib

import pytest

from sbt_keras import results
from sbt_keras.sweep import RESULT_COLUMNS
from tools import figures, table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A 2 (m) x 3 (log2 eta_tilde) sweep with a diverged point, two seeds at one point, and a
# skipped point. Accuracies are fractions.
ROWS = [
    dict(trial="m4_lr-6_s0", batch_size=4, log2_base_lr=-6, bn_batch_size=4, seed=0,
         status="completed", test_accuracy=0.60),
    dict(trial="m4_lr-6_s1", batch_size=4, log2_base_lr=-6, bn_batch_size=4, seed=1,
         status="completed", test_accuracy=0.64),
    dict(trial="m4_lr-5", batch_size=4, log2_base_lr=-5, bn_batch_size=2, seed=0,
         status="completed", test_accuracy=0.70),
    dict(trial="m4_lr-4", batch_size=4, log2_base_lr=-4, bn_batch_size=4, seed=0,
         status="completed", test_accuracy=0.69),
    dict(trial="m64_lr-6", batch_size=64, log2_base_lr=-6, bn_batch_size=64, seed=0,
         status="completed", test_accuracy=0.55),
    dict(trial="m64_lr-5", batch_size=64, log2_base_lr=-5, bn_batch_size=8, seed=0,
         status="completed", test_accuracy=0.695),
    dict(trial="m64_lr-4", batch_size=64, log2_base_lr=-4, bn_batch_size=64, seed=0,
         status="diverged", test_accuracy=0.1),
    dict(trial="m2_lr-6_bn4", batch_size=2, log2_base_lr=-6, bn_batch_size=4,
         status="skipped", reason="--batch_size=2 is not divisible by --bn_batch_size=4"),
]


@pytest.fixture
def sweep_dir(tmp_path):
    results.write_csv(tmp_path / "sweep" / "results.csv", ROWS, RESULT_COLUMNS)
    return tmp_path / "sweep"


def test_summaries_match_hand_computation(sweep_dir):
    rows = figures.load_rows(str(sweep_dir))
    assert len(rows) == 7  # skipped points are not plotted
    # m=4: median over seeds at -6 is 0.62; best is 0.70 at -5. m=64: 0.695 at -5.
    assert figures.best_by_batch(rows) == {4: pytest.approx(0.70), 64: pytest.approx(0.695)}
    # Within 0.01 of the overall best 0.70: m=4 at -5 and -4 (0.69); m=64 at -5 only.
    assert figures.lr_range_by_batch(rows, 0.01) == {4: (-5, -4), 64: (-5, -5)}
    # Within 0.1: also the 0.62 median and the 0.60...0.64 seeds' point, not 0.55.
    assert figures.lr_range_by_batch(rows, 0.1) == {4: (-6, -4), 64: (-5, -5)}


def _is_png(path):
    return pathlib.Path(path).read_bytes()[:8] == PNG_MAGIC


def test_every_figure_kind_writes_png_and_svg(sweep_dir, tmp_path):
    rows = figures.load_rows(str(sweep_dir))
    made = []
    made += figures.plot_lr(rows, str(tmp_path / "lr"))
    made += figures.plot_bn(rows, str(tmp_path / "bn"))
    made += figures.plot_best({"a": rows, "b": rows[:3]}, str(tmp_path / "best"))
    made += figures.plot_range({"a": rows}, str(tmp_path / "range"), 0.05)
    run = tmp_path / "run"
    results.write_csv(run / "history.csv", [
        dict(epoch=e, step=10 * e, train_loss=2.0 / e, test_accuracy=0.1 * e)
        for e in (1, 2, 3)], results.HISTORY_COLUMNS)
    made += figures.plot_curves([str(run)], str(tmp_path / "curves"))
    assert len(made) == 10
    for path in made:
        if path.endswith(".png"):
            assert _is_png(path), path
        else:
            assert pathlib.Path(path).read_text().lstrip().startswith("<?xml"), path


def test_markdown_table(sweep_dir):
    text = table.markdown(results.read_csv(sweep_dir / "results.csv"))
    lines = text.splitlines()
    assert lines[0] == "| m \\ log2 η̃ | -6 | -5 | -4 |"
    assert lines[2] == "| 4 | 62.0 | 70.0 | 69.0 |"
    assert lines[3] == "| 64 | 55.0 | 69.5 | div |"
    assert "Skipped 1 invalid point(s): m2_lr-6_bn4" in text
