"""The generalization gap per batch size (Keskar et al. 2017, Table 2) as a Markdown table.

    python -m tools.gap_table --results=runs/fig08[,runs/fig08_more] [--all]

One row per batch size m, at the base learning rate whose median test accuracy (the sweep's
objective) is best for that m; --all lists every (m, log2 eta_tilde, BN batch, epochs)
point instead. Columns, in %: the final network's accuracy on the un-augmented training
sample in inference mode (result.yaml's train_eval_accuracy), the last epoch's test
accuracy, and their difference (generalization_gap), each the median over the point's
seeds (n); the training-sample loss beside them. Diverged trials have no such values and
are left out of the medians ('div' when every seed of a point diverged); '—' marks trials
run before these values were recorded.
"""
import collections
import statistics

from absl import app, flags

from sbt_keras import results

FLAGS = flags.FLAGS
POINT = ("batch_size", "log2_base_lr", "bn_batch_size", "epochs")


def points(rows):
    """{(m, log2 eta_tilde, BN batch, epochs): [rows]} of completed and diverged trials."""
    grouped = collections.defaultdict(list)
    for r in rows:
        if r.get("status") in ("completed", "diverged"):
            grouped[tuple(r.get(k) for k in POINT)].append(r)
    return dict(sorted(grouped.items(), key=lambda item: tuple(map(_order, item[0]))))


def best_per_batch_size(grouped):
    """{point: rows} keeping, for each m, the point with the best median test accuracy."""
    best = {}
    for point, group in grouped.items():
        score = statistics.median(r["test_accuracy"] for r in group)
        if point[0] not in best or score > best[point[0]][0]:
            best[point[0]] = (score, point)
    return {point: grouped[point] for _, point in sorted(best.values(),
                                                          key=lambda b: _order(b[1][0]))}


def summary(group):
    """Medians over a point's non-diverged seeds: (train acc, test acc, gap, train loss, n);
    None for values its trials did not record; the string 'div' if every seed diverged."""
    done = [r for r in group if r.get("status") == "completed"]
    if not done:
        return "div"

    def median(key):
        values = [r[key] for r in done if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    return (median("train_eval_accuracy"), median("final_test_accuracy"),
            median("generalization_gap"), median("train_eval_loss"), len(done))


def markdown(rows, every_point=False):
    grouped = points(rows)
    shown = grouped if every_point else best_per_batch_size(grouped)
    lines = ["| m | log2 η̃ | BN batch | epochs | train acc (%) | test acc (%) | gap (pp) | "
             "train loss | n |", "|---|---|---|---|---|---|---|---|---|"]
    for (m, lr, bn, epochs), group in shown.items():
        cells = summary(group)
        if cells == "div":
            values = ["div"] * 4 + [str(len(group))]
        else:
            train, test, gap, loss, n = cells
            values = [_pct(train), _pct(test), _pct(gap), _num(loss), str(n)]
        lines.append("| " + " | ".join([_num(m), _num(lr), _num(bn), _num(epochs), *values])
                     + " |")
    return "\n".join(lines)


def _pct(value):
    return "—" if value is None else f"{value * 100:.1f}"


def _num(value):
    if not isinstance(value, (int, float)):
        return "—"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _order(value):
    number = isinstance(value, (int, float))
    return (not number, value if number else str(value))


def main(argv):
    del argv
    if not FLAGS.results:
        raise app.UsageError("give --results=SWEEP_DIR[,SWEEP_DIR...]")
    rows = [r for d in FLAGS.results for r in results.read_csv(f"{d}/results.csv")]
    print(markdown(rows, FLAGS.all))


if __name__ == "__main__":
    flags.DEFINE_list("results", [], "Sweep output directories (holding results.csv).")
    flags.DEFINE_boolean("all", False, "Every swept point, not only each m's best base "
                         "learning rate.")
    app.run(main)
