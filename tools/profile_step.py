"""Where the time of one ResNet training step goes, op class by op class, in TF and PyTorch.

    make profile                                   # ResNet-20 + BN, m = 32, and the knobs
    python -m tools.profile_step --m=32 --repeats=3 --out=runs/profile
    python -m tools.profile_step --knobs=default,onednn_off,xla --m=32   # only the knobs

TF: the sbt train step (SummedGradientModel.fit, run defaults, in-memory data: forward,
backward, weight decay, SGD update) traced with tf.profiler; its XSpace (the .xplane.pb the
trace viewer reads) is parsed here and every kernel event ("node:OpType") summed into an op
class. PyTorch: the same network and summed-loss SGD step (tools/torch_baseline.py) under
torch.profiler, each aten op's self time summed the same way. The wall ms/step of each is
timed without a profiler. TF's ops may overlap on inter-op threads, so the op times can sum
to more than the wall time; the last row says how much of the wall time no op accounts for
(framework, scheduling, idle threads; negative where ops overlapped).

--knobs: the TF step's wall ms/step under each of TF's settings in KNOBS, every setting in
its own process (environment variables act at import), the settings taking turns for
--rounds rounds so a busy spell of the machine hits them alike.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS

CLASSES = ("conv fwd", "conv input-grad", "conv filter-grad", "conv bwd (input+filter)",
           "BN fwd", "BN bwd", "relu", "add", "pad/slice", "matmul", "update", "other ops")
# TF settings to try: name -> (environment, tools.profile_step flags).
KNOBS = {
    "default": ({}, []),
    "onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, []),
    "inter_op_1": ({}, ["--inter_op_threads=1"]),
    "intra_op_1": ({}, ["--intra_op_threads=1"]),
    "xla": ({}, ["--jit_compile"]),
    "spe_1": ({}, ["--steps_per_execution=1"]),
    "remapper_off": ({}, ["--grappler_off=remapping"]),
    "layout_off": ({}, ["--grappler_off=layout_optimizer"]),
    "channels_first": ({}, ["--channels_first"]),
    "bf16": ({}, ["--dtype_policy=mixed_bfloat16"]),
}


def define_flags():
    flags.DEFINE_string("model", "resnet20", "A CIFAR ResNet with a PyTorch twin.")
    flags.DEFINE_integer("m", 32, "Batch size.")
    flags.DEFINE_integer("steps", 10, "Steps per timed or profiled block.")
    flags.DEFINE_integer("repeats", 3, "Rounds of (TF wall, PyTorch wall, TF profile, "
                         "PyTorch profile); medians are reported.")
    flags.DEFINE_integer("threads", 0, "Threads for both frameworks (TF intra- and inter-op, "
                         "torch.set_num_threads); 0: each framework's default (all cores). "
                         "1 compares the kernels alone, which a busy machine disturbs less.")
    flags.DEFINE_list("knobs", [], f"Time the TF step under these settings instead "
                      f"({', '.join(KNOBS)}); 'all' for every one.")
    flags.DEFINE_boolean("shortcut", False, "Instead: time the option-A shortcut (stride-2 "
                         "subsample + zero channels, forward and gradient) as written in "
                         "models/resnet_cifar.py vs as one 1x1 stride-2 convolution with a "
                         "constant [I | 0] kernel (the same numbers), at --m.")
    flags.DEFINE_list("knob_batch_sizes", [], "m for --knobs (default: --m).")
    flags.DEFINE_integer("rounds", 2, "Rounds of --knobs.")
    flags.DEFINE_string("out", "runs/profile", "Where profile.md and .json go.")
    # One knob process's settings (see KNOBS).
    flags.DEFINE_integer("inter_op_threads", 0, "TF inter-op threads (0: default).")
    flags.DEFINE_integer("intra_op_threads", 0, "TF intra-op threads (0: default).")
    flags.DEFINE_boolean("jit_compile", False, "XLA-compile the sbt step.")
    flags.DEFINE_integer("steps_per_execution", 0, "Steps per graph call (0: --steps).")
    flags.DEFINE_list("grappler_off", [], "tf.config.optimizer options to switch off.")
    flags.DEFINE_boolean("channels_first", False, "Build the network NCHW.")
    flags.DEFINE_string("dtype_policy", "", "Keras dtype policy (e.g. mixed_bfloat16).")
    flags.DEFINE_boolean("time_only", False, "(internal) print this process's TF ms/step "
                         "as JSON and exit.")


# ---------------------------------------------------------------------- op classes
def tf_class(event):
    """Op class of a TF kernel event 'scope/name:OpType'; None for non-kernel events."""
    if ":" not in event or "::" in event or " " in event:
        return None
    scope, op = event.rsplit(":", 1)
    backward = "gradient_tape" in scope
    if "Conv2DBackpropInput" in op:
        return "conv input-grad"
    if "Conv2DBackpropFilter" in op:
        return "conv filter-grad"
    if "Conv2D" in op:
        return "conv fwd"
    # BN kernels, and the elementwise ops of a norm layer's scope (moving averages, their
    # gradients): layers are named *_norm in sbt_keras.models.
    if "BatchNorm" in op or re.search(r"_norm(_\d+)?/", scope):
        return "BN bwd" if backward or "Grad" in op else "BN fwd"
    if op in ("Relu", "ReluGrad"):
        return "relu"
    if op in ("Pad", "PadV2", "Slice", "StridedSlice", "StridedSliceGrad"):
        return "pad/slice"
    if "MatMul" in op:
        return "matmul"
    if "/sgd/" in scope or op.startswith("ResourceApply") or op == "AssignSubVariableOp":
        return "update"
    if op in ("AddV2", "Add", "AddN"):
        return "add"
    return "other ops"


def torch_class(name):
    """Op class of a torch.profiler event name (aten ops, autograd nodes, record ranges)."""
    key = name.lower().replace("_", "")
    if "convolutionbackward" in key:
        return "conv bwd (input+filter)"
    if "convolution" in key or "conv2d" in key:
        return "conv fwd"
    if "batchnorm" in key:
        return "BN bwd" if "backward" in key else "BN fwd"
    if "relu" in key or "thresholdbackward" in key or "clampmin" in key:
        return "relu"
    # The SGD step (the for-loop kind on CPU) is one in-place add_ per parameter.
    if "foreach" in key or "optimizer" in key or name == "aten::add_":
        return "update"
    if "pad" in key or "slice" in key or "narrow" in key:
        return "pad/slice"
    if name.endswith(("::mm", "::addmm", "::linear", "::matmul")):
        return "matmul"
    if name == "aten::add":
        return "add"
    return "other ops"


def summed(pairs):
    """{class: total} of [(class or None, amount)], Nones dropped."""
    out = {}
    for cls, amount in pairs:
        if cls is not None:
            out[cls] = out.get(cls, 0.0) + amount
    return out


def xspace_events(path):
    """[(event name, ms)] of every event on the host plane's threads in an .xplane.pb."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        for line in plane.lines:
            events.extend((plane.event_metadata[e.metadata_id].name, e.duration_ps / 1e9)
                          for e in line.events)
    return events


# ---------------------------------------------------------------------- TF
def _tf_setup():
    """Applies this process's knob flags; returns the tf module."""
    import tensorflow as tf

    if FLAGS.threads:
        FLAGS.inter_op_threads = FLAGS.intra_op_threads = FLAGS.threads
    if FLAGS.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    if FLAGS.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    if FLAGS.grappler_off:
        tf.config.optimizer.set_experimental_options({k: False for k in FLAGS.grappler_off})
    import keras
    if FLAGS.channels_first:
        keras.config.set_image_data_format("channels_first")
    if FLAGS.dtype_policy:
        keras.mixed_precision.set_global_policy(FLAGS.dtype_policy)
    return tf


def tf_block(name, m, steps):
    from tools import bench
    from sbt_keras import models
    from sbt_keras.training.summed_sgd import SummedGradientModel, build_optimizer

    shape = (3, 32, 32) if FLAGS.channels_first else (32, 32, 3)
    net = bench._network(name, "batch", m, 0, shape)
    model = SummedGradientModel(net, models.spec(name).weight_decay,
                                models.decayed_variables(net))
    model.compile(optimizer=build_optimizer(2.0 ** -8),
                  steps_per_execution=FLAGS.steps_per_execution or steps,
                  jit_compile=FLAGS.jit_compile)
    return bench._fit_block(model, m, shape, steps)


def tf_profiled(block, steps=None):
    """{class: ms per step} of one profiled block of `steps` steps (default --steps)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        block()
        tf.profiler.experimental.stop()
        path = next(os.path.join(d, f) for d, _, files in os.walk(logdir) for f in files
                    if f.endswith(".xplane.pb"))
        events = xspace_events(path)
    steps = steps or FLAGS.steps
    return {k: v / steps for k, v in summed((tf_class(n), ms) for n, ms in events).items()}


# ---------------------------------------------------------------------- PyTorch
def torch_blocks(name, m, steps):
    """(timed block, profiled block) of the PyTorch twin."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tools import torch_baseline

    torch.set_num_threads(FLAGS.threads or os.cpu_count())
    block = torch_baseline.timed_block(int(name[len("resnet"):]), True, m, steps)

    def profiled():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            block()
        pairs = [(torch_class(e.key), e.self_cpu_time_total / 1e3 / steps)
                 for e in prof.key_averages()]
        return summed(pairs)

    return block, profiled


# ---------------------------------------------------------------------- the table
def profile(name, m, steps, repeats):
    """{"tf"/"torch": {"wall": ms, class: ms}}, medians over interleaved rounds."""
    tf_wall = tf_block(name, m, steps)
    torch_wall, torch_prof = torch_blocks(name, m, steps)
    tf_wall(), torch_wall()  # warm-up: tracing, allocator
    rounds = {"tf": [], "torch": []}
    for _ in range(repeats):
        t, p = tf_wall() * 1e3, torch_wall() * 1e3
        rounds["tf"].append({"wall": t, **tf_profiled(tf_wall)})
        rounds["torch"].append({"wall": p, **torch_prof()})
        print(f"TF {t:.1f} ms/step, PyTorch {p:.1f} ms/step, load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    return {fw: {k: statistics.median(r.get(k, 0.0) for r in rs)
                 for k in set().union(*rs)} for fw, rs in rounds.items()}


def markdown(result, meta):
    tf_, pt = result["tf"], result["torch"]
    lines = [meta["machine"],
             f"{meta['model']} + BN, m = {meta['m']}, {meta['date']}, load average "
             f"{meta['load']}; TF {meta['tf']}, PyTorch {meta['torch']}; median of "
             f"{meta['repeats']} interleaved rounds of {meta['steps']} steps; threads: "
             f"{meta['threads'] or 'each framework default'}. Op times are "
             f"ms per step under the profiler; wall times without it.", "",
             "| op class | TF ms | TF % of ops | PyTorch ms | PyTorch % of ops "
             "| TF − PyTorch ms |",
             "|---|---|---|---|---|---|"]
    tf_ops = sum(v for k, v in tf_.items() if k != "wall")
    pt_ops = sum(v for k, v in pt.items() if k != "wall")
    for cls in CLASSES:
        a, b = tf_.get(cls, 0.0), pt.get(cls, 0.0)
        if a or b:
            lines.append(f"| {cls} | {a:.2f} | {a / tf_ops:.0%} | {b:.2f} | {b / pt_ops:.0%} "
                         f"| {a - b:+.2f} |")
    lines += [f"| all ops | {tf_ops:.2f} | 100% | {pt_ops:.2f} | 100% | {tf_ops - pt_ops:+.2f} |",
              f"| wall, no profiler | {tf_['wall']:.2f} | | {pt['wall']:.2f} | | "
              f"{tf_['wall'] - pt['wall']:+.2f} |",
              f"| wall − all ops | {tf_['wall'] - tf_ops:+.2f} | | {pt['wall'] - pt_ops:+.2f} "
              f"| | |"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- shortcut
def shortcut_formulations(m, size=32, cin=16, cout=32, steps=50, repeats=5):
    """{name: ms} of the option-A shortcut's forward + input gradient, NHWC float32."""
    import numpy as np
    import tensorflow as tf

    from tools import bench
    from sbt_keras.models import resnet_cifar

    x = tf.constant(np.random.RandomState(0).randn(m, size, size, cin).astype(np.float32))
    extra = cout - cin
    kernel = np.zeros((1, 1, cin, cout), np.float32)  # [I | 0]: channel c -> c + extra // 2
    kernel[0, 0, np.arange(cin), np.arange(cin) + extra // 2] = 1.0
    kernel = tf.constant(kernel)
    forms = {"slice + pad": lambda t: resnet_cifar._shortcut_a(t, cout),
             "1x1 stride-2 conv": lambda t: tf.nn.conv2d(t, kernel, 2, "VALID")}
    blocks = {}
    for name, form in forms.items():
        @tf.function
        def step(t, form=form):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = form(t)
            return y, tape.gradient(y, t, output_gradients=tf.ones_like(y))

        a, b = forms["slice + pad"](x), form(x)
        assert np.array_equal(a.numpy(), b.numpy()), name  # the same numbers

        def block(step=step):
            import time
            start = time.perf_counter()
            for _ in range(steps):
                step(x)
            return (time.perf_counter() - start) / steps

        blocks[name] = block
    return {k: v * 1e3 for k, v in bench.interleaved(blocks, repeats).items()}


# ---------------------------------------------------------------------- knobs
def knob_times(names, batch_sizes, rounds, steps):
    """{(knob, m): [ms per step per round]}: each knob in its own process, in turns."""
    times = {}
    for _ in range(rounds):
        for m in batch_sizes:
            for name in names:
                env, args = KNOBS[name]
                cmd = [sys.executable, "-m", "tools.profile_step", "--time_only",
                       f"--m={m}", f"--steps={steps}", f"--model={FLAGS.model}", *args]
                proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True,
                                      text=True, timeout=900)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
                ms = json.loads(lines[-1])["ms"] if proc.returncode == 0 and lines else None
                why = None if ms else (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
                times.setdefault((name, m), []).append(ms if ms else why)
                print(f"{name} m={m}: {ms if ms else why}  load {os.getloadavg()[0]:.1f}",
                      flush=True)
    return times


def knobs_markdown(times, names, batch_sizes):
    lines = ["| setting | " + " | ".join(f"m = {m} ms/step (× default)" for m in batch_sizes)
             + " |", "|---|" + "---|" * len(batch_sizes)]
    for name in names:
        cells = []
        for m in batch_sizes:
            runs = times[(name, m)]
            ok = [t for t in runs if isinstance(t, float)]
            base = [t for t in times[("default", m)] if isinstance(t, float)]
            if not ok:
                cells.append(f"fails: {runs[0]}")
            elif base:
                cells.append(f"{statistics.median(ok):.1f} "
                             f"({statistics.median(ok) / statistics.median(base):.2f})")
            else:
                cells.append(f"{statistics.median(ok):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _meta(repeats):
    import time

    import tensorflow as tf
    import torch

    from tools import bench, machine
    return {"machine": machine.line(machine.describe(), bench.matmul_peak_flops() / 1e9),
            "model": FLAGS.model, "m": FLAGS.m, "threads": FLAGS.threads,
            "steps": FLAGS.steps, "repeats": repeats,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "tf": tf.__version__, "torch": torch.__version__}


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sbt_keras import results

    if FLAGS.time_only:
        _tf_setup()
        block = tf_block(FLAGS.model, FLAGS.m, FLAGS.steps)
        block()
        print(json.dumps({"ms": statistics.median(block() for _ in range(3)) * 1e3}))
        return
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.shortcut:
        _tf_setup()
        times = shortcut_formulations(FLAGS.m)
        print(json.dumps(times), f"load {os.getloadavg()[0]:.1f}")
        return
    if FLAGS.knobs:
        names = list(KNOBS) if FLAGS.knobs == ["all"] else FLAGS.knobs
        names = ["default"] + [n for n in names if n != "default"]
        sizes = [int(m) for m in FLAGS.knob_batch_sizes] or [FLAGS.m]
        times = knob_times(names, sizes, FLAGS.rounds, FLAGS.steps)
        text = knobs_markdown(times, names, sizes)
        results.write_text_atomic(os.path.join(FLAGS.out, "knobs.md"), text + "\n")
        print(text)
        return
    _tf_setup()
    result = profile(FLAGS.model, FLAGS.m, FLAGS.steps, FLAGS.repeats)
    text = markdown(result, _meta(FLAGS.repeats))
    stem = f"profile_threads{FLAGS.threads}" if FLAGS.threads else "profile"
    results.write_text_atomic(os.path.join(FLAGS.out, stem + ".md"), text + "\n")
    results.write_text_atomic(os.path.join(FLAGS.out, stem + ".json"),
                              json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
