"""Trials per hour of one grid column: packed vs one trial at a time vs --sweep_workers.

    make bench                                       # runs this after tools/bench.py
    python -m tools.bench_pack --batch_sizes=2,8,32 --pack=8 --workers=2 --out=runs/bench

For every m, on whatever device is present, a column of K trials that differ only in
eta_tilde (ResNet-20 + BN by default), trained three ways:
  one at a time  the sbt train step of one trial (SummedGradientModel.fit, run defaults);
                 K trials take K times its step time
  packed         the K trials as one program of K sub-graphs (training/packed_model.py,
                 `--pack=K --pack_formulation=separate`)
  grouped        the K trials as one fused network: grouped convs, K-way logits
                 (training/grouped.py, `--pack_formulation=grouped`; CIFAR ResNets and
                 AlexNet with --norm=none|batch, else left out)
  workers        W processes each training one trial at the same time on the same device
                 (what `--sweep_workers=W` does); their step rates add up
Each is converted to trials per hour of a reference trial (`--trial_epochs` epochs of
`--trial_examples` examples at batch size m, the paper's CIFAR-10 runs by default), and
the packed step is also put against the arithmetic limit (K x the training FLOPs of a step
at the measured matmul peak) and against K single steps, which shows where the time goes
when packing gains less than K: arithmetic (the limit column near 100%) or overhead.

One at a time, packed and grouped are timed interleaved in one process (median of
--repeats blocks after a warm-up block); the workers run after them, in their own
processes, all started together once each has built and warmed up its model.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from sbt_keras import models, results  # noqa: E402
from sbt_keras.training import schedules  # noqa: E402
from sbt_keras.training.grouped import GroupedPackModel  # noqa: E402
from sbt_keras.training.packed_model import PackedModel  # noqa: E402
from sbt_keras.training.summed_sgd import SummedGradientModel, build_optimizer  # noqa: E402
from tools import bench, machine, profile_step  # noqa: E402

FLAGS = flags.FLAGS
SHAPE = (32, 32, 3)
# The packed trials' eta_tilde: 2^-20, 2^-19, ... Small enough that no trial diverges in a
# timed block, even ResNet-20 without BN on one repeated batch (2^-12... did: a NaN trial
# made every grouped step take the NaN-isolating recomputation, which a real pack avoids
# by freezing and zeroing the diverged trial). Step times do not depend on the values.
FIRST_LOG2_LR = -20


def define_flags():
    flags.DEFINE_string("model", "resnet20", "Model to time.")
    flags.DEFINE_string("norm", "batch", "Normalization.")
    flags.DEFINE_list("batch_sizes", ["2", "8", "32"], "Batch sizes m.")
    flags.DEFINE_integer("pack", 8, "K: eta_tilde values per column, trained as one pack.",
                         lower_bound=1)
    flags.DEFINE_integer("workers", 2, "W for the --sweep_workers comparison (0: skip).",
                         lower_bound=0)
    flags.DEFINE_integer("steps", 10, "Steps per timed block.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Timed blocks; the median is reported.", lower_bound=1)
    flags.DEFINE_integer("trial_epochs", 82, "Reference trial for trials/hour: epochs.")
    flags.DEFINE_integer("trial_examples", 50000, "Reference trial: training examples.")
    flags.DEFINE_boolean("jit_compile", False, "Compile the steps with XLA.")
    flags.DEFINE_integer("inter_op_threads", 0, "TF inter-op threads (0: TF's default).")
    flags.DEFINE_integer("intra_op_threads", 0, "TF intra-op threads (0: TF's default).")
    flags.DEFINE_boolean("formulations", False,
                         "Also time one 3x3 conv layer's step (forward, backward, update) for "
                         "K trials as K separate convs vs one grouped conv, with and without "
                         "XLA: the choice of packed formulation on this device.")
    flags.DEFINE_list("breakdown", ["8"], "m values at which to also profile where a "
                      "step's time goes, op class by op class: K x one trial vs the packs "
                      "(default m = 8, where the CPU target is missed; empty: none).")
    flags.DEFINE_string("out", "runs/bench", "Where bench_pack.md and .json go.")
    flags.DEFINE_string("worker_dir", "", "(internal) run as one timed worker process.")
    for name in ("batch_sizes", "breakdown"):  # one line before anything is measured
        flags.register_validator(name, _batch_sizes,
                                 message=f"--{name} takes batch sizes m >= 1, e.g. 2,8")


def _batch_sizes(values):
    return all(v.isdigit() and int(v) >= 1 for v in values)


def _member(name, norm, m, log2_lr, shape):
    net = bench._network(name, norm, m, 0, shape)
    model = SummedGradientModel(net, models.spec(name).weight_decay,
                                models.decayed_variables(net))
    model.compile(optimizer=build_optimizer(2.0 ** log2_lr))
    return net, model


def single_block(name, norm, m, steps, jit, shape=SHAPE):
    block, _, net = bench.sbt_block(name, norm, m, shape, 0, steps, steps, jit)
    return block, net


def packed_block(name, norm, m, k, steps, jit, shape=SHAPE):
    """A block of `steps` packed steps of K trials with eta_tilde 2^-20, 2^-19, ..."""
    members = [_member(name, norm, m, FIRST_LOG2_LR + i, shape)[1] for i in range(k)]
    packed = PackedModel(members)
    packed.compile(steps_per_execution=steps, jit_compile=jit)
    return bench._fit_block(packed, m, shape, steps)


def grouped_block(name, norm, m, k, steps, jit, shape=SHAPE):
    """The same K trials as `packed_block`, as one fused network (the grouped formulation),
    or None where the model or norm has none."""
    if norm not in models.spec(name).fused_norms:
        return None
    members = [_member(name, norm, m, FIRST_LOG2_LR + i, shape)[1] for i in range(k)]
    fused = bench._network(name, norm, m, 0, shape, trials=k)
    packed = GroupedPackModel(fused, members, [
        schedules.WarmupStepDecay(2.0 ** (FIRST_LOG2_LR + i)) for i in range(k)])
    packed.compile(steps_per_execution=steps, jit_compile=jit)
    packed.assemble()
    return bench._fit_block(packed, m, shape, steps)


def trials_per_hour(seconds_per_step, m, trials_per_step=1, epochs=82, examples=50000):
    """Reference trials finished per hour at this step time (K trials per packed step)."""
    steps = epochs * (examples // m)
    return 3600.0 * trials_per_step / (steps * seconds_per_step)


# ---------------------------------------------------------------------- formulations
def conv_formulations(k, m, channels=16, size=32, steps=10, repeats=3):
    """ms per step of one 3x3 conv layer (forward, backward, SGD update) for: one trial;
    K trials as K separate convs in one graph; K trials as one grouped conv (K x C
    channels, `feature_group_count` K) -- without and with XLA."""
    tf = bench.tf
    x = tf.random.normal([m, size, size, k * channels])
    xs = tf.split(x, k, axis=3)
    separate = [tf.Variable(tf.random.normal([3, 3, channels, channels]) * 0.1)
                for _ in range(k)]
    grouped = tf.Variable(tf.concat([w.value() for w in separate], axis=3))

    def conv(a, w):
        return tf.reduce_sum(tf.square(tf.nn.conv2d(a, w, 1, "SAME")))

    def sgd(pairs):
        """One step over [(input, kernel)]; a real update, so every step depends on the
        last (nothing for XLA to hoist out of the loop)."""
        kernels = [w for _, w in pairs]
        with tf.GradientTape() as tape:
            loss = tf.add_n([conv(a, w) for a, w in pairs])
        for w, g in zip(kernels, tape.gradient(loss, kernels)):
            w.assign_sub(1e-9 * g)

    steps_of = {"one trial": [(xs[0], separate[0])],
                "K separate": list(zip(xs, separate)),
                "grouped": [(x, grouped)]}
    out = {}
    for jit in (False, True):
        for name, pairs in steps_of.items():
            n = steps if not jit else max(1, steps // 5)  # XLA's CPU convs are slow

            @tf.function(jit_compile=jit)
            def block(pairs=pairs, n=n):
                for _ in tf.range(n):
                    sgd(pairs)
                return tf.constant(0)

            block().numpy()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                block().numpy()
                times.append((time.perf_counter() - start) / n)
            out[f"{name}{' XLA' if jit else ''}"] = statistics.median(times) * 1e3
    return out


def formulations_markdown(k, table):
    names = list(next(iter(table.values())))
    lines = [f"One 3x3 conv layer, 16 -> 16 channels at 32x32, forward + backward + update, "
             f"ms per step (K = {k}):", "",
             "| m | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for m, row in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- workers
def worker_main(directory):
    """One --sweep_workers stand-in: build, warm up, say ready, wait for go, time blocks."""
    spec = json.loads(open(os.path.join(directory, "spec.json")).read())
    index = spec["index"] if "index" in spec else int(os.environ["BENCH_WORKER_INDEX"])
    block, _ = single_block(spec["model"], spec["norm"], spec["m"], spec["steps"],
                            spec["jit"])
    block()  # warm-up: tracing and compilation
    open(os.path.join(directory, f"ready-{index}"), "w").close()
    while not os.path.exists(os.path.join(directory, "go")):
        time.sleep(0.01)
    seconds = [block() for _ in range(spec["repeats"])]
    results.write_text_atomic(os.path.join(directory, f"result-{index}.json"),
                              json.dumps(seconds))


def workers_seconds(name, norm, m, workers, steps, repeats, jit, timeout=900, args=()):
    """Median seconds per step of each of `workers` processes training at once."""
    directory = tempfile.mkdtemp(prefix="bench_workers_")
    spec = dict(model=name, norm=norm, m=m, steps=steps, repeats=repeats, jit=jit)
    results.write_text_atomic(os.path.join(directory, "spec.json"), json.dumps(spec))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    procs = [subprocess.Popen([sys.executable, "-m", "tools.bench_pack",
                               f"--worker_dir={directory}", *args], cwd=repo,
                              env={**env, "BENCH_WORKER_INDEX": str(i)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    deadline = time.monotonic() + timeout
    try:
        while not all(os.path.exists(os.path.join(directory, f"ready-{i}"))
                      for i in range(workers)):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a bench worker failed: " + " | ".join(
                    (p.stderr.read() or "")[-500:] for p in procs if p.poll()))
            time.sleep(0.05)
        open(os.path.join(directory, "go"), "w").close()
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [statistics.median(json.loads(open(os.path.join(directory,
                                                            f"result-{i}.json")).read()))
            for i in range(workers)]


# ---------------------------------------------------------------------- report
def run(name="resnet20", norm="batch", batch_sizes=(2, 8, 32), k=8, workers=2, steps=10,
        repeats=3, jit=False, trial_epochs=82, trial_examples=50000, shape=SHAPE,
        peak=None, worker_args=()):
    peak = peak or bench.matmul_peak_flops()
    per_trial = dict(epochs=trial_epochs, examples=trial_examples)
    rows = []
    for m in batch_sizes:
        single, net = single_block(name, norm, m, steps, jit, shape)
        blocks = {"single": single, "packed": packed_block(name, norm, m, k, steps, jit,
                                                           shape)}
        grouped = grouped_block(name, norm, m, k, steps, jit, shape)
        if grouped:
            blocks["grouped"] = grouped
        seconds = bench.interleaved(blocks, repeats)
        t1, tk = seconds["single"], seconds["packed"]
        flops = bench.training_flops_per_example(net) * m  # one trial's step
        row = {"model": name, "norm": norm, "m": m, "k": k,
               "single_ms": t1 * 1e3, "packed_ms": tk * 1e3,
               "single_trials_per_hour": trials_per_hour(t1, m, **per_trial),
               "packed_trials_per_hour": trials_per_hour(tk, m, k, **per_trial),
               "packed_speedup": k * t1 / tk,
               "single_limit_fraction": flops / peak / t1,
               "packed_limit_fraction": k * flops / peak / tk}
        if grouped:
            tg = seconds["grouped"]
            row.update(grouped_ms=tg * 1e3,
                       grouped_trials_per_hour=trials_per_hour(tg, m, k, **per_trial),
                       grouped_speedup=k * t1 / tg, grouped_limit_fraction=k * flops / peak / tg)
        if workers:
            each = workers_seconds(name, norm, m, workers, steps, repeats, jit,
                                   args=worker_args)
            rate = sum(1.0 / s for s in each)  # steps per second, all workers together
            row.update(workers=workers, worker_ms=statistics.mean(each) * 1e3,
                       workers_trials_per_hour=trials_per_hour(1.0 / rate, m, **per_trial),
                       workers_speedup=rate * t1)
        rows.append(row)
        print(_format_row(row), flush=True)
    device = {**machine.describe(), "matmul_peak_gflops": peak / 1e9,
              "tensorflow": bench.tf.__version__, "keras": keras.__version__,
              "steps": steps, "repeats": repeats, "jit_compile": jit,
              "trial_epochs": trial_epochs, "trial_examples": trial_examples}
    return rows, device


def breakdown(name, norm, m, k, steps, jit, shape=SHAPE):
    """Where the time of a step goes: {contender: {op class: ms per step}}, each contender
    timed once after a warm-up block, then profiled once (tools/profile_step.py's TF op
    classes; "wall" is the timed block). One trial's step is multiplied by K, so every
    column is the cost of K trials' steps. Op times on TF's inter-op threads overlap, so a
    column may sum to more than its wall time. Builds its own blocks: `run`'s are timed
    interleaved and not kept."""
    single, _ = single_block(name, norm, m, steps, jit, shape)
    blocks = {"one trial × K": single,
              "separate pack": packed_block(name, norm, m, k, steps, jit, shape),
              "grouped pack": grouped_block(name, norm, m, k, steps, jit, shape)}
    out = {}
    for label, block in blocks.items():
        if block is None:
            continue
        scale = k if block is single else 1
        block()  # warm-up: tracing
        wall = block()  # timed without the profiler
        classes = profile_step.tf_profiled(block, steps)
        out[label] = {"wall": wall * 1e3 * scale,
                      **{cls: ms * scale for cls, ms in classes.items()}}
    return out


def breakdown_markdown(name, norm, m, k, table):
    """One table: op classes as rows, contenders as columns (ms per K trials' step)."""
    labels = list(table)
    classes = [c for c in ("wall", *profile_step.CLASSES)
               if any(c in column for column in table.values())]
    lines = [f"Where the time goes: {name} + {norm}, m = {m}, K = {k}, ms per step of K "
             f"trials (TF profiler; op classes of tools/profile_step.py; ops on parallel "
             f"threads overlap; the grouped pack's per-slice update and live mask are "
             f"elementwise ops, counted in 'other ops').", "",
             "| op class | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for cls in classes:
        lines.append(f"| {'wall (timed)' if cls == 'wall' else cls} | " + " | ".join(
            f"{table[label].get(cls, 0.0):.1f}" for label in labels) + " |")
    return "\n".join(lines)


COLUMNS = [("model", "model", "{}"), ("norm", "norm", "{}"), ("m", "m", "{}"),
           ("k", "K", "{}"),
           ("single_ms", "one trial ms/step", "{:.1f}"),
           ("packed_ms", "pack of K ms/step", "{:.1f}"),
           ("grouped_ms", "grouped pack ms/step", "{:.1f}"),
           ("worker_ms", "each worker ms/step", "{:.1f}"),
           ("single_trials_per_hour", "trials/h one at a time", "{:.3g}"),
           ("packed_trials_per_hour", "trials/h packed", "{:.3g}"),
           ("grouped_trials_per_hour", "trials/h grouped", "{:.3g}"),
           ("workers_trials_per_hour", "trials/h workers", "{:.3g}"),
           ("packed_speedup", "packed × one at a time", "{:.2f}"),
           ("grouped_speedup", "grouped × one at a time", "{:.2f}"),
           ("workers_speedup", "workers × one at a time", "{:.2f}"),
           ("single_limit_fraction", "one trial % of limit", "{:.0%}"),
           ("packed_limit_fraction", "pack % of limit", "{:.0%}"),
           ("grouped_limit_fraction", "grouped % of limit", "{:.0%}")]


def _format_row(row):
    return "  ".join(f"{title}={fmt.format(row[key])}" for key, title, fmt in COLUMNS
                     if key in row)


def markdown(rows, device):
    keys = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    workers = next((r["workers"] for r in rows if "workers" in r), 0)
    lines = [machine.line(device, device["matmul_peak_gflops"]),
             f"TF {device['tensorflow']}, Keras {device['keras']}; median of "
             f"{device['repeats']} blocks of {device['steps']} steps, one at a time, "
             f"packed and grouped interleaved; workers = {workers} processes at once; "
             f"trials/h of a {device['trial_epochs']}-epoch trial over {device['trial_examples']} "
             f"examples; jit_compile={device['jit_compile']}; TF threads inter-op "
             f"{device.get('inter_op_threads') or 'default'}, intra-op "
             f"{device.get('intra_op_threads') or 'default'}.", "",
             "| " + " | ".join(t for _, t, _ in keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "—" for k, _, f in keys)
                     + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.inter_op_threads:
        bench.tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    if FLAGS.intra_op_threads:
        bench.tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    if FLAGS.worker_dir:
        return worker_main(FLAGS.worker_dir)
    rows, device = run(FLAGS.model, FLAGS.norm, [int(m) for m in FLAGS.batch_sizes],
                       FLAGS.pack, FLAGS.workers, FLAGS.steps, FLAGS.repeats,
                       FLAGS.jit_compile, FLAGS.trial_epochs, FLAGS.trial_examples,
                       worker_args=(f"--inter_op_threads={FLAGS.inter_op_threads}",
                                    f"--intra_op_threads={FLAGS.intra_op_threads}"))
    device.update(inter_op_threads=FLAGS.inter_op_threads,
                  intra_op_threads=FLAGS.intra_op_threads)
    text = markdown(rows, device)
    if FLAGS.formulations:
        table = {m: conv_formulations(FLAGS.pack, int(m)) for m in FLAGS.batch_sizes}
        text += "\n\n" + formulations_markdown(FLAGS.pack, table)
    for m in map(int, FLAGS.breakdown):
        table = breakdown(FLAGS.model, FLAGS.norm, m, FLAGS.pack, FLAGS.steps,
                          FLAGS.jit_compile)
        text += "\n\n" + breakdown_markdown(FLAGS.model, FLAGS.norm, m, FLAGS.pack, table)
    bench.write_report(FLAGS.out, "bench_pack", text, device, rows)


if __name__ == "__main__":
    define_flags()
    app.run(main)
