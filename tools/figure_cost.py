"""What each paper figure costs on this machine, one trial at a time and packed, from measured
step times.

    make figure-cost                     # measure here, then print the README's cost table
    python -m tools.figure_cost --measure --out=runs/bench      # step times only
    python -m tools.figure_cost --times=runs/bench/step_times.json   # table from them

--measure times, per (model, norm) that a figure trains and per --batch_sizes m, the sbt step
of one trial and the packed step of --pack trials (training/packed_model.py), interleaved
(tools/bench.py's `interleaved`), and writes step_times.json. The table expands every CIFAR
figure's flagfile (experiments/figures/*.flags) into its grid exactly as a sweep does
(skipped points left out; Fig. 13's eta_tilde per m does not change the cost, so it needs no
earlier sweep), and costs each trial with sbt_keras/cost.py's `figure_seconds`: train steps
plus one test-set evaluation per epoch, at the step time of its m -- linear in m between the
measured batch sizes and the last segment's a + b·m beyond them. Trials that diverge and
stop early are costed in full (an upper bound). A grid with one eta_tilde per m (Fig. 4, 13)
has nothing to pack: its packed hours are its hours one at a time. ImageNet figures
(ResNet-50) are left out: their step times were not measured here.
"""
import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from sbt_keras import cost, grid as grid_lib, packing, results  # noqa: E402
from sbt_keras import flags as run_flags  # noqa: E402
from sbt_keras.config import Config  # noqa: E402

FLAGS = flags.FLAGS
FIGURES = "experiments/figures"
# The README table's rows: figure -> the flagfiles of its sweeps.
README_ROWS = {"1": ["fig01"], "2": ["fig02"], "3": ["fig03"], "4": ["fig04"],
               "5": ["fig05"], "6": ["fig06"], "7": ["fig07"], "8": ["fig08"],
               "9": ["fig09"], "10": ["fig10"], "11": ["fig11"],
               "13": ["fig13", "fig13_cifar100"], "17": ["fig17"], "18": ["fig18"]}


def define_flags():
    flags.DEFINE_boolean("measure", False, "Time the step of every (model, norm) the figures "
                         "train, one trial and packed, and write step_times.json to --out.")
    flags.DEFINE_string("times", "", "step_times.json to cost the figures from (default: "
                        "--out's, after --measure).")
    flags.DEFINE_list("batch_sizes", ["2", "8", "32", "128"], "m to measure at.")
    flags.DEFINE_integer("pack", 8, "K trials per packed step.", lower_bound=2)
    flags.DEFINE_integer("steps", 3, "Steps per timed block.", lower_bound=1)
    flags.DEFINE_integer("repeats", 2, "Timed blocks; the median is reported.", lower_bound=1)
    flags.DEFINE_list("figures", sorted(README_ROWS, key=int), "README rows to cost.")
    flags.DEFINE_string("out", "runs/bench", "Where step_times.json and figure_cost.md go.")


# ---------------------------------------------------------------------- figure grids
def figure_trials(flagfile, k=8):
    """((model, norm), [(m, train steps, test examples evaluated, pack size)]) of a figure's
    sweep: its valid grid points, resolved as the sweep resolves them, and the size of the
    pack `--pack=k` would put each in (packing.group: only eta_tilde may differ in a pack)."""
    fv = flags.FlagValues()
    run_flags.define_flags(fv)
    run_flags.define_sweep_flags(fv)
    run_flags.define_command_flags(fv)
    fv(["figure_cost", f"--flagfile={flagfile}"])
    fv["grid_best_lr_from"].value = ""  # the eta_tilde per m does not change the cost
    base = run_flags.config_from_flags(fv)
    if base.base_lr is None and base.log2_base_lr is None:
        base = dataclasses.replace(base, log2_base_lr=-8.0)
    grid = grid_lib.Grid.from_flags(base, run_flags.grid_texts_from_flags(fv), fv.seeds)
    valid, _ = grid_lib.split_points(base, grid, lambda point: point.name)
    info = valid[0][1].data_info()
    trials = []
    for pack in packing.group(valid, k):
        for _, cfg in pack:
            _, steps = cost.run_steps(cfg, info)
            trials.append((cfg.batch_size, steps, cfg.epochs * info.num_test, len(pack)))
    return (base.model, base.norm), trials


def figure_pairs(names, k=8):
    """{flagfile name: ((model, norm), trials)} of the README rows `names`."""
    return {f: figure_trials(os.path.join(FIGURES, f + ".flags"), k)
            for name in names for f in README_ROWS[name]}


def hours_table(grids, times, k):
    """[(figure, trials, model:norm, hours one at a time, hours packed)] from
    {flagfile: (pair, trials)} and {"model:norm": {"single": {m: ms}, "packed": {m: ms}}}."""
    rows = []
    for name, files in README_ROWS.items():
        if not all(f in grids for f in files):
            continue
        single = packed = 0.0
        count, pairs = 0, set()
        for f in files:
            pair, trials = grids[f]
            pairs.add(":".join(pair))
            measured = times[":".join(pair)]
            s, p = cost.figure_seconds(trials, measured["single"], measured["packed"], k,
                                       cost.DOCUMENTED_TRIAL_OVERHEAD_S)
            single, packed, count = single + s, packed + p, count + len(trials)
        rows.append((name, count, ", ".join(sorted(pairs)), single / 3600, packed / 3600))
    return rows


def markdown(rows, meta):
    lines = [meta["machine"],
             f"Step times measured {meta['date']} (load average {meta['load']}): median of "
             f"{meta['repeats']} blocks of {meta['steps']} steps at m = "
             f"{', '.join(map(str, meta['batch_sizes']))}, one trial and a pack of "
             f"K = {meta['pack']} interleaved, the pack in the formulation "
             f"--pack_formulation=auto picks per model and m; other m linear in m "
             f"(a + b·m).", "",
             "| Fig. | trials | model:norm | CPU-hours one at a time | CPU-hours packed "
             f"(K = {meta['pack']}) |", "|---|---|---|---|---|"]
    for name, count, pairs, single, packed in rows:
        lines.append(f"| {name} | {count} | {pairs} | {single:,.0f} | {packed:,.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- measuring
def measure(pairs, batch_sizes, k, steps, repeats):
    """{"model:norm": {"single": {m: ms}, "packed": {m: ms}, "formulation": {m: name}}},
    one trial and a pack of K interleaved per (pair, m); the pack in the formulation
    `--pack_formulation=auto` would pick on this device (packing.formulation)."""
    import tensorflow as tf

    from sbt_keras import packing
    from tools import bench, bench_pack

    device = "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    times = {}
    for model, norm in pairs:
        entry = times.setdefault(f"{model}:{norm}",
                                 {"single": {}, "packed": {}, "formulation": {}})
        for m in batch_sizes:
            chosen = packing.formulation(Config(model=model, norm=norm, batch_size=m),
                                         device, k)
            pack = (bench_pack.grouped_block if chosen == packing.GROUPED
                    else bench_pack.packed_block)
            blocks = {"single": bench_pack.single_block(model, norm, m, steps, False)[0],
                      "packed": pack(model, norm, m, k, steps, False)}
            seconds = bench.interleaved(blocks, repeats)
            for kind in blocks:
                entry[kind][m] = seconds[kind] * 1e3
            entry["formulation"][m] = chosen
            print(f"{model}:{norm} m={m} one {seconds['single'] * 1e3:.1f} ms/step, pack of "
                  f"{k} ({chosen}) {seconds['packed'] * 1e3:.1f} ms/step  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    return times


def _load(path):
    with open(path) as f:
        data = json.load(f)
    for entry in data["times"].values():
        for kind in entry:
            entry[kind] = {int(m): ms for m, ms in entry[kind].items()}
    return data


def main(argv):
    del argv
    path = FLAGS.times or os.path.join(FLAGS.out, "step_times.json")
    if FLAGS.measure:
        from tools import bench, machine

        pairs = sorted({pair for pair, _ in figure_pairs(FLAGS.figures).values()})
        sizes = [int(m) for m in FLAGS.batch_sizes]
        load_before = os.getloadavg()
        times = measure(pairs, sizes, FLAGS.pack, FLAGS.steps, FLAGS.repeats)
        meta = {"machine": machine.line(machine.describe(), bench.matmul_peak_flops() / 1e9),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load": "{:.1f} before, {:.1f} after".format(load_before[0],
                                                             os.getloadavg()[0]),
                "pack": FLAGS.pack, "steps": FLAGS.steps, "repeats": FLAGS.repeats,
                "batch_sizes": sizes}
        results.write_text_atomic(path, json.dumps({"meta": meta, "times": times}, indent=1))
    data = _load(path)
    k = data["meta"]["pack"]
    text = markdown(hours_table(figure_pairs(FLAGS.figures, k), data["times"], k), data["meta"])
    results.write_text_atomic(os.path.join(FLAGS.out, "figure_cost.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
