"""Training throughput of the real sbt_keras train step, side by side with its peers.

    make bench                                   # ResNet-20 + BN, m = 2, 8, 32, 128, 512
    python -m tools.bench --models=resnet8,resnet20,resnet32,alexnet_reduced \\
        --norms=none,batch --batch_sizes=2,8,32 --out=runs/bench

For every (model, norm, m), in one process on whatever device is present:
  sbt      SummedGradientModel.fit on in-memory synthetic data, with the run defaults
  sbt fed  the same compiled step fed by the run's augmenting input pipeline (shuffle,
           pad-and-crop, flip, standardize) instead: the real-input step time
  fit      the same network with stock compile/fit and keras.optimizers.SGD (the naive
           baseline: steps_per_execution=1, jit_compile="auto")
  torch    an equivalent PyTorch loop (ResNets only; when torch is installed)
  limit    training FLOPs per example x sbt examples/s, as a fraction of the device's
           measured float32 matmul peak
With --progress, also the same step with the run's progress callback (log lines, tqdm bar)
and the callback's own cost per call; --cost_table=MODEL:NORM,... instead times those pairs
interleaved per m and prints sbt_keras/cost.py's step-time table.
Each number is the median of --repeats timed blocks of --steps steps, after a warm-up block
(tracing and compilation excluded). The contenders take turns, one block each per round, so
a slow spell of a shared machine hits them alike and the ratios stay comparable. Also: the input pipeline's examples/s with augmentation,
and host / device memory after each measurement. Writes bench.md and bench.json to --out.
"""
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from sbt_keras import memory, models, norms, results  # noqa: E402
from sbt_keras.data import Arrays, pipeline  # noqa: E402
from sbt_keras.training.summed_sgd import SummedGradientModel, build_optimizer  # noqa: E402
from tools import machine  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list("models", ["resnet20"], "Models to time.")
    flags.DEFINE_list("norms", ["batch"], f"Norms to time ({', '.join(norms.NORM_NAMES)}); "
                      f"PyTorch has a twin of none and batch only.")
    flags.DEFINE_list("batch_sizes", ["2", "8", "32", "128", "512"], "Batch sizes m.")
    flags.DEFINE_integer("bn_batch_size", 0, "Sub-batch BN group size (0 = whole batch).")
    flags.DEFINE_integer("steps", 20, "Steps per timed block.")
    flags.DEFINE_integer("repeats", 3, "Timed blocks; the median is reported.")
    flags.DEFINE_integer("steps_per_execution", 0, "sbt steps per graph call (0 = --steps).")
    flags.DEFINE_integer("unrolled_steps", 1, "sbt steps per loop iteration (run default 1).",
                         lower_bound=1)
    flags.DEFINE_boolean("jit_compile", False, "Compile the sbt step with XLA.")
    flags.DEFINE_list("baselines", ["fit", "torch"], "Peers to time beside sbt.")
    flags.DEFINE_boolean("input_pipeline", True, "Also time the augmenting input pipeline.")
    flags.DEFINE_integer("sharpness_sample", 0, "Also time one loss-and-gradient evaluation "
                         "of the sharpness measurement over this many examples per model "
                         "(0: no), outside any training loop, and its bound per epsilon.")
    flags.DEFINE_boolean("gradient_noise", False, "Also time the step that measures the "
                         "gradient noise (--gns_every_steps) once per block of --steps, where "
                         "the batch's halves keep the BN groups whole (--bn_batch_size).")
    flags.DEFINE_boolean("progress", False, "Also time the sbt step with the run's progress "
                         "callback (training/progress.py): its log-line mode and its tqdm bar "
                         "(drawn to /dev/null), interleaved with the plain step.")
    flags.DEFINE_string("out", "runs/bench", "Where bench.md and bench.json go.")
    flags.DEFINE_list("cost_table", [], "Instead: the step-time table of sbt_keras/cost.py "
                      "for these MODEL:NORM pairs (e.g. resnet8:none,resnet20:batch), all "
                      "pairs of one m interleaved, so their ratios hold on a busy machine.")


# ---------------------------------------------------------------------- measurements
class _BlockTimer(keras.callbacks.Callback):
    """Seconds per epoch; each epoch is one timed block (the first one is the warm-up)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def _data(m, shape, classes=10):
    rng = np.random.RandomState(0)
    x = tf.constant(rng.randn(m, *shape).astype(np.float32))
    y = tf.constant(rng.randint(0, classes, m).astype(np.int32))
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _fit_block(model, m, shape, steps, data=None, callbacks=()):
    """A function that fits `steps` steps and returns the seconds per step (fit's own
    set-up excluded: the timer runs from epoch begin to epoch end). `data` defaults to one
    in-memory batch repeated; `callbacks` run beside the timer."""
    data, timer = data or _data(m, shape), _BlockTimer()

    def block():
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
                  callbacks=[timer, *callbacks])
        return timer.seconds[-1] / steps

    return block


def interleaved(blocks, repeats):
    """{name: median seconds per step}. After one warm-up block each, every round times
    each contender once in turn, so a slow spell of the machine hits all of them alike."""
    for block in blocks.values():
        block()
    times = {name: [] for name in blocks}
    for _ in range(repeats):
        for name, block in blocks.items():
            times[name].append(block())
    return {name: statistics.median(t) for name, t in times.items()}


def _network(name, norm, m, bn_batch_size, shape, trials=1):
    """The timed network; `trials` > 1: the fused network of that many packed trials."""
    keras.utils.set_random_seed(0)
    options = {"gn_groups": models.spec(name).gn_groups}
    if norms.uses_batch_statistics(norm):
        options["bn_batch_size"] = bn_batch_size or m
    return models.build(name, input_shape=shape, num_classes=10, norm=norm, trials=trials,
                        **options)


def progress_blocks(model, m, shape, steps):
    """{name: block}: the same compiled step with the run's progress callback, writing its
    lines (every 30 s, as in a log) or drawing its tqdm bar (to /dev/null)."""
    from sbt_keras.training.progress import RunProgress

    lines = RunProgress(steps_per_epoch=steps, epochs=1, every_seconds=30.0,
                        log=lambda line: None)
    bar = RunProgress(steps_per_epoch=steps, epochs=1, bar=True,
                      file=open(os.devnull, "w"))  # noqa: SIM115 - open for the process
    return {"sbt_progress": _fit_block(model, m, shape, steps, callbacks=[lines]),
            "sbt_bar": _fit_block(model, m, shape, steps, callbacks=[bar])}


def progress_hook_microseconds(calls=20000):
    """{mode: µs} one call of the progress callback's batch hook costs on the host, for its
    log-line mode and its tqdm bar (drawn to /dev/null): what it adds per block of
    steps_per_execution steps, free of the step-time noise of a shared machine."""
    from sbt_keras.training.progress import RunProgress

    out = {}
    for mode, options in (("lines", dict(every_seconds=30.0, log=lambda line: None)),
                          ("bar", dict(bar=True, file=open(os.devnull, "w")))):  # noqa: SIM115
        callback = RunProgress(steps_per_epoch=calls, epochs=1, **options)
        callback.set_params({"steps": calls})
        callback.on_epoch_begin(0)
        start = time.perf_counter()
        for batch in range(calls - 1):
            callback.on_train_batch_end(batch)
        out[mode] = (time.perf_counter() - start) / (calls - 1) * 1e6
        callback.on_train_end()
    return out


def sbt_block(name, norm, m, shape, bn_batch_size, steps, spe, jit, unrolled=1,
              input_pipeline=False, gns_every_steps=0, progress=None):
    """(block on in-memory data, block fed by the augmenting input pipeline or None, net):
    the same compiled model for both. `gns_every_steps` > 0 measures the gradient noise
    (one device: the batch's halves) on the last step of every block of that many steps;
    `progress`: a dict that receives progress_blocks of that model."""
    net = _network(name, norm, m, bn_batch_size, shape)
    model = SummedGradientModel(
        net, models.spec(name).weight_decay, models.decayed_variables(net),
        unrolled_steps=unrolled, gns_every_steps=gns_every_steps,
        gns_bn_batch_size=(bn_batch_size or m) if norms.uses_batch_statistics(norm) else None)
    model.compile(optimizer=build_optimizer(2.0 ** -8), steps_per_execution=spe or steps,
                  jit_compile=jit)
    fed = (_fit_block(model, m, shape, steps, data=_pipeline_dataset(m, shape))
           if input_pipeline else None)
    if progress is not None:
        progress.update(progress_blocks(model, m, shape, steps))
    return _fit_block(model, m, shape, steps), fed, net


def _splits(norm, m, bn_batch_size):
    """Whether the batch's halves keep every BN group whole (the one-device noise source)."""
    group = (bn_batch_size or m) if norms.uses_batch_statistics(norm) else None
    return m % 2 == 0 and (group is None or (m // 2) % group == 0)


def stock_fit_block(name, norm, m, shape, steps):
    net = _network(name, norm, m, 0, shape)
    net.compile(optimizer=keras.optimizers.SGD(m * 2.0 ** -8),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    return _fit_block(net, m, shape, steps)


def torch_block(name, norm, m, shape, steps):
    """None when torch is not installed or the model has no PyTorch twin."""
    if not name.startswith("resnet") or name == "resnet50" or norm not in ("none", "batch"):
        return None
    try:
        import torch
        from tools import torch_baseline
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    depth = int(name[len("resnet"):])
    return torch_baseline.timed_block(depth, norm == "batch", m, steps, image_size=shape[0])


def training_flops_per_example(net):
    """2 FLOPs per multiply-add, forward MACs from the layer shapes, training = 3x forward."""
    macs = 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            macs += h * w * kh * kw * layer.input.shape[-1] * c_out
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 3 * 2 * macs


def matmul_peak_flops(n=2048, repeats=5):
    """The device's float32 matmul rate: the arithmetic limit the model is measured against."""
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    matmul(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def _pipeline_dataset(m, shape, batches=50):
    """The run's augmenting tf.data pipeline (pipeline.train_dataset: shuffle, pad-and-crop,
    flip, standardize) over CIFAR-sized uint8 images held in memory."""
    n = max(m * batches, 5000)
    rng = np.random.RandomState(0)
    arrays = Arrays(rng.randint(0, 256, (n, *shape)).astype(np.uint8),
                    rng.randint(0, 10, n).astype(np.int32))
    return pipeline.train_dataset(arrays, batch_size=m, seed=0, epochs=100, augment=True,
                                  mean=np.zeros(3, np.float32), std=np.ones(3, np.float32))


def pipeline_examples_per_second(m, shape, batches=50):
    """Examples/s the augmenting input pipeline delivers on its own."""
    iterator = iter(_pipeline_dataset(m, shape, batches))
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * m / (time.perf_counter() - start)


def _memory():
    out = {"host_rss_mb": psutil.Process().memory_info().rss / 2 ** 20}
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        out["device_peak_mb"] = tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2 ** 20
        tf.config.experimental.reset_memory_stats(gpus[0].name)
    return out


def sharpness_costs(model_names, sample, shape=(32, 32, 3), repeats=3):
    """Per model: the seconds of one loss-and-gradient evaluation of the flat training loss
    over `sample` examples (inference-mode BN, as sbt_keras.sharpness measures it), and the
    bound of one epsilon's search (default L-BFGS-B budget) in seconds."""
    from sbt_keras import flat_loss, sharpness

    rows = []
    for name in model_names:
        net = _network(name, "batch", 8, 0, shape)
        rng = np.random.default_rng(0)
        images = rng.normal(size=(sample, *shape)).astype(np.float32)
        labels = rng.integers(0, 10, sample)
        with flat_loss.FlatLoss(net, images, labels) as loss:
            loss.value_and_grad(loss.x0)  # trace
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                loss.value_and_grad(loss.x0)
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        evaluations = sharpness.default_max_evaluations(sharpness.DEFAULT_MAXITER)
        rows.append({"model": name, "params": loss.size, "sample": sample,
                     "eval_s": seconds, "search_bound_s": seconds * evaluations,
                     "evaluations": evaluations})
    return rows


def sharpness_markdown(rows):
    lines = ["| model | parameters | N | s per loss+gradient | s per epsilon, at most "
             "(evaluations) |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['sample']} | {r['eval_s']:.2f} | "
              f"{r['search_bound_s']:.0f} ({r['evaluations']}) |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- report
def run(model_names, norms, batch_sizes, *, bn_batch_size=0, steps=20, repeats=3, spe=0,
        jit=False, unrolled=1, baselines=("fit", "torch"), input_pipeline=True,
        shape=(32, 32, 3), gns=0, progress=False):
    """All measurements as a list of dict rows, plus the device description."""
    peak = matmul_peak_flops()
    rows = []
    for name in model_names:
        for norm in norms:
            for m in batch_sizes:
                blocks, extra = {}, ({} if progress else None)
                blocks["sbt"], fed, net = sbt_block(name, norm, m, shape, bn_batch_size,
                                                    steps, spe, jit, unrolled, input_pipeline,
                                                    progress=extra)
                blocks.update(extra or {})
                if fed is not None:  # the same step, fed by the real input pipeline
                    blocks["sbt_fed"] = fed
                if gns and _splits(norm, m, bn_batch_size):  # the step measuring the noise
                    blocks["sbt_gns"] = sbt_block(name, norm, m, shape, bn_batch_size, steps,
                                                  spe, jit, unrolled, gns_every_steps=gns)[0]
                if "fit" in baselines:
                    blocks["fit"] = stock_fit_block(name, norm, m, shape, steps)
                if "torch" in baselines:
                    block = torch_block(name, norm, m, shape, steps)
                    if block is not None:
                        blocks["torch"] = block
                seconds = interleaved(blocks, repeats)
                sbt = seconds["sbt"]
                row = {"model": name, "norm": norm, "m": m, "sbt_ms": sbt * 1e3,
                       "sbt_examples_per_s": m / sbt}
                # The arithmetic limit: the step time if every FLOP ran at the matmul peak.
                ideal = training_flops_per_example(net) * m / peak
                row["limit_fraction"] = ideal / sbt
                row["overhead_us"] = (sbt - ideal) * 1e6  # the step time above that limit
                # Activations + variables + gradients one step must hold (memory.py's floor):
                # what makes small batches cheap in memory.
                row["activation_mb"] = memory.training_bytes(net, m) / 2 ** 20
                if "fit" in seconds:
                    row.update(fit_ms=seconds["fit"] * 1e3, speedup_vs_fit=seconds["fit"] / sbt,
                               fit_limit_fraction=ideal / seconds["fit"])
                if "sbt_progress" in seconds:  # the progress callback's cost per step
                    row.update(progress_ms=seconds["sbt_progress"] * 1e3,
                               progress_overhead=seconds["sbt_progress"] / sbt - 1,
                               bar_ms=seconds["sbt_bar"] * 1e3,
                               bar_overhead=seconds["sbt_bar"] / sbt - 1)
                if "torch" in seconds:
                    row.update(torch_ms=seconds["torch"] * 1e3,
                               speedup_vs_torch=seconds["torch"] / sbt)
                if input_pipeline:
                    rate = pipeline_examples_per_second(m, shape)
                    row.update(pipeline_examples_per_s=rate,
                               pipeline_vs_step=rate / row["sbt_examples_per_s"],
                               sbt_fed_ms=seconds["sbt_fed"] * 1e3)
                if "sbt_gns" in seconds:
                    row["gns_ms"] = seconds["sbt_gns"] * 1e3
                row.update(_memory())
                rows.append(row)
                print(_format_row(row), flush=True)
    device = {**machine.describe(), "platform": platform.platform(), "cpus": os.cpu_count(),
              "gpus": [d.name for d in tf.config.list_logical_devices("GPU")],
              "matmul_peak_gflops": peak / 1e9, "tensorflow": tf.__version__,
              "keras": keras.__version__, "steps": steps, "repeats": repeats,
              "steps_per_execution": spe or steps, "unrolled_steps": unrolled,
              "jit_compile": jit}
    if progress:
        device["progress_hook_us"] = progress_hook_microseconds()
    return rows, device


COLUMNS = [("model", "model", "{}"), ("norm", "norm", "{}"), ("m", "m", "{}"),
           ("sbt_ms", "sbt ms/step", "{:.2f}"), ("sbt_examples_per_s", "sbt ex/s", "{:.0f}"),
           ("sbt_fed_ms", "sbt ms/step, real input pipeline", "{:.2f}"),
           ("gns_ms", "sbt ms/step, noise every block", "{:.2f}"),
           ("progress_ms", "with progress lines ms/step", "{:.2f}"),
           ("progress_overhead", "progress lines cost", "{:+.1%}"),
           ("bar_ms", "with progress bar ms/step", "{:.2f}"),
           ("bar_overhead", "progress bar cost", "{:+.1%}"),
           ("fit_ms", "fit ms/step", "{:.2f}"), ("speedup_vs_fit", "× fit", "{:.2f}"),
           ("torch_ms", "torch ms/step", "{:.2f}"), ("speedup_vs_torch", "× torch", "{:.2f}"),
           ("limit_fraction", "% of limit", "{:.1%}"),
           ("fit_limit_fraction", "fit % of limit", "{:.1%}"),
           ("overhead_us", "µs/step above limit", "{:.0f}"),
           ("activation_mb", "step memory MB (floor)", "{:.1f}"),
           ("pipeline_vs_step", "pipeline ÷ step", "{:.1f}"),
           ("host_rss_mb", "host MB", "{:.0f}"), ("device_peak_mb", "device MB", "{:.0f}")]


def _format_row(row):
    return "  ".join(f"{title}={fmt.format(row[key])}" for key, title, fmt in COLUMNS
                     if key in row)


def markdown(rows, device):
    keys = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = [f"Device: {device['cpus']} CPUs, GPUs {device['gpus'] or 'none'}, float32 matmul "
             f"peak {device['matmul_peak_gflops']:.0f} GFLOP/s; TF {device['tensorflow']}, "
             f"Keras {device['keras']}; median of {device['repeats']} blocks of "
             f"{device['steps']} steps; sbt steps_per_execution={device['steps_per_execution']}"
             f", unrolled_steps={device['unrolled_steps']}, jit_compile={device['jit_compile']}."
             + (" Progress callback's batch hook: {lines:.1f} µs a call (log lines), "
                "{bar:.1f} µs (tqdm bar), once per steps_per_execution block.".format(
                    **device["progress_hook_us"]) if "progress_hook_us" in device else ""),
             machine.line(device, device["matmul_peak_gflops"]),
             "",
             "| " + " | ".join(t for _, t, _ in keys) + " |",
             "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "—" for k, _, f in keys)
                     + " |")
    return "\n".join(lines)


def cost_table(pairs, batch_sizes, steps=10, repeats=3, shape=(32, 32, 3)):
    """{(model, norm): {m: ms per step}} of the sbt step (run defaults, in-memory data),
    the pairs of each m timed in turn, block by block (see `interleaved`)."""
    table = {pair: {} for pair in pairs}
    for m in batch_sizes:
        blocks = {pair: sbt_block(*pair, m, shape, 0, steps, 0, False)[0] for pair in pairs}
        for pair, seconds in interleaved(blocks, repeats).items():
            table[pair][m] = seconds * 1e3
            print(f"{pair[0]}:{pair[1]}  m={m}  {seconds * 1e3:.2f} ms/step", flush=True)
    return table


def main(argv):
    del argv
    if FLAGS.cost_table:
        pairs = [tuple(item.split(":")) for item in FLAGS.cost_table]
        table = cost_table(pairs, [int(m) for m in FLAGS.batch_sizes], FLAGS.steps,
                           FLAGS.repeats)
        text = "DOCUMENTED_STEP_MS = {\n" + "".join(
            f"    {pair!r}: {{{', '.join(f'{m}: {ms:.1f}' for m, ms in row.items())}}},\n"
            for pair, row in table.items()) + "}"
        results.write_text_atomic(os.path.join(FLAGS.out, "cost_table.py"), text + "\n")
        print(text)
        return
    unknown = sorted(set(FLAGS.norms) - set(norms.NORM_NAMES))
    if unknown:
        raise app.UsageError(f"--norms: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(norms.NORM_NAMES)}")
    rows, device = run(FLAGS.models, FLAGS.norms, [int(m) for m in FLAGS.batch_sizes],
                       bn_batch_size=FLAGS.bn_batch_size, steps=FLAGS.steps,
                       repeats=FLAGS.repeats, spe=FLAGS.steps_per_execution,
                       jit=FLAGS.jit_compile, unrolled=FLAGS.unrolled_steps,
                       baselines=FLAGS.baselines,
                       input_pipeline=FLAGS.input_pipeline,
                       gns=FLAGS.steps if FLAGS.gradient_noise else 0, progress=FLAGS.progress)
    text = markdown(rows, device)
    if FLAGS.sharpness_sample:
        text += "\n\n" + sharpness_markdown(sharpness_costs(FLAGS.models,
                                                               FLAGS.sharpness_sample))
    write_report(FLAGS.out, "bench", text, device, rows)


def write_report(out, name, text, device, rows):
    """`out`/NAME.md (the table) and NAME.json (device and rows), atomically; prints the
    table."""
    results.write_text_atomic(os.path.join(out, f"{name}.md"), text + "\n")
    results.write_text_atomic(os.path.join(out, f"{name}.json"),
                              json.dumps({"device": device, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
