"""Update noise and gradient staleness of a trained run (Masters & Luschi 2018, eq. 5-9).

    python -m tools.noise --run=runs/m8 --epochs=0,10,20 --sample=1024 \\
        --batch_sizes=2:1024 --staleness_n=1,2,4,8 --staleness_m=8,64 \\
        --staleness_lrs=2^-8,2^-6 --out=runs/m8/noise

For each kept epoch of the run (snapshot.load; default: its newest checkpoint), on a seeded
sample of N un-augmented training examples:

  update variance  the per-example gradients (inference mode) of the sample, then for each m
                   the trace of Cov[eta_tilde * sum_{i in B} g_i], measured by Monte Carlo
                   (--draws batches, with and without replacement) against the closed forms
                   eta_tilde^2 m tr(Sigma_1) and eta_tilde^2 m (N-m)/(N-1) tr(Sigma_1); the
                   fitted log-log slope of the measurement (1 for the line). Also the
                   sample's |gbar|^2, tr(Sigma_1) and B_simple = tr(Sigma_1)/|gbar|^2.
  staleness        for each m in --staleness_m and eta_tilde in --staleness_lrs, the ratio
                   |theta_{k+n}^small - theta_{k+1}^large| / |theta_{k+1}^large - theta_k|
                   of n steps of batch m against one of n*m (training mode, the run's BN
                   batch in both, weight decay as the run), on the sample's first n*m
                   examples, for each n in --staleness_n.

eta_tilde defaults to the run's base learning rate at the checkpoint's step (its schedule,
warm-up and decay included). Conventions: sbt_keras/update_noise.py. Writes
gradient_stats.csv, update_variance.csv, staleness.csv, update_variance.png/.svg and
staleness.png/.svg to --out (default RUN/noise). The cost is printed before anything is
measured. Bad input (a run without checkpoints, a batch larger than the sample, a bad list)
is one line on stderr and exit status 2.
"""
import dataclasses
import math
import os
import sys

from absl import app, flags

from sbt_keras import results
from sbt_keras.errors import ConfigError

FLAGS = flags.FLAGS
FIGURE_FORMATS = ("png", "svg", "pdf")


def define_flags(fv=FLAGS):
    flags.DEFINE_string("run", "", "A run's --output_dir (with config.yaml and checkpoints).",
                        flag_values=fv)
    flags.DEFINE_string("epochs", "", "Kept epochs to measure, e.g. 0,10,20 (0: the initial "
                        "weights); empty: the newest checkpoint.", flag_values=fv)
    flags.DEFINE_integer("sample", 1024, "N: training examples measured (seeded sample).",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the sample and of the Monte-Carlo draws.",
                         flag_values=fv)
    flags.DEFINE_string("batch_sizes", "2:1024", "Batch sizes m for the update variance: "
                        "a list, and lo:hi for the powers of two from lo to hi.",
                        flag_values=fv)
    flags.DEFINE_integer("draws", 1000, "Monte-Carlo batches per m and sampling scheme.",
                         flag_values=fv)
    flags.DEFINE_float("lr", 0.0, "eta_tilde for the update variance (0: the run's at the "
                       "checkpoint).", flag_values=fv)
    flags.DEFINE_integer("chunk_size", 64, "Examples per vectorized per-example-gradient "
                         "chunk (bounds activation memory).", flag_values=fv)
    flags.DEFINE_enum("per_example", "auto", ["auto", "jacobian", "loop"], "How per-example "
                      "gradients are computed (update_noise.per_example_gradients); auto: "
                      "jacobian with a GPU, loop (faster there) on CPU.", flag_values=fv)
    flags.DEFINE_string("staleness_n", "1,2,4,8", "Step counts n (empty: no staleness).",
                        flag_values=fv)
    flags.DEFINE_string("staleness_m", "", "Small batch sizes m (empty: the run's).",
                        flag_values=fv)
    flags.DEFINE_string("staleness_lrs", "", "Base learning rates eta_tilde, e.g. 2^-8,0.01 "
                        "(empty: the run's at the checkpoint).", flag_values=fv)
    flags.DEFINE_string("out", "", "Output directory (default RUN/noise).", flag_values=fv)
    flags.DEFINE_list("formats", ["png", "svg"], "Figure file formats (empty: tables only).",
                      flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Settings:
    run: str
    epochs: tuple = ()           # () = the newest checkpoint
    sample: int = 1024
    seed: int = 0
    batch_sizes: tuple = ()
    draws: int = 1000
    lr: float = 0.0              # 0 = the run's eta_tilde at the checkpoint
    chunk_size: int = 64
    per_example: str = "auto"    # "jacobian", "loop", or auto: jacobian on GPU, loop on CPU
    staleness_n: tuple = (1, 2, 4, 8)
    staleness_m: tuple = ()      # () = the run's batch size
    staleness_lrs: tuple = ()    # () = the run's eta_tilde at the checkpoint
    out: str = ""
    formats: tuple = ("png", "svg")  # figure files; () = the CSV tables only


# ------------------------------------------------------------------------ parsing


def parse_sizes(text, flag, *, allow_empty=False):
    """Sorted distinct positive integers from 'a,b,c' and 'lo:hi' (powers of two lo..hi)."""
    values = set()
    for item in _items(text, flag, allow_empty):
        if ":" in item:
            lo, hi = (_integer(part, flag, item) for part in item.split(":", 1))
            if lo < 1 or hi < lo or lo & (lo - 1) or hi & (hi - 1):
                raise ConfigError(f"--{flag}={text}: '{item}' must be lo:hi with powers of "
                                  f"two 1 <= lo <= hi")
            while lo <= hi:
                values.add(lo)
                lo *= 2
        else:
            value = _integer(item, flag, item)
            if value < 1:
                raise ConfigError(f"--{flag}={text}: '{item}' must be a positive integer")
            values.add(value)
    return tuple(sorted(values))


def parse_epochs(text):
    epochs = set()
    for item in _items(text, "epochs", True):
        value = _integer(item, "epochs", item)
        if value < 0:
            raise ConfigError(f"--epochs={text}: '{item}' must be an epoch number >= 0")
        epochs.add(value)
    return tuple(sorted(epochs))


def parse_rates(text, flag):
    """Sorted distinct positive rates from '0.01,2^-8,2**-6'."""
    rates = set()
    for item in _items(text, flag, True):
        base, power = (item.split("^", 1) if "^" in item else
                       item.split("**", 1) if "**" in item else (item, None))
        try:
            value = float(base) ** float(power) if power is not None else float(base)
        except (ValueError, OverflowError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{flag}={text}: '{item}' is not a positive learning rate "
                              f"(give e.g. 0.004 or 2^-8)")
        rates.add(value)
    return tuple(sorted(rates))


def _items(text, flag, allow_empty):
    items = [item.strip() for item in str(text).split(",")]
    if items == [""] and allow_empty:
        return []
    if any(not item for item in items):
        raise ConfigError(f"--{flag}={text}: give a comma-separated list without empty "
                          f"entries")
    return items


def _integer(text, flag, item):
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--{flag}: '{item}' is not an integer") from None


def settings_from_flags(fv=FLAGS):
    if not fv.run:
        raise ConfigError("give --run=DIR, a run's --output_dir")
    return Settings(
        run=fv.run, epochs=parse_epochs(fv.epochs), sample=fv.sample, seed=fv.seed,
        batch_sizes=parse_sizes(fv.batch_sizes, "batch_sizes"), draws=fv.draws, lr=fv.lr,
        chunk_size=fv.chunk_size, per_example=fv.per_example,
        staleness_n=parse_sizes(fv.staleness_n, "staleness_n", allow_empty=True),
        staleness_m=parse_sizes(fv.staleness_m, "staleness_m", allow_empty=True),
        staleness_lrs=parse_rates(fv.staleness_lrs, "staleness_lrs"), out=fv.out,
        formats=tuple(fv.formats))


def check(settings, batch_size):
    """Sizes against the sample, before anything is loaded. `batch_size`: the run's m."""
    s = settings
    if s.sample < 2:
        raise ConfigError(f"--sample={s.sample} must be >= 2 (a covariance needs 2 examples)")
    if not s.batch_sizes:
        raise ConfigError("--batch_sizes is empty")
    big = [m for m in s.batch_sizes if m > s.sample]
    if big:
        raise ConfigError(f"--batch_sizes: m={big[0]} is larger than --sample={s.sample}; "
                          f"draw batches of at most the sample, or raise --sample")
    if s.draws < 2:
        raise ConfigError(f"--draws={s.draws} must be >= 2")
    if s.chunk_size < 1:
        raise ConfigError(f"--chunk_size={s.chunk_size} must be >= 1")
    if s.per_example not in ("auto", "jacobian", "loop"):
        raise ConfigError(f"--per_example={s.per_example} must be auto, jacobian or loop")
    unknown = [f for f in s.formats if f not in FIGURE_FORMATS]
    if unknown:
        raise ConfigError(f"--formats: '{unknown[0]}' is not one of "
                          f"{', '.join(FIGURE_FORMATS)}")
    if not (math.isfinite(s.lr) and s.lr >= 0):
        raise ConfigError(f"--lr={s.lr} must be >= 0 (0: the run's)")
    if s.staleness_n:
        for m in s.staleness_m or (batch_size,):
            need = max(s.staleness_n) * m
            if need > s.sample:
                raise ConfigError(f"--staleness_n/--staleness_m: n*m = {max(s.staleness_n)}"
                                  f"*{m} = {need} examples are larger than --sample="
                                  f"{s.sample}")


# -------------------------------------------------------------------- measuring


def bn_batch_of(snap):
    """The examples per BN group of the snapshot's network, or None when no group limits
    a split (no batch statistics, or synchronized BN over whatever batch it is given)."""
    from sbt_keras import norms

    if snap.cfg.bn_sync or not norms.uses_batch_statistics(snap.cfg.norm):
        return None
    return snap.derived.get("bn_batch_size") or None


def lr_at_checkpoint(snap):
    """eta_tilde of the next update after the checkpoint: the run's schedule at its step."""
    from sbt_keras.training import schedules

    schedule = schedules.from_config(snap.cfg, snap.derived["steps_per_epoch"])
    return float(schedule(snap.step))


def per_example_method(choice):
    """"auto": the vectorized Jacobian where a GPU is visible, the in-graph loop on CPU."""
    if choice != "auto":
        return choice
    import tensorflow as tf

    return "jacobian" if tf.config.list_logical_devices("GPU") else "loop"


def cost_text(settings, snap, epochs):
    s = settings
    params = sum(int(math.prod(v.shape)) for v in snap.network.trainable_variables)
    n = s.sample
    ms = s.staleness_m or (snap.cfg.batch_size,)
    lrs = len(s.staleness_lrs) or 1
    stale = (1 + lrs) * max(s.staleness_n) * sum(ms) if s.staleness_n else 0
    lines = [
        f"cost per epoch (x{len(epochs)} epochs): N = {n:,} examples, P = {params:,} "
        f"parameters",
        f"  per-example gradients: {n:,} example forward+backward passes "
        f"({per_example_method(s.per_example)}, chunks of {min(s.chunk_size, n)}); host "
        f"memory N*P float32 = "
        f"{_bytes(4 * n * params)} + Gram matrix N^2 float64 = {_bytes(8 * n * n)}",
        f"  update variance: {len(s.batch_sizes)} batch sizes x 2 schemes x {s.draws} draws "
        f"on the Gram matrix (~{2 * len(s.batch_sizes) * s.draws * n * n:.2g} "
        f"multiply-adds, no network passes)",
        f"  staleness: (1 + {lrs} rates) x max n {max(s.staleness_n or [0])} x m in "
        f"{list(ms)} = {stale:,} example forward+backward passes"
        if s.staleness_n else "  staleness: not measured (--staleness_n empty)",
        f"  total: {len(epochs) * (n + stale):,} example forward+backward passes",
    ]
    return "\n".join(lines)


def _bytes(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.3g} {unit}"
        count /= 1000


def measure_epoch(snap, settings):
    """(stats row, [update-variance rows], [staleness rows]) of one snapshot."""
    from sbt_keras import models
    from sbt_keras import update_noise as un

    s = settings
    run_lr = lr_at_checkpoint(snap)
    lr = s.lr or run_lr
    images, labels = snap.train_arrays(s.sample, s.seed)
    grads = un.per_example_gradients(snap.network, images, labels, chunk_size=s.chunk_size,
                                     method=per_example_method(s.per_example))
    gram = un.gram_matrix(grads)
    params = grads.shape[1]
    del grads
    stats, rows = un.update_variance_table(gram, s.batch_sizes, lr, draws=s.draws,
                                           seed=s.seed)
    epoch = snap.epoch

    def slope(values, ms):
        try:
            return un.loglog_slope(ms, values)[0]
        except ValueError:  # fewer than 2 batch sizes, or a zero variance
            return math.nan

    usable = [r for r in rows if r.m < stats.num_examples]  # m = N: no variance w/o repl.
    stats_row = dict(
        epoch=epoch, step=snap.step, sample=stats.num_examples, params=params, lr=lr,
        mean_grad_sq=stats.mean_grad_sq, trace_sigma1=stats.trace_sigma1,
        b_simple=stats.b_simple,
        slope_with=slope([r.measured_with.value for r in rows], [r.m for r in rows]),
        slope_without=slope([r.measured_without.value for r in usable],
                            [r.m for r in usable]))
    variance_rows = [dict(
        epoch=epoch, m=r.m, lr=r.lr, closed_with=r.closed_with,
        measured_with=r.measured_with.value, stderr_with=r.measured_with.stderr,
        closed_without=r.closed_without, measured_without=r.measured_without.value,
        stderr_without=r.measured_without.stderr, draws=s.draws) for r in rows]
    staleness_rows = []
    if s.staleness_n:
        decayed = models.decayed_variables(snap.network, snap.cfg.weight_decay_on)
        for m in s.staleness_m or (snap.cfg.batch_size,):
            for r in un.staleness_curve(
                    snap.network, images, labels, ns=s.staleness_n, m=m,
                    lrs=s.staleness_lrs or (run_lr,), weight_decay=snap.cfg.weight_decay,
                    decayed_variables=decayed, bn_batch_size=bn_batch_of(snap)):
                staleness_rows.append(dict(
                    epoch=epoch, m=r.m, lr=r.lr, n=r.n, nm_lr=r.examples_times_lr,
                    ratio=r.ratio, numerator=r.numerator, denominator=r.denominator))
    return stats_row, variance_rows, staleness_rows


STATS_COLUMNS = ("epoch", "step", "sample", "params", "lr", "mean_grad_sq", "trace_sigma1",
                 "b_simple", "slope_with", "slope_without")
VARIANCE_COLUMNS = ("epoch", "m", "lr", "closed_with", "measured_with", "stderr_with",
                    "closed_without", "measured_without", "stderr_without", "draws")
STALENESS_COLUMNS = ("epoch", "m", "lr", "n", "nm_lr", "ratio", "numerator", "denominator")


def run(settings, load=None, log=print):
    """Measures every epoch and writes the tables and figures; returns the paths written.
    `load` is snapshot.load (replaceable in tests). Raises ConfigError on bad input."""
    from sbt_keras.training import snapshot

    load = load or snapshot.load
    s = settings
    stored = snapshot.read_config(s.run)
    check(s, int(stored.get("batch_size") or 0))
    epochs = s.epochs or (None,)
    first = load(s.run, epoch=epochs[0])
    if s.staleness_n and bn_batch_of(first):
        bn = bn_batch_of(first)
        bad = [m for m in s.staleness_m or (first.cfg.batch_size,) if m % bn]
        if bad:
            raise ConfigError(f"--staleness_m: the run's BN batch {bn} does not divide "
                              f"m={bad[0]}: a split that breaks a BN group; give multiples "
                              f"of {bn}")
    first.train_arrays(s.sample, s.seed)  # a sample larger than the training set: refused now
    for epoch in epochs[1:]:  # fail before measuring anything if an epoch is not kept
        if epoch * first.derived["steps_per_epoch"] not in snapshot.available(s.run):
            load(s.run, epoch=epoch)  # raises its one-line ConfigError
    log(cost_text(s, first, epochs))
    stats, variance, staleness = [], [], []
    for index, epoch in enumerate(epochs):
        snap = first if index == 0 else load(s.run, epoch=epoch)
        log(f"epoch {snap.epoch:g} (step {snap.step}): measuring")
        a, b, c = measure_epoch(snap, s)
        stats.append(a)
        variance += b
        staleness += c
        log(f"  |gbar|^2 = {a['mean_grad_sq']:.4g}, tr(Sigma_1) = {a['trace_sigma1']:.4g}, "
            f"B_simple = {a['b_simple']:.4g}, slope = {a['slope_with']:.3f}")
    out = s.out or os.path.join(s.run, "noise")
    paths = [os.path.join(out, name) for name in
             ("gradient_stats.csv", "update_variance.csv", "staleness.csv")]
    for path, rows, columns in zip(paths, (stats, variance, staleness),
                                   (STATS_COLUMNS, VARIANCE_COLUMNS, STALENESS_COLUMNS)):
        results.write_csv(path, rows, columns)
    if s.formats:
        paths += plot_update_variance(stats, variance, os.path.join(out, "update_variance"),
                                      s.formats)
        if staleness:
            paths += plot_staleness(staleness, os.path.join(out, "staleness"), s.formats)
    return paths


# ------------------------------------------------------------------------ figures


def lr_label(lr):
    exponent = math.log2(lr)
    return f"$2^{{{exponent:g}}}$" if exponent == round(exponent) else f"{lr:g}"


def _figure(panels):
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.2), squeeze=False)
    fig.subplots_adjust(wspace=0.35)  # room for each panel's y label
    return plt, fig, axes[0]


def _save(plt, fig, out, formats):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    paths = [f"{out}.{ext}" for ext in formats]
    for path in paths:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_update_variance(stats, rows, out, formats=("png", "svg")):
    """One panel per epoch: measured variance (with replacement: filled, error bars of 2
    standard errors; without: hollow) against m, the closed-form lines, slopes in the
    legend."""
    plt, fig, axes = _figure(len(stats))
    for ax, st in zip(axes, stats):
        mine = [r for r in rows if r["epoch"] == st["epoch"]]
        ms = [r["m"] for r in mine]
        ax.errorbar(ms, [r["measured_with"] for r in mine],
                    yerr=[2 * r["stderr_with"] for r in mine], fmt="o", color="C0",
                    label=f"measured, with replacement (slope {st['slope_with']:.2f})")
        ax.plot(ms, [r["closed_with"] for r in mine], "-", color="C0",
                label=r"$\tilde\eta^2\, m\, \mathrm{tr}\,\Sigma_1$ (slope 1), $\tilde\eta$ = "
                + lr_label(st["lr"]))
        positive = [r for r in mine if r["measured_without"] > 0]
        ax.plot([r["m"] for r in positive], [r["measured_without"] for r in positive], "s",
                mfc="none", color="C1",
                label=f"measured, without replacement (slope {st['slope_without']:.2f})")
        closed = [r for r in mine if r["closed_without"] > 0]
        ax.plot([r["m"] for r in closed], [r["closed_without"] for r in closed], "--",
                color="C1",
                label=r"$\tilde\eta^2\, m\, \frac{N-m}{N-1}\, \mathrm{tr}\,\Sigma_1$")
        ax.set(xscale="log", yscale="log", xlabel="batch size m",
               ylabel=r"$\mathrm{tr\,Cov}[\tilde\eta \sum_{i \in B} \nabla L_i]$",
               title=f"epoch {st['epoch']:g}, N = {st['sample']}, "
                     f"B_simple = {st['b_simple']:.3g}")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    return _save(plt, fig, out, formats)


def plot_staleness(rows, out, formats=("png", "svg")):
    """One panel per epoch: the staleness ratio against n*m*eta_tilde, a line per (m,
    eta_tilde) over n (n = 1, ratio 0, is left out of the log axes)."""
    epochs = sorted({r["epoch"] for r in rows})
    plt, fig, axes = _figure(len(epochs))
    for ax, epoch in zip(axes, epochs):
        mine = [r for r in rows if r["epoch"] == epoch]
        for index, key in enumerate(sorted({(r["m"], r["lr"]) for r in mine})):
            line = [r for r in mine if (r["m"], r["lr"]) == key and r["ratio"] > 0]
            if line:
                ax.plot([r["nm_lr"] for r in line], [r["ratio"] for r in line], "o-",
                        color=f"C{index % 10}",
                        label=rf"m = {key[0]}, $\tilde\eta$ = {lr_label(key[1])}")
        ax.set(xscale="log", yscale="log", xlabel=r"$n\, m\, \tilde\eta$",
               ylabel=r"$|\theta^{small}_{k+n} - \theta^{large}_{k+1}|\ /\ "
                      r"|\theta^{large}_{k+1} - \theta_k|$",
               title=f"staleness, epoch {epoch:g}")
        ax.legend(fontsize=7)
    return _save(plt, fig, out, formats)


# --------------------------------------------------------------------------- main


def cli(settings_fn, load=None, log=print):
    """Exit status of one run: 0, or 2 with one line on stderr for bad input."""
    try:
        paths = run(settings_fn(), load=load, log=log)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log("\n".join(paths))
    return 0


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; every setting is a --flag",
              file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(cli(settings_from_flags))


if __name__ == "__main__":
    define_flags()
    app.run(main)
