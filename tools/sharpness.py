"""epsilon-sharpness (Keskar et al. 2017, Metric 2.1) of a finished or running run's checkpoint.

    python -m tools.sharpness --run=runs/m8 [--epoch=E] [--sample=N] [--epsilons=1e-3,5e-4]
        [--p=100, or 0 for the full space] [--maxiter=10] [--seed=0] [--curvature]

Measures the run's network at the end of epoch E (default: its newest checkpoint; earlier
epochs need --keep_checkpoint_every_epochs) with sbt_keras.sharpness.measure_sharpness, on a
fixed seeded sample of N un-augmented training examples with batch norm in inference mode
(its moving statistics), so f is a deterministic function of the weights. --curvature adds
the top Hessian eigenvalue (Lanczos) and a Hutchinson trace estimate on the same sample.

The cost is printed before anything is computed, progress while it runs (a tqdm bar when
tqdm is installed, else a line per evaluation). The values go to <run>/sharpness.yaml, keyed
by epoch and merged with earlier measurements (one with the same settings is replaced); the
file is rewritten atomically once everything is measured, so a kill leaves the previous file
as it was. docs/sharp_minima.md has the definitions and the costs.
"""
import math
import os
import time

from absl import flags

from sbt_keras import results
from sbt_keras.errors import ConfigError
from sbt_keras.training import snapshot
from tools import cli

SHARPNESS_FILE = "sharpness.yaml"
# N when --sample is not given: 1024 examples, or the whole training set when smaller.
DEFAULT_SAMPLE = 1024
DEFAULT_EPSILONS = (1e-3, 5e-4)  # Keskar et al.'s two box sizes
DEFAULT_P = 100  # Keskar et al.'s random-subspace dimension; 0 = the full space
DEFAULT_MAXITER = 10  # Keskar et al.'s L-BFGS-B budget
DEFAULT_EIGEN_HVPS = 40
DEFAULT_TRACE_SAMPLES = 10
SHARPNESS_KEYS = ("epsilon", "p", "sample", "seed", "maxiter")  # a record's settings
CURVATURE_KEYS = ("sample", "seed", "eigen_hvps", "trace_samples")


def check_request(run_dir, *, epoch=None, sample=None, epsilons=DEFAULT_EPSILONS,
                  p=DEFAULT_P, maxiter=DEFAULT_MAXITER):
    """N, the sample size to use, after checking everything that needs no TensorFlow;
    ConfigError (one line) for bad input."""
    epsilons = tuple(epsilons)
    if not epsilons:
        raise ConfigError("--epsilons is empty; give at least one box size, e.g. 1e-3")
    for epsilon in epsilons:
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"--epsilons: {epsilon:g} is not a positive box size; "
                              f"epsilon must be > 0 (Keskar et al. use 1e-3 and 5e-4)")
    if p < 0:
        raise ConfigError(f"--p={p} must be >= 0 (a random subspace's dimension, or 0 for "
                          f"the full parameter space)")
    if maxiter < 1:
        raise ConfigError(f"--maxiter={maxiter} must be >= 1 (L-BFGS-B iterations)")
    stored = snapshot.read_config(run_dir)
    num_train = (stored.get("derived") or {}).get("num_train")
    checkpoints = snapshot.available(run_dir)
    if not checkpoints:
        raise ConfigError(f"{run_dir} holds no checkpoint; train it first (or re-run it to "
                          f"resume)")
    steps_per_epoch = stored["derived"]["steps_per_epoch"]
    if epoch is not None and epoch * steps_per_epoch not in checkpoints:
        kept = ", ".join(snapshot._epoch_names(checkpoints, steps_per_epoch))
        raise ConfigError(f"{run_dir} has no checkpoint at the end of epoch {epoch} (kept: "
                          f"{kept}); train with --keep_checkpoint_every_epochs to keep "
                          f"earlier epochs")
    if sample is None:
        return min(DEFAULT_SAMPLE, num_train)
    if not 1 <= sample <= num_train:
        raise ConfigError(f"--sample={sample} must be between 1 and the run's {num_train} "
                          f"training examples")
    return sample


def measure(run_dir, *, epoch=None, sample=None, epsilons=DEFAULT_EPSILONS, p=DEFAULT_P,
            maxiter=DEFAULT_MAXITER, seed=0, curvature=False,
            eigen_hvps=DEFAULT_EIGEN_HVPS, trace_samples=DEFAULT_TRACE_SAMPLES,
            hvp_mode="forward", log=print, on_evaluation=None):
    """Measures, merges into <run_dir>/sharpness.yaml and returns (epoch key, its entry).

    on_evaluation(epsilon, f): called after every loss-and-gradient evaluation, besides
    the progress display (tests use it to interrupt a measurement).
    """
    epsilons = tuple(float(e) for e in epsilons)
    n_sample = check_request(run_dir, epoch=epoch, sample=sample, epsilons=epsilons, p=p,
                             maxiter=maxiter)
    from sbt_keras import curvature as curvature_lib  # TensorFlow: after the checks
    from sbt_keras import sharpness
    costs = [sharpness.sharpness_cost(n_sample, epsilons=epsilons, p=p or None,
                                      maxiter=maxiter)]
    if curvature:
        costs += [curvature_lib.eigenvalue_cost(n_sample, max_iterations=eigen_hvps),
                  curvature_lib.trace_cost(n_sample, samples=trace_samples)]
    log("Cost, at most:\n" + "\n".join(f"  {c}" for c in costs))

    snap = snapshot.load(run_dir, epoch)
    network = snap.network
    size = sum(int(math.prod(v.shape)) for v in network.trainable_variables)
    if p > size:
        raise ConfigError(f"--p={p} is larger than the network's {size} trainable "
                          f"parameters; use at most {size}, or 0 for the full space")
    images, labels = snap.train_arrays(n_sample, seed)
    log(f"{run_dir}: epoch {_fmt_epoch(snap.epoch)} (step {snap.step}), {size:,} "
        f"parameters, N = {n_sample} training examples (seed {seed}), BN in inference mode")

    bars = {}

    def report(epsilon, value):
        if epsilon not in bars:
            for bar in bars.values():
                bar.close()
            bars[epsilon] = cli.progress(sharpness.default_max_evaluations(maxiter),
                                         f"eps {epsilon:g} evaluations")
        bars[epsilon].set_postfix_str(f"f={value:.6g}")
        bars[epsilon].update(1)
        if on_evaluation is not None:
            on_evaluation(epsilon, value)

    started = time.monotonic()
    try:
        found = sharpness.measure_sharpness(
            network, images, labels, epsilons=epsilons, p=p or None, seed=seed,
            maxiter=maxiter, on_evaluation=report)
    finally:
        for bar in bars.values():
            bar.close()
    seconds = (time.monotonic() - started) / len(found)
    entry = {"step": snap.step, "sharpness": [
        {"epsilon": r.epsilon, "p": p, "sample": n_sample, "seed": seed, "maxiter": maxiter,
         "phi": r.phi, "f0": r.f0, "f_max": r.f_max, "evaluations": r.evaluations,
         "iterations": r.iterations, "message": r.message, "seconds": seconds}
        for r in found]}
    for r in found:
        log(f"  eps {r.epsilon:g}, {'full space' if not p else f'p = {p}'}: phi = "
            f"{r.phi:.6g} (f0 {r.f0:.6g}, f_max {r.f_max:.6g}, {r.evaluations} "
            f"evaluations)")
    if curvature:
        entry["curvature"] = [_curvature(curvature_lib, network, images, labels, n_sample,
                                         seed, eigen_hvps, trace_samples, hvp_mode, log)]
    key = _epoch_key(snap.epoch)
    path = os.path.join(run_dir, SHARPNESS_FILE)
    # Read just before writing: another measurement of this run may have finished since.
    stored = results.read_yaml(path) if results.exists(path) else None
    results.write_yaml(path, merge(stored, key, entry))
    log(f"wrote {path}")
    return key, entry


def _curvature(curvature_lib, network, images, labels, n_sample, seed, eigen_hvps,
               trace_samples, hvp_mode, log):
    """Top eigenvalue (Lanczos) and Hutchinson trace from one FlatLoss (traced once)."""
    from sbt_keras.flat_loss import FlatLoss

    started = time.monotonic()
    with FlatLoss(network, images, labels, hvp_mode=hvp_mode) as loss:
        def counted(bar):
            def hvp(v):
                product = loss.hvp(loss.x0, v)
                bar.update(1)
                return product
            return hvp

        bar = cli.progress(eigen_hvps, "top eigenvalue HVPs")
        try:
            top = curvature_lib.top_hessian_eigenvalue(counted(bar), loss.size,
                                                       max_iterations=eigen_hvps, seed=seed)
        finally:
            bar.close()
        bar = cli.progress(trace_samples, "Hutchinson HVPs")
        try:
            trace = curvature_lib.hutchinson_trace(counted(bar), loss.size,
                                                   samples=trace_samples, seed=seed)
        finally:
            bar.close()
    log(f"  top Hessian eigenvalue {top.eigenvalue:.6g} ({top.iterations} HVPs, "
        f"{'converged' if top.converged else 'not converged: a lower bound'}); trace "
        f"{trace.mean:.6g} +- {trace.stderr:.3g}")
    return {"sample": n_sample, "seed": seed, "eigen_hvps": eigen_hvps,
            "trace_samples": trace_samples, "top_eigenvalue": top.eigenvalue,
            "eigen_converged": top.converged, "eigen_hvps_used": top.iterations,
            "trace": trace.mean, "trace_stderr": trace.stderr,
            "seconds": time.monotonic() - started}


def merge(stored, key, entry):
    """sharpness.yaml's content with `entry` (measured at epoch `key`) merged in: records
    of other settings are kept, one with the same settings is replaced."""
    epochs = dict((stored or {}).get("epochs") or {})
    old = epochs.get(key) or {}
    merged = {"step": entry["step"]}
    for field, keys in (("sharpness", SHARPNESS_KEYS), ("curvature", CURVATURE_KEYS)):
        new = entry.get(field, [])
        settings = {tuple(r[k] for k in keys) for r in new}
        kept = [r for r in old.get(field, []) if tuple(r.get(k) for k in keys) not in settings]
        records = sorted(kept + new, key=lambda r: tuple(_sortable(r.get(k)) for k in keys))
        if records:
            merged[field] = records
    epochs[key] = merged
    return {"epochs": dict(sorted(epochs.items()))}


def _sortable(value):
    return (value is None, value if value is not None else 0)


def _epoch_key(epoch):
    """An epoch end as an int; a mid-epoch checkpoint as a float."""
    return int(epoch) if float(epoch).is_integer() else round(float(epoch), 6)


def _fmt_epoch(epoch):
    return str(_epoch_key(epoch))


# ---------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("run", "", "A run's --output_dir (holding config.yaml and "
                        "checkpoints/).")
    flags.DEFINE_integer("epoch", None, "Measure the checkpoint at the end of this epoch "
                         "(default: the newest).")
    flags.DEFINE_integer("sample", None, f"N training examples (seeded sample); default "
                         f"{DEFAULT_SAMPLE}, or the whole training set when smaller.")
    flags.DEFINE_list("epsilons", [f"{e:g}" for e in DEFAULT_EPSILONS], "Box sizes epsilon.")
    flags.DEFINE_integer("p", DEFAULT_P, "Random subspace dimension; 0 for the full space.")
    flags.DEFINE_integer("maxiter", DEFAULT_MAXITER, "L-BFGS-B iterations per epsilon.")
    flags.DEFINE_integer("seed", 0, "Seed of the sample, of A and of the curvature's "
                         "random vectors.")
    flags.DEFINE_boolean("curvature", False, "Also the top Hessian eigenvalue and a "
                         "Hutchinson trace estimate.")
    flags.DEFINE_integer("eigen_hvps", DEFAULT_EIGEN_HVPS, "--curvature: HVP cap of the "
                         "eigenvalue search (Lanczos).")
    flags.DEFINE_integer("trace_samples", DEFAULT_TRACE_SAMPLES, "--curvature: Rademacher "
                         "vectors of the trace estimate.")
    flags.DEFINE_enum("hvp_mode", "forward", ("forward", "reverse"), "--curvature: "
                      "forward-over-reverse (less memory) or nested tapes (faster to trace).")


def main(argv):
    del argv
    if not FLAGS.run:
        raise ConfigError("give --run=RUN_DIR (a run's --output_dir)")
    try:
        epsilons = [float(e) for e in FLAGS.epsilons]
    except ValueError:
        raise ConfigError(f"--epsilons={','.join(FLAGS.epsilons)} must be a comma list of "
                          f"numbers") from None
    if FLAGS.curvature and (FLAGS.eigen_hvps < 1 or FLAGS.trace_samples < 2):
        raise ConfigError("--eigen_hvps must be >= 1 and --trace_samples >= 2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    measure(FLAGS.run, epoch=FLAGS.epoch, sample=FLAGS.sample, epsilons=epsilons, p=FLAGS.p,
            maxiter=FLAGS.maxiter, seed=FLAGS.seed, curvature=FLAGS.curvature,
            eigen_hvps=FLAGS.eigen_hvps, trace_samples=FLAGS.trace_samples,
            hvp_mode=FLAGS.hvp_mode)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
