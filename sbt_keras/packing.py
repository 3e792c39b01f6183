"""Packed trials (`--pack=K|auto`): grid points that differ only in eta_tilde trained as one
program. TensorFlow-free: the flag, the grouping and its checks run before anything heavy
is imported; the packed model is `training/packed_model.py`, a pack's run
`training/packed.py`.

Which points pack together: every setting but the base learning rate (and the weight decay,
which a packed model also keeps per trial) must be equal -- model, data, m, BN batch,
epochs, schedule shape, and the seed. Trials that share m and the seed see the same batches
in the same order (common random numbers), so K of them can consume one input stream.
The seed fixes both the initial weights and the data order (`--seed`), so trials of
different seeds are never packed: that would need a separate data seed, which this code
does not have (a deliberate choice: a pack is then exactly K unpacked trials).

The grid is cut into packs of up to K such points, in grid order; `auto` packs every
column of eta_tilde whole. `--pack=1` is no packing at all: the ordinary sweep.

How a pack is computed (`--pack_formulation`, `formulation`): `separate`, K sub-graphs in
one step (training/packed_model.py), works for every model, norm and strategy;
`grouped`, one fused network with K weight sets (training/grouped.py), needs a model with a
fused builder and a per-channel norm; `auto` picks per device (see
`formulation`).
"""
from sbt_keras import models
from sbt_keras.config import EXECUTION_FIELDS, Config
from sbt_keras.errors import ConfigError

AUTO = "auto"
# Settings that may differ between the trials of one pack (output_dir is per trial).
PER_TRIAL = ("base_lr", "log2_base_lr", "weight_decay", "output_dir")
SEPARATE, GROUPED = "separate", "grouped"


def parse(text):
    """`--pack` as K (an int >= 1) or AUTO; ConfigError otherwise."""
    text = str(text).strip()
    if text == AUTO:
        return AUTO
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--pack={text} is not a number of trials; give K >= 1 (1: no "
                          f"packing) or auto") from None
    if k < 1:
        raise ConfigError(f"--pack={text} must be >= 1 (1: no packing) or auto")
    return k


def enabled(pack):
    return pack == AUTO or pack > 1


def key(cfg: Config):
    """What the trials of one pack must share: every setting but the per-trial ones."""
    return tuple(sorted((k, repr(v)) for k, v in cfg.to_dict().items()
                        if k not in PER_TRIAL and k not in EXECUTION_FIELDS))


def group(valid, pack):
    """Packs of the valid points [(point, config)]: lists of up to K (all, for AUTO) points
    with equal `key`, in grid order (a pack starts at its first point's place)."""
    columns = {}
    for point, cfg in valid:
        columns.setdefault(key(cfg), []).append((point, cfg))
    packs = []
    for column in columns.values():
        size = len(column) if pack == AUTO else pack
        packs.extend(column[i:i + size] for i in range(0, len(column), size))
    order = {point.name: i for i, (point, _) in enumerate(valid)}
    return sorted(packs, key=lambda p: order[p[0][0].name])


def name(members):
    """A pack's name: its points' names joined by '+' (a keras-tuner Choice value)."""
    return "+".join(point.name for point, _ in members)


def check_grid(base: Config, valid, pack):
    """Refuses a --pack that cannot pack anything, or asks for what packs cannot do."""
    if not enabled(pack):
        return
    check_formulation(base)
    defaults = Config()
    per_trial = [f"--{name}" for name in PER_TRIAL_INSTRUMENTS
                 if getattr(base, name) != getattr(defaults, name)]
    if per_trial:
        raise ConfigError(f"--pack with {', '.join(per_trial)}: packed trials do not measure "
                          f"the instruments yet; drop --pack or those settings")
    if all(len(p) == 1 for p in group(valid, pack)):
        raise ConfigError(
            f"--pack={pack}: no two points of this grid differ only in the base learning "
            f"rate, so nothing can share a program (points differing in m, BN batch, "
            f"epochs, norm or seed never do); sweep --grid_log2_base_lr, or drop --pack")


# Instruments that measure one network during training: not wired into packed trials.
PER_TRIAL_INSTRUMENTS = ("gns_every_steps", "sharpness", "sharpness_every", "init_from")


def grouped_refusal(cfg: Config):
    """Why the grouped formulation cannot run `cfg`'s pack (one line), or None."""
    fused_norms = models.spec(cfg.model).fused_norms
    if not fused_norms:
        return (f"--pack_formulation=grouped: --model={cfg.model} has no fused (grouped) "
                f"network (the CIFAR ResNets and alexnet_reduced do); use "
                f"--pack_formulation=separate or auto")
    if cfg.norm not in fused_norms:
        return (f"--pack_formulation=grouped: --norm={cfg.norm} is not per channel, so K "
                f"trials cannot share its layers (per-channel: {', '.join(fused_norms)}); "
                f"use --pack_formulation=separate or auto")
    return None


def check_formulation(cfg: Config):
    """ConfigError when --pack_formulation=grouped is asked for and cannot run."""
    reason = grouped_refusal(cfg)
    if cfg.pack_formulation == GROUPED and reason:
        raise ConfigError(reason)


# --pack_formulation=auto on a CPU: grouped up to this batch size, per norm (absent: never).
# Measured with K = 8, no XLA, on the shared 2-core Xeon (docs/bench_cpu.md, 2026-12-01).
# --norm=batch, busy machine, grouped vs separate ms/step: ResNet-20 m = 2: 157 vs 284,
# 4: 169 vs 204, 8: 176 vs 231, 16: 300 vs 301, 32: 569 vs 559; ResNet-8 m = 2: 28 vs 47,
# 8: 64 vs 88, 16: 132 vs 143, 32: 250 vs 239. One grouped kernel shares the per-kernel
# cost of the K trials' convs, which dominates at small m.
# --norm=none, quiet machine, no trial diverging (tools/bench_pack.py's FIRST_LOG2_LR),
# trials/h x one at a time, grouped vs separate: ResNet-20 m = 2: 1.61 vs 1.27, 4: 1.82 vs
# 1.44, 8: 1.18 vs 1.31, 16: 1.25 vs 1.33; ResNet-8 m = 2: 2.53 vs 1.37, 4: 1.43 vs 1.25,
# 8: 1.48 vs 1.39, 16: 1.28 vs 1.31.
# The reduced AlexNet, quiet machine (load 0.6-1.4), trials/h x one at a time, grouped vs
# separate: --norm=batch m = 2: 1.51 vs 1.22, 4: 1.69 vs 1.31, 8: 1.49 vs 1.35, 16: 1.18
# vs 1.14, 32: 1.17 vs 1.19; --norm=none m = 2: 1.34 vs 1.19, 4: 1.45 vs 1.47, 8: 1.26 vs
# 1.23, 16: 1.38 vs 1.31 (level from m = 4): the same crossovers serve. That is every
# model with a fused network; a new one should be measured before it relies on them.
CPU_GROUPED_MAX_BATCH = {"batch": 16, "none": 4}


def formulation(cfg: Config, device, trials):
    """SEPARATE or GROUPED for a pack of `trials` trials of `cfg` on `device` ("cpu",
    "gpu", "tpu"). `auto`: grouped on GPU/TPU (grouped convolutions are native there);
    on a CPU grouped only up to CPU_GROUPED_MAX_BATCH[norm], the measured crossover; separate
    wherever grouped cannot run (grouped_refusal) and for a single trial."""
    check_formulation(cfg)
    if trials < 2 or cfg.pack_formulation == SEPARATE:
        return SEPARATE
    if cfg.pack_formulation == GROUPED:
        return GROUPED
    if grouped_refusal(cfg):
        return SEPARATE
    if device in ("gpu", "tpu"):
        return GROUPED
    if cfg.batch_size <= CPU_GROUPED_MAX_BATCH.get(cfg.norm, 0):
        return GROUPED
    return SEPARATE


def check_pack(cfgs):
    """ConfigError unless the resolved configs `cfgs` can train as one program."""
    if not cfgs:
        raise ConfigError("a pack needs at least one trial")
    check_formulation(cfgs[0])
    first = cfgs[0].to_dict()
    for cfg in cfgs[1:]:
        other = cfg.to_dict()
        # Execution settings (steps per execution, XLA, strategy, ...) shape the compiled
        # program, so they must agree too.
        differ = [k for k in first if k not in PER_TRIAL and first[k] != other[k]]
        if differ:
            shown = ", ".join(f"{k} {first[k]!r} vs {other[k]!r}" for k in differ[:3])
            raise ConfigError(
                f"trials {cfgs[0].output_dir} and {cfg.output_dir} cannot share a program "
                f"({shown}); only {', '.join(PER_TRIAL[:3])} may differ within a pack")
    outs = [c.output_dir for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"two trials of a pack write to the same --output_dir "
                          f"({sorted(o for o in outs if outs.count(o) > 1)[0]})")


def single_run_refused(pack):
    """--pack given to a single run (no grid)."""
    if enabled(pack):
        raise ConfigError(f"--pack={pack} packs the points of a sweep; give --grid_* flags "
                          f"(e.g. --grid_log2_base_lr) or drop --pack")

