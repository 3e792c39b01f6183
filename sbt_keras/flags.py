"""absl flags derived from the `Config` declarations, and the one place flags become a Config.

Flags are defined on a given `FlagValues` so tests can parse argv without touching the
global FLAGS. Every flag name equals a `Config` field (plus `--flagfile`, which absl
provides, and the sweep flags below); `--helpfull` lists them under their groups.
"""
import dataclasses
import re
import typing

from absl import flags

from sbt_keras import grid as grid_lib
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError

# absl lists --helpfull by the module that defined each flag: a name per group makes that
# listing read by topic.
HELP_MODULE = "sbt_keras ({})"


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per `Config` field on `fv`, from the field's declaration."""
    for field in dataclasses.fields(Config):
        _define(field, fv)


def _define(field, fv):
    meta = field.metadata
    name, default, help_text = field.name, field.default, meta["help"]
    where = dict(flag_values=fv, module_name=HELP_MODULE.format(meta["group"]))
    kind = _kind(field)
    if meta["choices"]:
        flags.DEFINE_enum(name, default, meta["choices"], help_text, **where)
    elif kind is tuple:
        flags.DEFINE_list(name, [str(v) for v in default], help_text, **where)
    else:
        define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
        define(name, default, help_text, **where)


def _kind(field):
    """bool, int, float, str or tuple: the field's type without Optional[...]."""
    kind = field.type
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind, = (t for t in typing.get_args(kind) if t is not type(None))
    return typing.get_origin(kind) or kind


# --seeds=N sweeps the seed; every other axis has a --grid_<axis> flag.
GRID_FLAGS = tuple(axis for axis in grid_lib.AXES if axis != "seed")


def define_sweep_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """`--grid_*` flags: giving any of them turns the command into a keras-tuner grid."""
    where = dict(flag_values=fv, module_name=HELP_MODULE.format("sweep"))
    for field in GRID_FLAGS:
        flags.DEFINE_string(f"grid_{field}", "", f"Sweep --{field} over these values: "
                            f"{grid_lib.AXIS_EXAMPLES[field]}.", **where)
    flags.DEFINE_string("grid_best_lr_from", "",
                        "A finished sweep's output_dir: each point uses the log2 base learning "
                        "rate that was best for its batch size there (paper Fig. 13-14).",
                        **where)
    flags.DEFINE_integer("sweep_workers", 1,
                         "Run this many trials at once on this machine (keras-tuner chief + N "
                         "worker processes; GPU memory grows as needed).", **where)
    flags.DEFINE_string("pack", "1",
                        "Train up to K grid points that differ only in the base learning rate "
                        "as one program (packed trials, each still its own run directory and "
                        "results row); 'auto' packs each eta_tilde column whole; 1 = no "
                        "packing.", **where)
    flags.DEFINE_integer("seeds", 1, "Repeat every grid point with seeds --seed, --seed+1, "
                         "...; more than 1 makes the seed a grid axis.", **where)


def define_command_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """How the command behaves and what it prints; not settings of a run (never recorded)."""
    where = dict(flag_values=fv, module_name=HELP_MODULE.format("command"))
    flags.DEFINE_boolean("dry_run", False, "Print the resolved settings (one run) or every grid "
                         "point, valid or skipped and why, with its steps and estimated time "
                         "(a sweep), then exit without training or importing TensorFlow.",
                         **where)
    flags.DEFINE_boolean("verbose", False, "Log lines with absl's prefix (level, time, thread, "
                         "file:line), and TensorFlow's start-up messages unfiltered.", **where)
    flags.DEFINE_float("progress_seconds", 30.0, "Seconds between progress lines (steps, "
                       "steps/s, ETA) when stderr is not a terminal; 0: none. On a terminal "
                       "a progress bar is drawn instead.", lower_bound=0.0, **where)


def grid_texts_from_flags(fv: flags.FlagValues = flags.FLAGS) -> dict:
    return {field: fv[f"grid_{field}"].value for field in GRID_FLAGS}


LEARNING_RATE_FLAGS = ("base_lr", "log2_base_lr")


def config_from_flags(fv: flags.FlagValues = flags.FLAGS, argv=()) -> Config:
    """The unresolved Config holding exactly what the flags say.

    `argv` is the command line as typed (flagfiles not expanded). A learning rate given
    there replaces the other form of it from a flagfile, so
    `--flagfile=experiments/cifar10.flags --base_lr=0.01` works although the flagfile
    sets --log2_base_lr; both forms on the command line (or both in flagfiles) stay an
    error.
    """
    values = {}
    for field in dataclasses.fields(Config):
        value = fv[field.name].value
        if _kind(field) is tuple:  # Tuple[float, ...] from a comma list
            value = _numbers(field.name, value, typing.get_args(field.type)[0])
        values[field.name] = value
    typed = [name for name in LEARNING_RATE_FLAGS if _on_command_line(name, argv)]
    if len(typed) == 1 and None not in (values["base_lr"], values["log2_base_lr"]):
        other, = set(LEARNING_RATE_FLAGS) - set(typed)
        values[other] = None
    return Config(**values)


def _on_command_line(name, argv):
    """Whether --name (or -name) appears among the typed arguments."""
    pattern = re.compile(rf"^--?{name}(=|$)")
    return any(pattern.match(arg) for arg in argv[1:])


def _numbers(flag, items, kind):
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ConfigError(f"--{flag}={','.join(items)} must be a comma list of "
                          f"{kind.__name__} values") from None
