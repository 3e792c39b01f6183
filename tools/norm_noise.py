"""Statistics noise of the normalization layers: how far batch norm's statistics over n
examples (n = 1, 2, 4, ... 256) and the per-example statistics of layer, instance and group
norm fall from the statistics over a large reference sample, beside the Gaussian theory
2/(N - 1). The measurement itself is sbt_keras/norm_noise.py; docs/normalization.md
("Statistics noise") says how to read it.

    # a trained run at a kept epoch (--keep_checkpoint_every_epochs), or its newest one
    python -m tools.norm_noise --run=runs/m8 --epoch=10 --reference=2048 --sizes=1:256 \\
        --out=runs/m8/norm_noise
    # a network at initialisation, with the data a run of the same settings would use
    python -m tools.norm_noise --model=resnet8 --norm=batch --dataset=cifar10 \\
        --cifar_dir=/data/cifar10 --reference=2048 --sizes=1:256 --out=runs/norm_noise_init

The reference sample is --reference training images (un-augmented, standardized with the
training set's channel statistics as the input pipeline does) in a random order drawn from
--seed; consecutive groups of n of them are the BN batches. Writes norm_noise.csv (every
layer, kind and n; columns in sbt_keras.norm_noise.COLUMNS), norm_noise.md (three
readable tables) and norm_noise.png/.svg into --out. Bad input exits with status 2 and one
line on stderr, before TensorFlow loads where it can be known without it.
"""
import math
import os
import sys
import time

import numpy as np
from absl import app, flags

from sbt_keras import models, norm_noise, norms, results
from sbt_keras.errors import ConfigError

FLAGS = flags.FLAGS
# Flags that describe a network built at initialisation; a --run has its own settings.
_INIT_FLAGS = ("model", "norm", "norm_dense", "dataset", "cifar_dir", "image_size",
               "num_classes", "synthetic_train", "train_examples")


def define_flags(fv=FLAGS):
    """Only when run as a script (or on a test's own FlagValues), so importing this module
    defines no global flags."""
    flags.DEFINE_string("run", "", "A run's --output_dir: measure its network at --epoch.",
                        flag_values=fv)
    flags.DEFINE_integer("epoch", None, "With --run: the kept epoch end to load (0: initial "
                         "weights); default its newest checkpoint.", flag_values=fv)
    flags.DEFINE_string("model", "", "Without --run: measure this model at initialisation "
                        "(weights drawn from --seed as a run with that seed draws them).",
                        flag_values=fv)
    flags.DEFINE_enum("norm", "batch", norms.NORM_NAMES, "With --model: its normalization.",
                      flag_values=fv)
    flags.DEFINE_boolean("norm_dense", True, "With --model: also normalize hidden dense "
                         "layers (alexnet_reduced).", flag_values=fv)
    flags.DEFINE_integer("gn_groups", 0, "Channel groups G of the measured 'group' "
                         "statistics (a layer whose channels G does not divide gets no "
                         "group row), and with --model --norm=group the network's; 0: "
                         "the run's, else the model's default (--gn_groups of a run).",
                         flag_values=fv)
    flags.DEFINE_string("dataset", "cifar10", "With --model: the data (cifar10, cifar100, "
                        "synthetic).", flag_values=fv)
    flags.DEFINE_string("cifar_dir", None, "With --model: CIFAR binaries directory.",
                        flag_values=fv)
    flags.DEFINE_integer("image_size", 32, "With --model --dataset=synthetic: image side.",
                         flag_values=fv)
    flags.DEFINE_integer("num_classes", 10, "With --model --dataset=synthetic: classes.",
                         flag_values=fv)
    flags.DEFINE_integer("synthetic_train", 1024, "With --model --dataset=synthetic: "
                         "training examples.", flag_values=fv)
    flags.DEFINE_integer("train_examples", 0, "With --model: keep the first N training "
                         "examples (0 = all).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the initial weights (--model) and of the "
                         "reference sample's choice and order.", flag_values=fv)
    flags.DEFINE_integer("reference", 2048, "Training examples in the reference sample.",
                         flag_values=fv)
    flags.DEFINE_string("sizes", "1:256", "BN batch sizes: LOW:HIGH (every power of two "
                        "between) or a list 1,4,16; each at most --reference/2.",
                        flag_values=fv)
    flags.DEFINE_list("kinds", list(norm_noise.KINDS), "Statistics to measure: batch, "
                      "layer, instance, group.", flag_values=fv)
    flags.DEFINE_enum("forward", "reference", ("reference", "inference"),
                      "reference: batch-statistics norms use their input's statistics over "
                      "the reference sample (an infinite BN batch); inference: the moving "
                      "statistics the network holds.", flag_values=fv)
    flags.DEFINE_integer("chunk", 256, "Examples per forward pass (bounds memory).",
                         flag_values=fv)
    flags.DEFINE_string("out", "", "Output directory.", flag_values=fv)
    flags.DEFINE_string("title", "", "Figure title (default: what was measured).",
                        flag_values=fv)


# ------------------------------------------------------------------------------ checks
def gn_groups(fv, model):
    """--gn_groups, or the model's default group count when it is 0."""
    return fv.gn_groups or models.spec(model).gn_groups


def check(fv=FLAGS):
    """The validated settings as a dict, without TensorFlow; ConfigError on bad input."""
    from sbt_keras.config import Config
    from sbt_keras.training import snapshot

    if bool(fv.run) == bool(fv.model):
        raise ConfigError("give either --run=RUN_DIR (a trained run) or --model=NAME (at "
                          "initialisation), not both or neither")
    if not fv.out:
        raise ConfigError("--out is empty; give a directory for the table and figure")
    for name, value, low in (("reference", fv.reference, 2), ("chunk", fv.chunk, 1),
                             ("gn_groups", fv.gn_groups, 0)):
        if value < low:
            raise ConfigError(f"--{name}={value} must be at least {low}")
    unknown = [k for k in fv.kinds if k not in norm_noise.KINDS]
    if unknown or not fv.kinds:
        raise ConfigError(f"--kinds={','.join(fv.kinds)}: choose from "
                          f"{', '.join(norm_noise.KINDS)}")
    if fv.run:
        given = [f"--{name}" for name in _INIT_FLAGS if fv[name].present]
        if given:
            verb = "describes" if len(given) == 1 else "describe"
            raise ConfigError(f"{', '.join(given)} {verb} a network at initialisation; "
                              f"--run={fv.run} has its own settings. Drop them")
        stored = snapshot.read_config(fv.run)
        cfg = Config.from_dict({k: v for k, v in stored.items()
                                if k not in ("derived", "versions")})
        if cfg.dataset == "imagenet2012":
            raise ConfigError(f"{fv.run}: the instruments need in-memory data (CIFAR or "
                              f"synthetic), not streamed imagenet2012")
        if fv.epoch is not None and fv.epoch < 0:
            raise ConfigError(f"--epoch={fv.epoch} must be >= 0")
    else:
        if fv.epoch is not None:
            raise ConfigError("--epoch only applies to --run; --model is measured at "
                              "initialisation")
        models.spec(fv.model)
        if fv.dataset not in ("cifar10", "cifar100", "synthetic"):
            raise ConfigError(f"--dataset={fv.dataset}: choose cifar10, cifar100 or "
                              f"synthetic (the instruments need in-memory data)")
        if fv.norm == "group":
            try:
                for channels in models.spec(fv.model).norm_channels:
                    norms.check_groups(channels, gn_groups(fv, fv.model),
                                       f"--model={fv.model}")
            except ValueError as error:
                raise ConfigError(str(error)) from None
        cfg = Config(model=fv.model, norm=fv.norm, norm_dense=fv.norm_dense,
                     dataset=fv.dataset, cifar_dir=fv.cifar_dir, image_size=fv.image_size,
                     num_classes=fv.num_classes, synthetic_train=fv.synthetic_train,
                     train_examples=fv.train_examples, seed=fv.seed)
    info = cfg.data_info()  # ConfigError for a bad dataset or CIFAR directory
    if fv.reference > info.num_train:
        raise ConfigError(f"--reference={fv.reference} is larger than the {info.num_train} "
                          f"training examples of {cfg.dataset}; lower it")
    sizes = norm_noise.parse_sizes(fv.sizes, fv.reference)
    return dict(run=fv.run, epoch=fv.epoch, cfg=cfg, info=info,
                gn_groups=fv.gn_groups or cfg.gn_groups or models.spec(cfg.model).gn_groups,
                seed=fv.seed, reference=fv.reference, sizes=sizes, kinds=tuple(fv.kinds),
                forward=fv.forward, chunk=fv.chunk, out=fv.out, title=fv.title)


# ------------------------------------------------------------------------------ running
def load_network(settings):
    """(network, standardized training images, description) of the settings."""
    from sbt_keras.training import snapshot

    if settings["run"]:
        snap = snapshot.load(settings["run"], epoch=settings["epoch"])
        return (snap.network, snap.train_arrays()[0],
                f"{settings['run']} at epoch {snap.epoch:g} ({snap.cfg.model}, "
                f"--norm={snap.cfg.norm})")
    import keras

    cfg, info = settings["cfg"], settings["info"]
    keras.utils.set_random_seed(settings["seed"])  # as train() does before building
    network = models.build(cfg.model, input_shape=info.image_shape,
                           num_classes=info.num_classes, norm=cfg.norm,
                           norm_dense=cfg.norm_dense, gn_groups=settings["gn_groups"])
    (images, _), _ = snapshot.load_arrays(cfg)
    return network, images, (f"{cfg.model} --norm={cfg.norm} at initialisation (seed "
                             f"{settings['seed']}), {cfg.dataset}")


def reference_sample(images, count, seed):
    """`count` of `images` in a random order (seeded): consecutive groups of it are the
    random batches shuffled SGD would draw."""
    return images[np.random.default_rng(seed).permutation(len(images))[:count]]


def execute(settings, echo=print):
    """Measures, writes the table and figure; returns their paths."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    network, images, what = load_network(settings)
    sample = reference_sample(images, settings["reference"], settings["seed"])
    cost = norm_noise.plan(network, len(sample), settings["forward"])
    echo(f"norm_noise: {what}\n  {cost['examples']} reference examples x {cost['sites']} "
         f"layers ({cost['values_per_example'] / 1e3:.0f} k activation values per "
         f"example, {cost['examples'] * cost['values_per_example'] / 1e6:.0f} M in all), "
         f"{cost['passes']} forward pass(es) over prefixes of the network, "
         f"--forward={settings['forward']}, BN batch sizes {settings['sizes']}")
    started = time.time()
    moments = norm_noise.measure(network, sample, chunk=settings["chunk"],
                                 forward=settings["forward"])
    rows = norm_noise.table_rows(moments, settings["sizes"], settings["kinds"],
                                 settings["gn_groups"])
    out = settings["out"]
    csv_path = os.path.join(out, "norm_noise.csv")
    md_path = os.path.join(out, "norm_noise.md")
    results.write_csv(csv_path, rows, norm_noise.COLUMNS)
    header = (f"Statistics noise of {what}; reference sample {len(sample)} training "
              f"examples (seed {settings['seed']}), --forward={settings['forward']}.")
    results.write_text_atomic(md_path, header + "\n\n" + markdown(rows) + "\n")
    paths = [csv_path, md_path] + plot(rows, os.path.join(out, "norm_noise"),
                                       settings["title"] or what)
    echo(f"  measured in {time.time() - started:.1f} s")
    return paths


# ------------------------------------------------------------------------------ output
def _g(value, digits=3):
    if value in ("", None) or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}"


def _layers(rows):
    return [r for r in rows if r["layer"] != norm_noise.MEAN_LAYER]


def markdown(rows):
    """Three tables: batch norm per n (means over layers), batch norm per layer and n,
    per-example norms per layer."""
    means = [r for r in rows if r["layer"] == norm_noise.MEAN_LAYER]
    per_layer = _layers(rows)
    batch_means = sorted((r for r in means if r["norm"] == "batch"), key=lambda r: r["n"])
    blocks = []
    if batch_means:
        lines = ["**Batch norm, mean over layers.** var err: squared relative error of the "
                 "unbiased variance over the n examples' values; 2/(n−1): Gaussian, all "
                 "pixels of an example equal; 2/(nHW−1): Gaussian, independent pixels "
                 "(mean over layers); s.e.: a layer's typical Monte-Carlo standard error "
                 "(over its independent groups); values/example: 2/(var err)+1 divided by "
                 "n, the layers' mean; mean err: (μ_g − μ)²/σ², Gaussian 1/n to 1/(nHW).",
                 "", "| n | var err | ± s.e. | 2/(n−1) | 2/(nHW−1) | values/example | "
                 "biased var err | mean err | 1/n |", "|---|---|---|---|---|---|---|---|---|"]
        for r in batch_means:
            lines.append(f"| {r['n']} | {_g(r['var_err'])} | {_g(r['var_err_stderr'], 2)} | "
                         f"{_g(r['theory_var_n'])} | "
                         f"{_g(r['theory_var_N'])} | {_g(r['eff_per_example'])} | "
                         f"{_g(r['var_err_biased'])} | {_g(r['mean_err'])} | "
                         f"{_g(r['theory_mean_n'])} |")
        blocks.append("\n".join(lines))
    batch = [r for r in per_layer if r["norm"] == "batch"]
    if batch:
        sizes = sorted({r["n"] for r in batch})
        names = list(dict.fromkeys(r["layer"] for r in batch))
        lines = ["**Batch norm, var err per layer and n** (κ: kurtosis of the layer's "
                 "values, 3 for a Gaussian; last column: values per example implied at "
                 f"n = {sizes[-1]}).", "",
                 "| layer | H×W×C | κ | " + " | ".join(f"n={n}" for n in sizes)
                 + " | values/example |", "|---" * (len(sizes) + 4) + "|"]
        for name in names:
            mine = {r["n"]: r for r in batch if r["layer"] == name}
            first = mine[sizes[0]]
            lines.append(f"| {name} | {first['height']}×{first['width']}×"
                         f"{first['channels']} | {_g(first['kurtosis'])} | "
                         + " | ".join(_g(mine[n]["var_err"]) for n in sizes)
                         + f" | {_g(mine[sizes[-1]]['eff_per_example'])} |")
        blocks.append("\n".join(lines))
    example = [r for r in per_layer if r["norm"] in norm_noise.EXAMPLE_KINDS]
    if example:
        kinds = [k for k in norm_noise.EXAMPLE_KINDS if any(r["norm"] == k for r in example)]
        names = list(dict.fromkeys(r["layer"] for r in example))
        groups = next((r["gn_groups"] for r in example if r["norm"] == "group"), "")
        label = {"layer": "layer", "instance": "instance", "group": f"group (G={groups})"}
        lines = ["**Per-example norms, any n:** var err of each example's own statistics "
                 "against the same statistic over the whole sample, and the Gaussian "
                 "2/(N−1) for the N values behind one statistic.", "",
                 "| layer | " + " | ".join(f"{label[k]} var err | N | 2/(N−1)" for k in kinds)
                 + " |", "|---" * (1 + 3 * len(kinds)) + "|"]
        for name in names + [norm_noise.MEAN_LAYER]:
            source = example if name != norm_noise.MEAN_LAYER else means
            cells = []
            for k in kinds:
                r = next((r for r in source if r["layer"] == name and r["norm"] == k), None)
                cells += ([_g(r["var_err"]), str(r.get("values_per_stat", "")) or "—",
                           _g(r["theory_var_N"])] if r else ["—"] * 3)
            lines.append(f"| {name} | " + " | ".join(c or "—" for c in cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(rows, out, title=""):
    """Log-log figure: measured squared relative error of the variance (left) and of the
    mean (right) against n, one thin line per layer coloured by its pixel count, their mean
    bold, the Gaussian lines for N = n and N = n x H x W dashed, per-example norms as
    horizontal lines. Writes <out>.png and <out>.svg; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = _layers(rows)
    batch = [r for r in per_layer if r["norm"] == "batch"]
    means = [r for r in rows if r["layer"] == norm_noise.MEAN_LAYER]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    sizes = sorted({r["n"] for r in batch})
    pixels = sorted({r["height"] * r["width"] for r in batch}, reverse=True)
    colours = {p: plt.cm.viridis(i / max(1, len(pixels) - 1) * 0.85)
               for i, p in enumerate(pixels)}
    example_style = {"layer": ("tab:red", ":"), "instance": ("tab:orange", "-."),
                     "group": ("tab:purple", (0, (6, 2, 1, 2, 1, 2)))}
    for ax, key, theory_n, theory_N, what in (
            (axes[0], "var_err", "theory_var_n", "theory_var_N",
             "squared relative error of the variance"),
            (axes[1], "mean_err", "theory_mean_n", "theory_mean_N",
             "(mean error)² / variance")):
        for name in dict.fromkeys(r["layer"] for r in batch):
            mine = sorted((r for r in batch if r["layer"] == name), key=lambda r: r["n"])
            ax.plot([r["n"] for r in mine], [r[key] for r in mine], lw=0.8, alpha=0.7,
                    color=colours[mine[0]["height"] * mine[0]["width"]])
        mean = sorted((r for r in means if r["norm"] == "batch"), key=lambda r: r["n"])
        if mean:
            ax.plot([r["n"] for r in mean], [r[key] for r in mean], "k-o", lw=2.2, ms=4,
                    label="batch norm, mean over layers", zorder=5)
            if key == "var_err":  # a layer's typical Monte-Carlo standard error
                band = [(r["n"], r[key], r["var_err_stderr"]) for r in mean
                        if r["var_err_stderr"] not in ("", None)]
                ax.fill_between([b[0] for b in band], [max(b[1] - b[2], b[1] / 10)
                                                       for b in band],
                                [b[1] + b[2] for b in band], color="k", alpha=0.12, lw=0,
                                label="± a layer's standard error (Monte Carlo)")
            xs = [n for n in sizes if n > 1]
            ax.plot(xs, [next(r[theory_n] for r in mean if r["n"] == n) for n in xs], "k--",
                    lw=1.2, label="Gaussian, N = n (pixels fully correlated)")
        for p in pixels:
            mine = {r["n"]: r[theory_N] for r in batch if r["height"] * r["width"] == p}
            height = int(round(math.sqrt(p)))
            size = f"{height}×{height}" if height * height == p else f"{p} pixels"
            ax.plot(sorted(mine), [mine[n] for n in sorted(mine)], "--", lw=1.2,
                    color=colours[p], label=f"Gaussian, N = n·H·W, H×W = {size} "
                                            f"(thin: layers of that size)")
        for kind in norm_noise.EXAMPLE_KINDS:
            r = next((r for r in means if r["norm"] == kind), None)
            if r is not None and r[key] not in ("", None):
                colour, style = example_style[kind]
                extra = f", G={r['gn_groups']}" if kind == "group" else ""
                ax.axhline(r[key], color=colour, ls=style, lw=1.6,
                           label=f"{kind} norm{extra} (per example, any n), mean over layers")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if sizes:
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(n) for n in sizes])
        ax.set_xlabel("BN batch size n (examples per statistics group)")
        ax.set_ylabel(what)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * math.ceil(len(labels) / 2)))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [f"{out}.png", f"{out}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------ command
def run_from_flags(fv=FLAGS, echo=print):
    """check() then execute(): the tool on parsed flags `fv`; raises ConfigError."""
    return execute(check(fv), echo=echo)


def main(argv, fv=FLAGS):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
        paths = run_from_flags(fv)
    except ConfigError as error:
        _fail(str(error))
    print("\n".join(paths))


def _fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main)
