"""1-D linear interpolation between two runs' networks (Keskar et al. 2017, Fig. 3;
Goodfellow et al. 2015).

    python -m tools.interpolate --a=runs/m8 --b=runs/m1024 [--epoch_a=E --epoch_b=E]
        --alphas=-1:2:0.1 --sample=1024 --out=runs/interp_8_1024

Evaluates theta(alpha) = (1 - alpha) theta_A + alpha theta_B, theta being every TRAINABLE
variable (combined in float64, assigned in float32), at each alpha: the cross-entropy loss
and accuracy in inference mode on N training examples (a seeded sample, un-augmented) and on
the test set. Batch-norm moving statistics are not interpolated: at every alpha they are
recomputed on the same N training examples (sbt_keras/bn_statistics.py: the exact mean of
the per-batch statistics of training-mode passes over full batches), because the moving
statistics of A, of B, or their average describe other weights. The networks must be the
same architecture on the same data (refused otherwise, before any compute); run A's
network object (with its BN group size) does the evaluating.

Writes <out>/interpolation.csv (alpha, train_loss, train_accuracy, test_loss,
test_accuracy), <out>/interpolation.yaml (what was compared, how BN was handled) and
<out>/interpolation.png/.svg: loss solid, accuracy dashed, train and test in two colours,
alpha = 0 (A) and alpha = 1 (B) marked.
"""
import math
import os

import numpy as np
from absl import flags

from sbt_keras import results
from sbt_keras.errors import ConfigError
from sbt_keras.training import snapshot
from tools import cli

CSV_FILE, YAML_FILE, FIGURE_STEM = "interpolation.csv", "interpolation.yaml", "interpolation"
COLUMNS = ("alpha", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
DEFAULT_SAMPLE = 1024
# Settings both runs must share: the architecture, and what their data is.
SAME_MODEL = ("model", "norm", "norm_dense")
SAME_DATA = ("dataset", "train_examples", "test_examples", "image_size", "num_classes",
             "synthetic_train", "synthetic_test")
SAME_DERIVED = ("num_train", "num_test", "num_classes", "image_shape")


def parse_alphas(text):
    """'START:STOP:STEP' (STOP included) or a comma list -> [float]; ConfigError if bad."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            return [round(start + i * step, 10) for i in range(count)]
        values = [float(v) for v in text.split(",")]
        if not values:
            raise ValueError
        return values
    except ValueError:
        raise ConfigError(f"--alphas={text} must be START:STOP:STEP with STEP > 0 and STOP >= "
                          f"START (e.g. -1:2:0.1), or a comma list of numbers") from None


def check_compatible(a_dir, b_dir):
    """(config of A, config of B) after checking that the two runs are the same network on
    the same data; ConfigError naming the first differences otherwise (no TensorFlow)."""
    a, b = snapshot.read_config(a_dir), snapshot.read_config(b_dir)
    differences = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in SAME_MODEL + SAME_DATA
                   if a.get(k) != b.get(k)]
    if a.get("dataset") == "synthetic" and a.get("seed") != b.get("seed"):
        differences.append(f"seed (it generates synthetic data): {a.get('seed')!r} vs "
                           f"{b.get('seed')!r}")
    da, db = a.get("derived") or {}, b.get("derived") or {}
    differences += [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in SAME_DERIVED
                    if da.get(k) != db.get(k)]
    if differences:
        raise ConfigError(f"--a={a_dir} and --b={b_dir} are not the same network on the same "
                          f"data ({'; '.join(differences[:3])}); interpolate between runs "
                          f"of one architecture and dataset")
    return a, b


def trainable_arrays(network):
    """[(path, float64 array)] of the trainable variables, in their order."""
    return [(v.path, np.asarray(v.numpy(), np.float64)) for v in network.trainable_variables]


def check_same_variables(theta_a, theta_b, a_dir, b_dir):
    shapes_a = [(p, w.shape) for p, w in theta_a]
    shapes_b = [(p, w.shape) for p, w in theta_b]
    if shapes_a != shapes_b:
        first = next(((x, y) for x, y in zip(shapes_a, shapes_b) if x != y),
                     (len(shapes_a), len(shapes_b)))
        raise ConfigError(f"--a={a_dir} and --b={b_dir} have different trainable variables "
                          f"(first difference: {first[0]} vs {first[1]})")


def interpolated(theta_a, theta_b, alpha):
    """[(1 - alpha) a + alpha b] per variable, float64."""
    return [(1.0 - alpha) * a + alpha * b for (_, a), (_, b) in zip(theta_a, theta_b)]


def assign(network, arrays):
    for variable, value in zip(network.trainable_variables, arrays):
        variable.assign(value.astype(variable.dtype))


def inference(network):
    """x -> logits in inference mode, traced once."""
    import tensorflow as tf

    return tf.function(lambda x: network(x, training=False))


def evaluate(forward, images, labels, batch_size=256):
    """(mean cross-entropy, accuracy) of `forward` (see `inference`); numpy float64."""
    import tensorflow as tf

    losses, correct = [], 0
    for start in range(0, len(labels), batch_size):
        logits = np.asarray(forward(tf.constant(images[start:start + batch_size])),
                            np.float64)
        y = np.asarray(labels[start:start + batch_size])
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        losses.append(-log_probs[np.arange(len(y)), y])
        correct += int(np.sum(np.argmax(logits, axis=1) == y))
    return float(np.concatenate(losses).mean()), correct / len(labels)


def run(a_dir, b_dir, *, epoch_a=None, epoch_b=None, alphas=(0.0, 1.0), sample=None,
        test_sample=None, seed=0, out, log=print):
    """Evaluates every alpha; writes the CSV, YAML and figure into `out`; returns the rows."""
    from sbt_keras import bn_statistics

    cfg_a, _ = check_compatible(a_dir, b_dir)
    num_train, num_test = cfg_a["derived"]["num_train"], cfg_a["derived"]["num_test"]
    n = min(DEFAULT_SAMPLE, num_train) if sample is None else sample
    if not 1 <= n <= num_train:
        raise ConfigError(f"--sample={n} must be between 1 and the {num_train} training "
                          f"examples")
    t = num_test if not test_sample else test_sample
    if not 1 <= t <= num_test:
        raise ConfigError(f"--test_sample={t} must be between 1 and the {num_test} test "
                          f"examples (0: all)")
    snap_a = snapshot.load(a_dir, epoch_a)
    snap_b = snapshot.load(b_dir, epoch_b)
    network = snap_a.network
    theta_a, theta_b = trainable_arrays(network), trainable_arrays(snap_b.network)
    check_same_variables(theta_a, theta_b, a_dir, b_dir)
    try:
        layers = bn_statistics.bn_layers(network)
    except ValueError as error:
        raise ConfigError(f"--a={a_dir}: interpolation recomputes the BN moving statistics "
                          f"at each alpha, but {error}") from None
    train_images, train_labels = snap_a.train_arrays(n, seed)
    test_images, test_labels = snap_a.test_arrays(t, seed)
    bn_batch = bn_statistics.batch_size_for(layers, n) if layers else 0
    passes = "1 training-mode + 1 inference" if layers else "1 inference"
    log(f"Cost: {len(alphas)} points x ({n} training examples x {passes} forward passes + "
        f"{t} test examples x 1 inference pass)")

    forward = inference(network)
    rows, bar = [], cli.progress(len(alphas), "alphas")
    try:
        with bn_statistics.Recomputer(network) as statistics:
            for alpha in alphas:
                assign(network, interpolated(theta_a, theta_b, alpha))
                statistics.recompute(train_images, bn_batch)  # nothing without BN
                train_loss, train_acc = evaluate(forward, train_images, train_labels)
                test_loss, test_acc = evaluate(forward, test_images, test_labels)
                rows.append(dict(alpha=alpha, train_loss=train_loss,
                                 train_accuracy=train_acc, test_loss=test_loss,
                                 test_accuracy=test_acc))
                bar.set_postfix_str(f"alpha={alpha:g} train loss {train_loss:.4g}")
                bar.update(1)
    finally:
        bar.close()
    batches = n // bn_batch if layers else 0
    bn_note = (f"BN moving statistics recomputed at each alpha: the mean of the per-batch "
               f"statistics of {batches} training-mode batch{'es' if batches > 1 else ''} of "
               f"{bn_batch} of the {n} training examples" if layers else "no BN moving statistics")
    info = {"a": a_dir, "epoch_a": snap_a.epoch, "b": b_dir, "epoch_b": snap_b.epoch,
            "batch_size_a": cfg_a["batch_size"],
            "batch_size_b": snapshot.read_config(b_dir)["batch_size"],
            "sample": n, "test_sample": t, "seed": seed, "bn": bn_note,
            "bn_batches": batches, "bn_recompute_batch": bn_batch}
    results.write_csv(os.path.join(out, CSV_FILE), rows, COLUMNS)
    results.write_yaml(os.path.join(out, YAML_FILE), info)
    paths = plot(rows, info, os.path.join(out, FIGURE_STEM))
    log("wrote " + ", ".join([os.path.join(out, CSV_FILE), os.path.join(out, YAML_FILE),
                              *paths]))
    return rows


def plot(rows, info, out):
    """Keskar et al. Fig. 3 style: loss (left axis, solid), accuracy (right, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, loss_ax = plt.subplots(figsize=(6.4, 4.4))
    accuracy_ax = loss_ax.twinx()
    for split, colour in (("train", "C0"), ("test", "C1")):
        loss_ax.plot(alphas, [r[f"{split}_loss"] for r in rows], "-", color=colour,
                     label=f"{split} loss")
        accuracy_ax.plot(alphas, [r[f"{split}_accuracy"] * 100 for r in rows], "--",
                         color=colour, label=f"{split} accuracy")
    for alpha, name in ((0, "A"), (1, "B")):
        loss_ax.axvline(alpha, color="0.4", ls=":", lw=1)
        loss_ax.annotate(name, (alpha, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel(r"$\alpha$:  $\theta = (1-\alpha)\,\theta_A + \alpha\,\theta_B$")
    loss_ax.set_ylabel("cross-entropy loss (solid)")
    accuracy_ax.set_ylabel("accuracy % (dashed)")
    accuracy_ax.set_ylim(0, 100)
    handles = loss_ax.get_legend_handles_labels()
    more = accuracy_ax.get_legend_handles_labels()
    loss_ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="center left")
    name = lambda path: os.path.basename(os.path.normpath(path))  # noqa: E731
    loss_ax.set_title(f"A = {name(info['a'])} (m={info['batch_size_a']}, epoch "
                      f"{info['epoch_a']:g}),  B = {name(info['b'])} "
                      f"(m={info['batch_size_b']}, epoch {info['epoch_b']:g})", fontsize=9)
    fig.text(0.01, -0.04, f"Inference mode, {info['sample']} training / "
             f"{info['test_sample']} test examples. {info['bn']}.", fontsize=7, wrap=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [f"{out}.png", f"{out}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("a", "", "Run directory A (alpha = 0).")
    flags.DEFINE_string("b", "", "Run directory B (alpha = 1).")
    flags.DEFINE_integer("epoch_a", None, "A's epoch (default: its newest checkpoint).")
    flags.DEFINE_integer("epoch_b", None, "B's epoch (default: its newest checkpoint).")
    flags.DEFINE_string("alphas", "-1:2:0.1", "START:STOP:STEP (STOP included) or a comma "
                        "list.")
    flags.DEFINE_integer("sample", None, f"Training examples (seeded sample) for the train "
                         f"curves and the BN statistics; default {DEFAULT_SAMPLE} or all "
                         f"when fewer.")
    flags.DEFINE_integer("test_sample", 0, "Test examples (seeded sample); 0 = all.")
    flags.DEFINE_integer("seed", 0, "Seed of the samples.")
    flags.DEFINE_string("out", "", "Output directory.")


def main(argv):
    del argv
    if not (FLAGS.a and FLAGS.b and FLAGS.out):
        raise ConfigError("give --a=RUN_DIR --b=RUN_DIR --out=DIR")
    alphas = parse_alphas(FLAGS.alphas)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(FLAGS.a, FLAGS.b, epoch_a=FLAGS.epoch_a, epoch_b=FLAGS.epoch_b, alphas=alphas,
        sample=FLAGS.sample, test_sample=FLAGS.test_sample, seed=FLAGS.seed, out=FLAGS.out)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
