"""Figure and table tools on a fixed results fixture (no training)."""
import os
import pathlib
import subprocess
import sys

import pytest

from sbt_keras import results
from sbt_keras.sweep import RESULT_COLUMNS
from tools import figures, table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A 2 (m) x 3 (log2 eta_tilde) sweep with a diverged point, two seeds at one point, and a
# skipped point; the BN batch is m itself, as in an m x eta_tilde sweep. Accuracies are
# fractions.
ROWS = [
    dict(trial="m4_lr-6_s0", batch_size=4, log2_base_lr=-6, bn_batch_size=4, seed=0,
         status="completed", test_accuracy=0.60),
    dict(trial="m4_lr-6_s1", batch_size=4, log2_base_lr=-6, bn_batch_size=4, seed=1,
         status="completed", test_accuracy=0.64),
    dict(trial="m4_lr-5", batch_size=4, log2_base_lr=-5, bn_batch_size=4, seed=0,
         status="completed", test_accuracy=0.70),
    dict(trial="m4_lr-4", batch_size=4, log2_base_lr=-4, bn_batch_size=4, seed=0,
         status="completed", test_accuracy=0.69),
    dict(trial="m64_lr-6", batch_size=64, log2_base_lr=-6, bn_batch_size=64, seed=0,
         status="completed", test_accuracy=0.55),
    dict(trial="m64_lr-5", batch_size=64, log2_base_lr=-5, bn_batch_size=64, seed=0,
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
    assert lines[2] == "| 4 | 62.0 (n=2) | 70.0 | 69.0 |"  # median of the two seeds
    assert lines[3] == "| 64 | 55.0 | 69.5 | div |"
    assert "several seeds: the median over them" in text
    assert "Skipped 1 invalid point(s): m2_lr-6_bn4" in text


# Fig. 14 in three parts: m <= 128 at each m's best eta_tilde, m = 256 at 2^-10 and m = 2048
# at 2^-9 (the paper's fixed rates), each with its own BN batch sizes.
BN_PARTS = {
    "fig14": [
        dict(trial="m16_lr-8_bn8", batch_size=16, log2_base_lr=-8, bn_batch_size=8,
             status="completed", test_accuracy=0.70),
        dict(trial="m16_lr-8_bn16", batch_size=16, log2_base_lr=-8, bn_batch_size=16,
             status="completed", test_accuracy=0.72),
        dict(trial="m16_lr-8_bn32", batch_size=16, log2_base_lr=-8, bn_batch_size=32,
             status="skipped", reason="--batch_size=16 is not divisible by --bn_batch_size=32"),
    ],
    "fig14_large": [
        dict(trial="m256_lr-10_bn16", batch_size=256, log2_base_lr=-10, bn_batch_size=16,
             status="completed", test_accuracy=0.66),
        dict(trial="m256_lr-10_bn32", batch_size=256, log2_base_lr=-10, bn_batch_size=32,
             status="diverged", test_accuracy=0.001),
    ],
    "fig14_2048": [
        dict(trial="m2048_lr-9_bn16", batch_size=2048, log2_base_lr=-9, bn_batch_size=16,
             status="completed", test_accuracy=0.50),
    ],
}


@pytest.fixture
def bn_dirs(tmp_path):
    for name, rows in BN_PARTS.items():
        results.write_csv(tmp_path / name / "results.csv", rows, RESULT_COLUMNS)
    return [str(tmp_path / name) for name in BN_PARTS]


def test_bn_sweeps_pivot_m_by_bn_batch_with_each_ms_rate(bn_dirs):
    rows = [r for d in bn_dirs for r in results.read_csv(pathlib.Path(d) / "results.csv")]
    lines = table.markdown(rows).splitlines()
    assert lines[0] == "| m \\ BN batch | log2 η̃ | 8 | 16 | 32 |"
    assert lines[2:5] == ["| 16 | -8 | 70.0 | 72.0 | — |",
                          "| 256 | -10 | — | 66.0 | div |",
                          "| 2048 | -9 | — | 50.0 | — |"]
    # The command merges the directories it is given the same way.
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tools.table", "--results=" + ",".join(bn_dirs)],
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == table.markdown(rows), proc.stderr


def test_other_swept_axes_get_their_own_tables():
    rows = [dict(trial=f"m{m}_lr{lr}_e{e}", batch_size=m, log2_base_lr=lr, bn_batch_size=m,
                 epochs=e, status="completed", test_accuracy=acc)
            for m, lr, e, acc in [(4, -6, 41, 0.60), (4, -6, 82, 0.65), (4, -5, 41, 0.61),
                                  (4, -5, 82, 0.66), (8, -6, 41, 0.58), (8, -6, 82, 0.63)]]
    text = table.markdown(rows)
    # Two tables, one per training length: 41- and 82-epoch results are never one cell.
    assert text.split("\n\n") == [
        "**epochs = 41**",
        "| m \\ log2 η̃ | -6 | -5 |\n|---|---|---|\n| 4 | 60.0 | 61.0 |\n| 8 | 58.0 | — |",
        "**epochs = 82**",
        "| m \\ log2 η̃ | -6 | -5 |\n|---|---|---|\n| 4 | 65.0 | 66.0 |\n| 8 | 63.0 | — |"]
    assert "(n=" not in text


def _figures_cli(*args):
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tools.figures", *args], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bn_and_lr_figures_draw_every_results_dir(bn_dirs, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "_plot_series",
                        lambda ax, xs, rows, label, *style: drawn.append((label, len(rows))))
    monkeypatch.setattr(figures, "_finish", lambda fig, out: [out + ".png", out + ".svg"])
    from absl import flags
    fv = flags.FlagValues()
    figures.define_flags(fv)
    monkeypatch.setattr(figures, "FLAGS", fv)
    for kind in ("bn", "lr"):
        drawn.clear()
        fv(["figures", f"--kind={kind}", "--results=" + ",".join(bn_dirs),
            f"--out={tmp_path / kind}"])
        figures.main([])
        # Every part's rows, skipped ones aside: one line per m from all three dirs.
        assert drawn == [("m = 16", 2), ("m = 256", 2), ("m = 2048", 1)]
    # And the real command writes the picture.
    paths = _figures_cli("--kind=bn", "--results=" + ",".join(bn_dirs),
                         f"--out={tmp_path / 'fig14'}", "--title=Fig. 14")
    assert paths == [str(tmp_path / "fig14.png"), str(tmp_path / "fig14.svg")]
    assert _is_png(paths[0])


def test_range_bars_cover_half_a_step_and_mark_batches_without_one(sweep_dir, tmp_path):
    rows = figures.load_rows(str(sweep_dir))
    assert figures.lr_step(rows) == 1
    # m=64's range is the single value -5: a bar of one grid step, not a zero-length line.
    assert figures.range_bars(rows, 0.01) == {4: (-5.5, -3.5), 64: (-5.5, -4.5)}
    # Within 0.001 of the best (0.70 at m=4) m=64 has no eta_tilde: None, drawn as an 'x'.
    assert figures.range_bars(rows, 0.001) == {4: (-5.5, -4.5), 64: None}
    half_steps = [dict(r, log2_base_lr=r["log2_base_lr"] / 2) for r in rows]
    assert figures.lr_step(half_steps) == 0.5
    assert figures.range_bars(half_steps, 0.01) == {4: (-2.75, -1.75), 64: (-2.75, -2.25)}
    paths = figures.plot_range({"a": rows, "b": rows}, str(tmp_path / "range"), 0.001)
    assert _is_png(paths[0])
    svg = pathlib.Path(paths[1]).read_text()
    assert "within tolerance" in svg  # the legend entry for the 'x' markers
