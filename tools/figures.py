"""The paper's figures from sweep results (results.csv) and run histories (history.csv).

    python -m tools.figures --kind=lr     --results=runs/fig08            # Fig. 1-3, 5-12
    python -m tools.figures --kind=bn     --results=runs/fig14,runs/fig14_large  # Fig. 13-14
    python -m tools.figures --kind=best   --results=runs/fig02,runs/fig08 # Fig. 15
    python -m tools.figures --kind=range  --results=runs/fig02,runs/fig08 # Fig. 16
    python -m tools.figures --kind=curves --runs=runs/fig04/trials/m8_lr-8,...   # Fig. 4
    python -m tools.figures --kind=norms   --results=runs/norms   # best accuracy vs m per norm
    python -m tools.figures --kind=alpha   --results=runs/norms   # learned mix weight vs m
    python -m tools.figures --kind=norm_lr --results=runs/norms --m=8  # accuracy vs lr per norm
    python -m tools.figures --kind=gns     --results=runs/fig08_gns    # B_simple over training
    python -m tools.figures --kind=sharpness  --results=runs/keskar_sb_lb  # Keskar Fig. 4
    python -m tools.figures --kind=warm_start --runs=runs/warm_start/lb_from_0,...  # Keskar Sec. 4

Writes <out>.png and <out>.svg (default out: <first results dir>/fig_<kind>). Diverged trials
are drawn at their recorded chance-level accuracy with an 'x' marker, never dropped. --kind=lr
and bn draw the rows of every --results dir in one figure (a sweep run in parts); best and
range draw one line or bar per dir (one experiment each).
"""
import collections
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from absl import app, flags  # noqa: E402

from sbt_keras import results  # noqa: E402

KINDS = ("lr", "bn", "best", "range", "curves", "norms", "alpha", "norm_lr", "gns",
         "sharpness", "warm_start")


def load_rows(results_dir):
    """Completed and diverged rows of a sweep's results.csv (skipped ones are not points);
    each row's `trial_dir` is made a path from here."""
    rows = results.read_csv(os.path.join(results_dir, "results.csv"))
    rows = [r for r in rows if r.get("status") in ("completed", "diverged")]
    for r in rows:
        if r.get("trial_dir"):
            r["trial_dir"] = os.path.join(results_dir, r["trial_dir"])
    return rows


def _finish(fig, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [f"{out}.png", f"{out}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _pow2_ticks(ax, values, axis="x"):
    ticks = sorted(set(values))
    getattr(ax, f"set_{axis}ticks")(ticks)
    getattr(ax, f"set_{axis}ticklabels")([f"$2^{{{_fmt(t)}}}$" for t in ticks])


def _fmt(value):
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _by(rows, key):
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return dict(sorted(groups.items()))


def _plot_series(ax, xs, rows, label, color=None, diverged_offset=0.0):
    """A line through the median over seeds, 'x' markers where trials diverged (moved
    `diverged_offset` along x, so that the diverged trials of several lines at one x stay
    visible side by side)."""
    points = collections.defaultdict(list)
    for x, r in zip(xs, rows):
        points[x].append(r)
    xs_sorted = sorted(points)
    ys = [_median([r["test_accuracy"] * 100 for r in points[x]]) for x in xs_sorted]
    # A point where every seed diverged: the line runs to its 'x', with no 'o' on top.
    all_diverged = [all(r["status"] == "diverged" for r in points[x]) for x in xs_sorted]
    line, = ax.plot([x + diverged_offset * d for x, d in zip(xs_sorted, all_diverged)], ys,
                    marker="o", ms=4, label=label, color=color,
                    markevery=[i for i, d in enumerate(all_diverged) if not d])
    div = [(x + diverged_offset, r["test_accuracy"] * 100) for x in xs_sorted
           for r in points[x] if r["status"] == "diverged"]
    if div:
        ax.plot(*zip(*div), "x", color=line.get_color(), ms=7, mew=1.5)
    return line


def batch_colors(batch_sizes, cmap="viridis"):
    """{m: colour} from a sequential colormap over log2 m: ordered like m, and distinct for
    any number of batch sizes (the paper's 11, m = 2 ... 2048, and more)."""
    sizes = sorted(set(batch_sizes), key=float)
    colormap = plt.get_cmap(cmap)
    if len(sizes) == 1:
        return {sizes[0]: colormap(0.0)}
    logs = [math.log2(float(m)) for m in sizes]
    lo, hi = min(logs), max(logs)
    # 0 .. 0.9 of viridis: its last tenth is a yellow too pale on white.
    return {m: colormap(0.9 * (v - lo) / (hi - lo)) for m, v in zip(sizes, logs)}


def diverged_offsets(keys, spacing):
    """{key: x offset} spreading the diverged markers of len(keys) lines over 40% of the
    grid spacing, centred, in the order given."""
    n = len(keys)
    width = 0.4 * spacing
    return {k: (i - (n - 1) / 2) * (width / max(n - 1, 1)) for i, k in enumerate(keys)}


def _chance_and_legend(ax, rows, title=None, **legend):
    """The chance line (where diverged runs are drawn) and a legend beside the axes that
    explains both."""
    diverged = [r for r in rows if r["status"] == "diverged"]
    if diverged:
        chance = _median([r["test_accuracy"] * 100 for r in diverged])
        ax.axhline(chance, color="0.6", lw=0.8, ls="--", label=f"chance ({chance:.3g}%)")
        ax.plot([], [], "x", color="0.3", ms=7, mew=1.5,
                label="diverged (drawn at chance,\nside by side per m)")
    # Beside the axes: inside, a legend this long covers the curves it explains.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              title=title, title_fontsize=8, **legend)


def _by_batch(rows):
    """Rows grouped by batch size, in increasing m (numerically)."""
    return dict(sorted(_by(rows, "batch_size").items(), key=lambda item: float(item[0])))


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def lr_figure(rows, title=""):
    """(figure, axes) of test accuracy vs log2(eta_tilde), one line per batch size m."""
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    groups = _by_batch(rows)
    colors = batch_colors(groups)
    offsets = diverged_offsets(list(groups), lr_step(rows))
    for m, group in groups.items():
        _plot_series(ax, [r["log2_base_lr"] for r in group], group, f"m = {m}", colors[m],
                     offsets[m])
    _pow2_ticks(ax, [r["log2_base_lr"] for r in rows])
    ax.set_xlabel(r"base learning rate $\tilde\eta = \eta / m$")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Test accuracy vs base learning rate")
    ax.grid(alpha=0.3)
    _chance_and_legend(ax, rows)
    return fig, ax


def plot_lr(rows, out, title=""):
    """Test accuracy vs log2(eta_tilde), one line per batch size m (paper Fig. 1-3, 5-12)."""
    fig, _ = lr_figure(rows, title)
    return _finish(fig, out)


def bn_figure(rows, title=""):
    """(figure, axes) of test accuracy vs BN batch size, one line per SGD batch size."""
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    groups = _by_batch(rows)
    colors = batch_colors(groups)
    offsets = diverged_offsets(list(groups), 1.0)
    for m, group in groups.items():
        _plot_series(ax, [math.log2(r["bn_batch_size"]) for r in group], group,
                     f"m = {m}", colors[m], offsets[m])
    _pow2_ticks(ax, [math.log2(r["bn_batch_size"]) for r in rows])
    ax.set_xlabel("batch size for BN")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Test accuracy vs BN batch size")
    ax.grid(alpha=0.3)
    _chance_and_legend(ax, rows, title="SGD batch")
    return fig, ax


def plot_bn(rows, out, title=""):
    """Test accuracy vs BN batch size, one line per SGD batch size (paper Fig. 13-14)."""
    fig, _ = bn_figure(rows, title)
    return _finish(fig, out)


def best_by_batch(rows):
    """{m: best test accuracy over eta_tilde (median over seeds)}."""
    best = {}
    for m, group in _by(rows, "batch_size").items():
        per_lr = _by(group, "log2_base_lr")
        best[m] = max(_median([r["test_accuracy"] for r in g]) for g in per_lr.values())
    return best


def lr_range_by_batch(rows, tolerance):
    """{m: (min, max) log2 eta_tilde whose accuracy is within `tolerance` of the best}.

    The best is the experiment's best over all (m, eta_tilde), as in the paper's Fig. 16.
    """
    per_point = {(m, lr): _median([r["test_accuracy"] for r in g])
                 for m, by_m in _by(rows, "batch_size").items()
                 for lr, g in _by(by_m, "log2_base_lr").items()}
    best = max(per_point.values())
    ranges = {}
    for (m, lr), acc in per_point.items():
        if acc >= best - tolerance:
            lo, hi = ranges.get(m, (lr, lr))
            ranges[m] = (min(lo, lr), max(hi, lr))
    return dict(sorted(ranges.items()))


def plot_best(experiments, out, title=""):
    """Best test accuracy vs m, one line per experiment (paper Fig. 15)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    all_m = []
    for label, rows in experiments.items():
        best = best_by_batch(rows)
        all_m += list(best)
        ax.plot([math.log2(m) for m in best], [v * 100 for v in best.values()], marker="o",
                label=label)
    _pow2_ticks(ax, [math.log2(m) for m in all_m])
    ax.set_xlabel("batch size m")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(title or "Best test accuracy vs batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def lr_step(rows):
    """The grid spacing of log2 eta_tilde (the smallest gap between tested values; 1 if one)."""
    rates = sorted({r["log2_base_lr"] for r in rows})
    return min((b - a for a, b in zip(rates, rates[1:])), default=1.0)


def range_bars(rows, tolerance):
    """{m: (bottom, top) of Fig. 16's bar, or None where no eta_tilde is within tolerance}.

    A bar covers each tested eta_tilde by half a grid step either side, so a range of one
    value is a visible box, not a zero-length line.
    """
    ranges, half = lr_range_by_batch(rows, tolerance), lr_step(rows) / 2
    return {m: ((ranges[m][0] - half, ranges[m][1] + half) if m in ranges else None)
            for m in sorted({r["batch_size"] for r in rows})}


def plot_range(experiments, out, tolerance, title=""):
    """Range of eta_tilde within `tolerance` of the best, vs m (paper Fig. 16)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = len(experiments)
    all_m, all_lr, any_missing = [], [], False
    for i, (label, rows) in enumerate(experiments.items()):
        bars = range_bars(rows, tolerance)
        offset = (i - (n - 1) / 2) * 0.12
        drawn = {m: bar for m, bar in bars.items() if bar}
        ax.vlines([math.log2(m) + offset for m in drawn], [lo for lo, _ in drawn.values()],
                  [hi for _, hi in drawn.values()], lw=4, label=label, color=f"C{i}")
        # An m with no eta_tilde close enough to the best: an 'x' on the bottom edge.
        missing = [math.log2(m) + offset for m, bar in bars.items() if not bar]
        ax.plot(missing, [0.03] * len(missing), "x", color=f"C{i}", ms=8, clip_on=False,
                transform=ax.get_xaxis_transform())
        any_missing |= bool(missing)
        all_m += list(bars)
        all_lr += [r["log2_base_lr"] for r in rows]
    if any_missing:
        ax.plot([], [], "x", color="0.3", label=r"no $\tilde\eta$ within tolerance")
    _pow2_ticks(ax, [math.log2(m) for m in all_m])
    _pow2_ticks(ax, all_lr, axis="y")
    ax.set_xlabel("batch size m")
    ax.set_ylabel(r"$\tilde\eta$ within " + f"{tolerance * 100:g}% of the best")
    ax.set_title(title or "Range of base learning rates that converge well")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def plot_norms(rows, out, title=""):
    """Best test accuracy over eta_tilde vs m, one line per normalization: the article's
    central claim (per-example norms hold up at small m, BN falls off)."""
    return plot_best(_by(rows, "norm"), out, title or "Best test accuracy vs batch size, "
                     "per normalization")


def best_trials(rows):
    """{m: the row of the best trial at m (highest test accuracy over eta_tilde)}."""
    return {m: max(group, key=lambda r: r["test_accuracy"])
            for m, group in _by(rows, "batch_size").items()}


def mixing_weights_by_batch(rows):
    """{m: (per-layer alpha_batch of the best mix trial at m, their mean)} from the trials'
    result.yaml (`mixing_weights`), for the mix trials that mix in batch statistics."""
    mix = [r for r in rows if r.get("norm") == "mix" and r["status"] == "completed"]
    out = {}
    for m, row in best_trials(mix).items():
        record = results.read_yaml(os.path.join(row["trial_dir"], results.RESULT_FILE))
        layers = [w["batch"] for w in (record.get("mixing_weights") or {}).values()
                  if "batch" in w]
        if layers:
            out[m] = (layers, sum(layers) / len(layers))
    return out


def plot_alpha(rows, out, title=""):
    """The learned weight of the batch statistics at the end of training vs m: one dot per
    mix layer of the best trial at each m, and their mean (the article predicts -> 1 at
    large m, -> 0 at small m)."""
    weights = mixing_weights_by_batch(rows)
    if not weights:
        raise app.UsageError("no completed --norm=mix trial with a batch component in "
                             "--results; sweep --grid_norm with mix")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, (layers, _) in weights.items():
        ax.plot([math.log2(m)] * len(layers), layers, ".", color="0.55", ms=5)
    ax.plot([], [], ".", color="0.55", label="one layer")
    ax.plot([math.log2(m) for m in weights], [mean for _, mean in weights.values()],
            "o-", color="C3", label="mean over layers")
    ax.axhline(0.5, color="0.7", lw=0.8, ls=":", label="initial (equal mix)")
    _pow2_ticks(ax, [math.log2(m) for m in weights])
    ax.set_ylim(0, 1)
    ax.set_xlabel("batch size m (best " + r"$\tilde\eta$" + " at each m)")
    ax.set_ylabel(r"$\alpha$ (weight of the batch statistics)")
    ax.set_title(title or "Learned BN / per-example mix at the end of training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def plot_norm_lr(rows, out, m=0, title=""):
    """Test accuracy vs log2(eta_tilde) at one batch size m, one line per normalization:
    how wide a range of learning rates each normalization trains well with."""
    sizes = sorted({r["batch_size"] for r in rows})
    m = m or sizes[0]
    chosen = [r for r in rows if r["batch_size"] == m]
    if not chosen:
        raise app.UsageError(f"--m={m} is not among the swept batch sizes {sizes}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for norm, group in _by(chosen, "norm").items():
        _plot_series(ax, [r["log2_base_lr"] for r in group], group, norm)
    _pow2_ticks(ax, [r["log2_base_lr"] for r in chosen])
    ax.set_xlabel(r"base learning rate $\tilde\eta = \eta / m$")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"Test accuracy vs base learning rate at m = {m}, per normalization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def noise_scale_by_batch(rows):
    """{m: (epochs, B_simple per epoch)} from the history of the best trial at each m (the
    smoothed gradient noise scale a run with --gns_every_steps records)."""
    curves = {}
    for m, row in best_trials([r for r in rows if r["status"] == "completed"]).items():
        history = results.read_csv(os.path.join(row["trial_dir"], results.HISTORY_FILE))
        points = [(h["epoch"], h["gns_b_simple"]) for h in history
                  if isinstance(h.get("gns_b_simple"), float)
                  and math.isfinite(h["gns_b_simple"]) and h["gns_b_simple"] > 0]
        if points:
            curves[m] = tuple(zip(*points))
    return curves


def plot_gns(rows, out, title=""):
    """B_simple = tr(Sigma)/|G|^2 over training, one curve per m (its best eta_tilde), with
    the sweep's best m drawn as a horizontal line: McCandlish et al.'s critical batch size
    beside the batch size that won."""
    curves = noise_scale_by_batch(rows)
    if not curves:
        raise app.UsageError("no trial in --results recorded gns_b_simple; sweep with "
                             "--gns_every_steps")
    best_m = max(best_by_batch(rows).items(), key=lambda item: item[1])[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, (epochs, values) in curves.items():
        ax.plot(epochs, values, marker="o", ms=3, label=f"m = {m}")
    ax.axhline(best_m, color="0.3", ls="--", lw=1,
               label=f"best m of the sweep ({best_m})")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$B_{simple} = \mathrm{tr}(\Sigma) / |G|^2$ (examples)")
    ax.set_title(title or "Gradient noise scale over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def sharpness_by_batch(rows):
    """{m: (epochs, train losses, sharpness)} of the best trial at each m, from the epochs of
    its history.csv where the sharpness was measured (--sharpness_every, --sharpness=final)
    and the training loss is finite."""
    curves = {}
    for m, row in best_trials([r for r in rows if r["status"] == "completed"]).items():
        history = results.read_csv(os.path.join(row["trial_dir"], results.HISTORY_FILE))
        points = [(h["epoch"], h["train_loss"], h["sharpness"]) for h in history
                  if results.is_finite(h.get("sharpness"))
                  and results.is_finite(h.get("train_loss"))]
        if points:
            curves[m] = tuple(zip(*points))
    return curves


def plot_sharpness(rows, out, title=""):
    """Keskar et al.'s Fig. 4: epsilon-sharpness vs the training loss over training, one
    curve per m (its best eta_tilde). The loss axis is logarithmic and reversed, as theirs:
    training proceeds to the right."""
    curves = sharpness_by_batch(rows)
    if not curves:
        raise app.UsageError("no completed trial in --results recorded a sharpness; sweep "
                             "with --sharpness_every=K (or --sharpness=final)")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, (epochs, losses, values) in curves.items():
        line, = ax.plot(losses, values, marker="o", ms=3, label=f"m = {m}")
        ax.annotate(f"{_fmt(epochs[-1])}", (losses[-1], values[-1]), fontsize=7,
                    color=line.get_color(), xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training loss (running mean over the epoch; decreasing to the right)")
    ax.set_ylabel(r"$\epsilon$-sharpness $\phi$")
    ax.set_title(title or "Sharpness vs training loss (last epoch annotated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out)


def warm_start_epoch(run_dir):
    """The epoch of the source network a run was warm-started from: the EPOCH of its
    config.yaml's init_from=RUN_DIR[:EPOCH]; without one, the source's newest checkpoint,
    taken as its last completed epoch (result.yaml epochs_completed, else its config's
    epochs). None for a run that was not warm-started."""
    from sbt_keras.training import warm_start  # no TensorFlow

    init_from = results.read_yaml(os.path.join(run_dir, results.CONFIG_FILE)).get("init_from")
    if not init_from:
        return None
    source, epoch = warm_start.parse(init_from)
    if epoch is not None:
        return epoch
    record_path = os.path.join(source, results.RESULT_FILE)
    if results.exists(record_path):
        done = results.read_yaml(record_path).get("epochs_completed")
        if done is not None:
            return int(done)
    return int(results.read_yaml(os.path.join(source, results.CONFIG_FILE))["epochs"])


def warm_start_points(run_dirs):
    """[(warm-start epoch, test accuracy, sharpness or None, run_dir)] sorted by epoch, from
    each run's config.yaml (init_from) and result.yaml (test_accuracy, sharpness); runs
    that were not warm-started or have no result yet are left out."""
    points = []
    for run_dir in run_dirs:
        epoch = warm_start_epoch(run_dir)
        record_path = os.path.join(run_dir, results.RESULT_FILE)
        if epoch is None or not results.exists(record_path):
            continue
        record = results.read_yaml(record_path)
        sharp = record.get("sharpness")
        points.append((epoch, record["test_accuracy"],
                       sharp if results.is_finite(sharp) else None, run_dir))
    return sorted(points, key=lambda p: (p[0], p[3]))


def plot_warm_start(run_dirs, out, title=""):
    """Keskar et al.'s Sec. 4 ("piggybacked" large-batch runs): test accuracy (left axis)
    and the final epsilon-sharpness (right axis) vs the small-batch epoch each run was
    warm-started from."""
    points = warm_start_points(run_dirs)
    if not points:
        raise app.UsageError("no finished warm-started run (config.yaml init_from) among the "
                             "given runs")
    fig, left = plt.subplots(figsize=(6.4, 4.2))
    epochs = [p[0] for p in points]
    left.plot(epochs, [p[1] * 100 for p in points], "o-", color="C0", label="test accuracy")
    left.set_xlabel("warm-start epoch of the small-batch run")
    left.set_ylabel("test accuracy (%)", color="C0")
    left.grid(alpha=0.3)
    sharp = [(p[0], p[2]) for p in points if p[2] is not None]
    handles = left.get_legend_handles_labels()
    if sharp:
        right = left.twinx()
        right.plot(*zip(*sharp), "s--", color="C3", label=r"$\epsilon$-sharpness")
        right.set_ylabel(r"$\epsilon$-sharpness $\phi$ (final)", color="C3")
        more = right.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    left.legend(*handles, fontsize=8)
    left.set_title(title or "Large batch warm-started from small-batch iterates")
    return _finish(fig, out)


def curves_figure(runs, title=""):
    """(figure, (left, right) axes): test accuracy and train loss per epoch of the runs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run_dir in runs:
        rows = results.read_csv(os.path.join(run_dir, results.HISTORY_FILE))
        epochs = [r["epoch"] for r in rows]
        label = os.path.basename(os.path.normpath(run_dir))
        left.plot(epochs, [r["test_accuracy"] * 100 for r in rows], label=label)
        right.plot(epochs, [r["train_loss"] for r in rows], label=label)
    left.set_ylabel("test accuracy (%)")
    right.set_ylabel("train loss")
    right.set_yscale("log")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Convergence curves")
    return fig, (left, right)


def plot_curves(runs, out, title=""):
    """Test accuracy and train loss per epoch for chosen runs (paper Fig. 4)."""
    fig, _ = curves_figure(runs, title)
    return _finish(fig, out)


# ---------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
    """Only when run as a script (or on a test's own FlagValues), so importing this module
    defines no global flags."""
    flags.DEFINE_enum("kind", "lr", KINDS, "Which figure.", flag_values=fv)
    flags.DEFINE_list("results", [], "Sweep output directories (holding results.csv); "
                      "--kind=lr and bn draw the rows of all of them as one sweep, best and "
                      "range one line or bar set per directory.", flag_values=fv)
    flags.DEFINE_list("labels", [], "Legend labels for --results (default: directory names).",
                      flag_values=fv)
    flags.DEFINE_list("runs", [], "--kind=curves: run directories (holding history.csv); "
                      "--kind=warm_start: warm-started runs (or give --results: their trials).",
                      flag_values=fv)
    flags.DEFINE_float("tolerance", 0.01, "--kind=range: accuracy tolerance below the best "
                       "(a fraction: 0.01 = 1 percentage point).", flag_values=fv)
    flags.DEFINE_integer("m", 0, "--kind=norm_lr: the batch size to draw (0: the smallest "
                         "swept).", flag_values=fv)
    flags.DEFINE_string("title", "", "Figure title.", flag_values=fv)
    flags.DEFINE_string("out", "", "Output path without extension.", flag_values=fv)


def main(argv):
    del argv
    first = (FLAGS.results or FLAGS.runs or ["."])[0]
    out = FLAGS.out or os.path.join(first, f"fig_{FLAGS.kind}")
    if FLAGS.kind == "curves":
        if not FLAGS.runs:
            raise app.UsageError("--kind=curves needs --runs=DIR[,DIR...]")
        paths = plot_curves(FLAGS.runs, out, FLAGS.title)
    elif FLAGS.kind == "warm_start" and FLAGS.runs:
        paths = plot_warm_start(FLAGS.runs, out, FLAGS.title)
    else:
        if not FLAGS.results:
            raise app.UsageError(f"--kind={FLAGS.kind} needs --results=DIR[,DIR...]")
        labels = FLAGS.labels or [os.path.basename(os.path.normpath(d)) for d in FLAGS.results]
        if len(labels) != len(FLAGS.results):
            raise app.UsageError("--labels needs one label per --results directory")
        per_dir = [load_rows(d) for d in FLAGS.results]
        # One experiment in parts (Fig. 14's three m ranges): one figure over all their rows.
        merged = [r for rows in per_dir for r in rows]
        if FLAGS.kind in ("best", "range") and len(set(labels)) != len(labels):
            raise app.UsageError("two --results directories have the same name; tell their "
                                 "lines apart with --labels")
        experiments = dict(zip(labels, per_dir))
        if FLAGS.kind == "lr":
            paths = plot_lr(merged, out, FLAGS.title)
        elif FLAGS.kind == "bn":
            paths = plot_bn(merged, out, FLAGS.title)
        elif FLAGS.kind == "best":
            paths = plot_best(experiments, out, FLAGS.title)
        elif FLAGS.kind == "norms":
            paths = plot_norms(merged, out, FLAGS.title)
        elif FLAGS.kind == "alpha":
            paths = plot_alpha(merged, out, FLAGS.title)
        elif FLAGS.kind == "norm_lr":
            paths = plot_norm_lr(merged, out, FLAGS.m, FLAGS.title)
        elif FLAGS.kind == "gns":
            paths = plot_gns(merged, out, FLAGS.title)
        elif FLAGS.kind == "sharpness":
            paths = plot_sharpness(merged, out, FLAGS.title)
        elif FLAGS.kind == "warm_start":
            paths = plot_warm_start([r["trial_dir"] for r in merged], out, FLAGS.title)
        else:
            paths = plot_range(experiments, out, FLAGS.tolerance, FLAGS.title)
    print("\n".join(paths))


if __name__ == "__main__":
    define_flags()
    app.run(main)
