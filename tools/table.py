"""A sweep's results as Markdown tables: batch size m down, the other swept setting across.

    python -m tools.table --results=runs/demo_sweep
    python -m tools.table --results=runs/fig14,runs/fig14_large,runs/fig14_2048   # merged

Columns are log2(eta_tilde) for an m x eta_tilde sweep (Fig. 1-12), or the BN batch size for
an m x BN-batch sweep (Fig. 13-14, where eta_tilde is one value per m, shown beside m). Any
further swept setting (epochs, or the BN batch beside eta_tilde) gets one table per value, so
no cell mixes settings. Cells are test accuracy in % (median of the final epochs); a cell run
with several seeds shows the median over them and their count, e.g. '62.0 (n=2)'. 'div'
marks a diverged trial (every seed), '—' a point not run (skipped or not reached yet).
"""
import collections
import statistics

from absl import app, flags

from sbt_keras import results

FLAGS = flags.FLAGS
COLUMN_AXES = ("log2_base_lr", "bn_batch_size")  # the first one swept goes across
# The rest: one table per value.
SPLIT_AXES = ("norm", "log2_base_lr", "bn_batch_size", "epochs")
HEADINGS = {"norm": "norm", "log2_base_lr": "log2 η̃", "bn_batch_size": "BN batch",
            "epochs": "epochs"}


def markdown(rows):
    """The pivot table(s) as Markdown text."""
    done = [r for r in rows if r.get("status") in ("completed", "diverged")]
    column = next((f for f in COLUMN_AXES if swept(done, f)), "log2_base_lr")
    splits = [f for f in SPLIT_AXES if f != column and swept(done, f)]
    blocks, several_seeds = [], False
    for values, group in _groups(done, lambda r: tuple(r.get(f) for f in splits)):
        cells = dict(_groups(group, lambda r: (r["batch_size"], r.get(column))))
        several_seeds |= any(len(g) > 1 for g in cells.values())
        heading = ", ".join(f"{HEADINGS[f]} = {_fmt(v)}" for f, v in zip(splits, values))
        blocks.append((f"**{heading}**\n\n" if heading else "") + _pivot(cells, column))
    notes = []
    if several_seeds:
        notes.append("A cell marked (n=…) holds several seeds: the median over them, and "
                     "how many.")
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if skipped:
        notes.append(f"Skipped {len(skipped)} invalid point(s): "
                     + "; ".join(f"{r['trial']} ({r.get('reason', '')})" for r in skipped))
    return "\n\n".join(blocks + notes)


def best_markdown(rows, across):
    """m down, each value of `across` (e.g. the norm) across; a cell is the best test
    accuracy over eta_tilde (median over seeds) and the log2 eta_tilde it came at."""
    done = [r for r in rows if r.get("status") in ("completed", "diverged")]
    cells = dict(_groups(done, lambda r: (r["batch_size"], r.get(across))))
    batch_sizes = sorted({m for m, _ in cells}, key=_order)
    values = sorted({v for _, v in cells}, key=_order)
    lines = [f"| m \\ {HEADINGS.get(across, across)} |" + "".join(f" {_fmt(v)} |"
                                                               for v in values),
             "|" + "---|" * (len(values) + 1)]
    for m in batch_sizes:
        lines.append(f"| {m} |" + "".join(f" {_best_cell(cells.get((m, v), []))} |"
                                          for v in values))
    return "\n".join(lines)


def _best_cell(group):
    by_rate = dict(_groups(group, lambda r: (r["log2_base_lr"],)))
    finished = {rate: g for rate, g in by_rate.items()
                if not all(r["status"] == "diverged" for r in g)}
    if not finished:
        return _cell(group)
    (rate,), best = max(finished.items(), key=lambda item: statistics.median(
        r["test_accuracy"] for r in item[1]))
    return f"{_cell(best)} @ {_fmt(rate)}"


def swept(rows, field):
    """Whether `field` takes several values at one m (--grid_best_lr_from gives one eta_tilde
    per m, and an m x eta_tilde sweep's BN batch is m itself: neither is swept)."""
    seen = collections.defaultdict(set)
    for r in rows:
        seen[r["batch_size"]].add(r.get(field))
    return any(len(values) > 1 for values in seen.values())


def _groups(rows, key):
    """[(key, rows)] sorted by key; a missing value (empty in the CSV) sorts last."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return sorted(groups.items(), key=lambda item: tuple(_order(v) for v in item[0]))


def _order(value):
    number = isinstance(value, (int, float))
    return (not number, value if number else str(value))


def _pivot(cells, column):
    """`cells` maps (m, value across) to rows."""
    batch_sizes = sorted({m for m, _ in cells}, key=_order)
    across = sorted({v for _, v in cells}, key=_order)
    # With the BN batch across, eta_tilde is a per-m setting: show it beside m.
    rate = column != "log2_base_lr"
    head = f"| m \\ {HEADINGS[column]} |" + (" log2 η̃ |" if rate else "")
    lines = [head + "".join(f" {_fmt(v)} |" for v in across),
             "|" + "---|" * (len(across) + 1 + rate)]
    for m in batch_sizes:
        row = f"| {m} |"
        if rate:
            rates = {r["log2_base_lr"] for (m2, _), g in cells.items() if m2 == m for r in g}
            row += " " + ", ".join(_fmt(lr) for lr in sorted(rates, key=_order)) + " |"
        lines.append(row + "".join(f" {_cell(cells.get((m, v), []))} |" for v in across))
    return "\n".join(lines)


def _cell(group):
    if not group:
        return "—"
    if all(r["status"] == "diverged" for r in group):
        text = "div"
    else:
        text = f"{statistics.median(r['test_accuracy'] for r in group) * 100:.1f}"
    return text + (f" (n={len(group)})" if len(group) > 1 else "")


def _fmt(value):
    if not isinstance(value, (int, float)):
        return str(value) or "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def main(argv):
    del argv
    if not FLAGS.results:
        raise app.UsageError("give --results=SWEEP_DIR[,SWEEP_DIR...]")
    rows = [r for d in FLAGS.results for r in results.read_csv(f"{d}/results.csv")]
    print(best_markdown(rows, FLAGS.best_by) if FLAGS.best_by else markdown(rows))


if __name__ == "__main__":
    flags.DEFINE_list("results", [], "Sweep output directories (holding results.csv); the "
                      "rows of several are merged into one table.")
    flags.DEFINE_string("best_by", "", "Instead: m down, this swept setting (e.g. norm) "
                        "across, each cell the best accuracy over eta_tilde @ its log2 eta_tilde.")
    app.run(main)
