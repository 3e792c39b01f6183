"""A sweep's results as a Markdown table: batch size m down, log2(eta_tilde) across.

    python -m tools.table --results=runs/demo_sweep

Cells are test accuracy in % (median of the final epochs, median over seeds); 'div' marks a
diverged trial, '—' a point not run (skipped or not reached yet).
"""
import collections
import statistics

from absl import app, flags

from sbt_keras import results

FLAGS = flags.FLAGS


def markdown(rows):
    """The pivot table as Markdown text."""
    cells = collections.defaultdict(list)
    for r in rows:
        if r.get("status") in ("completed", "diverged"):
            cells[(r["batch_size"], r["log2_base_lr"])].append(r)
    batch_sizes = sorted({m for m, _ in cells})
    rates = sorted({lr for _, lr in cells})
    head = "| m \\ log2 η̃ | " + " | ".join(_fmt(lr) for lr in rates) + " |"
    lines = [head, "|" + "---|" * (len(rates) + 1)]
    for m in batch_sizes:
        row = [_cell(cells.get((m, lr), [])) for lr in rates]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if skipped:
        lines.append("")
        lines.append(f"Skipped {len(skipped)} invalid point(s): "
                     + "; ".join(f"{r['trial']} ({r.get('reason', '')})" for r in skipped))
    return "\n".join(lines)


def _cell(group):
    if not group:
        return "—"
    if all(r["status"] == "diverged" for r in group):
        return "div"
    return f"{statistics.median(r['test_accuracy'] for r in group) * 100:.1f}"


def _fmt(value):
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def main(argv):
    del argv
    if not FLAGS.results:
        raise app.UsageError("give --results=SWEEP_DIR")
    print(markdown(results.read_csv(f"{FLAGS.results}/results.csv")))


if __name__ == "__main__":
    flags.DEFINE_string("results", "", "Sweep output directory (holding results.csv).")
    app.run(main)
