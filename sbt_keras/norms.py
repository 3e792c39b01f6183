"""What each `--norm` is and which options it reads, without importing TensorFlow or Keras.

`sbt_keras.config` validates a run's settings before TensorFlow loads, so the facts it needs
about the normalization layers live here; `sbt_keras.layers` builds the layers themselves
and reuses `check_options` so both report the same messages. docs/normalization.md has
the formulas.
"""


# Components a "mix" layer can combine, in canonical order: a mix layer stores its
# components in this order whatever order they were given in, so weight k always means the
# same component (with 2 components, alpha_0 = sigmoid(z) belongs to the first).
MIX_COMPONENTS = ("batch", "instance", "layer")

# Norms whose training statistics can depend on other examples of the batch. "mix" is
# listed because its default components include "batch"; `uses_batch_statistics` gives the
# exact answer for a particular `mix_norms`.
BATCH_STAT_NORMS = frozenset({"batch", "batch_renorm", "mix"})

# Norms that need spatial [N, H, W, C] inputs: their statistics over (H, W) per example
# and channel are a single value for a dense [N, C] activation.
SPATIAL_ONLY_NORMS = frozenset({"instance"})

# Every option a norm factory understands, with its default.
DEFAULT_OPTIONS = {
    "bn_batch_size": None,        # examples per statistics group; None = the replica batch
    "momentum": 0.99,             # moving statistics: m * old + (1 - m) * new
    "epsilon": 1e-3,              # added to every variance before the square root
    "synchronized": False,        # "batch" only: statistics over all replicas' examples
    "moving_variance": "unbiased",  # "unbiased" (x count/(count-1)) or "biased"
    "gn_groups": 32,              # "group": channel groups (Wu & He 2018); must divide C
    "renorm_r_max": 3.0,          # "batch_renorm": final r_max (Ioffe 2017: 3)
    "renorm_d_max": 5.0,          # "batch_renorm": final d_max (Ioffe 2017: 5)
    "renorm_start_step": 5000,    # r_max = 1 and d_max = 0 up to this training step
    "renorm_r_end_step": 40000,   # r_max reaches renorm_r_max here
    "renorm_d_end_step": 25000,   # d_max reaches renorm_d_max here
    "mix_norms": ("batch", "layer"),  # "mix": 2 or 3 of MIX_COMPONENTS
    "mix_per_channel": False,     # "mix": one set of mixing weights per channel
}
OPTION_NAMES = tuple(DEFAULT_OPTIONS)

_RENORM_OPTIONS = ("renorm_r_max", "renorm_d_max", "renorm_start_step", "renorm_r_end_step",
                   "renorm_d_end_step")

# The options each norm reads; the others are accepted and ignored. For "mix",
# bn_batch_size, momentum and moving_variance matter only when mix_norms includes "batch".
NORM_OPTIONS = {
    "none": (),
    "batch": ("bn_batch_size", "momentum", "epsilon", "synchronized", "moving_variance"),
    "batch_renorm": ("bn_batch_size", "momentum", "epsilon", "moving_variance")
                    + _RENORM_OPTIONS,
    "group": ("epsilon", "gn_groups"),
    "instance": ("epsilon",),
    "layer": ("epsilon",),
    "mix": ("bn_batch_size", "momentum", "epsilon", "moving_variance", "mix_norms",
            "mix_per_channel"),
}

# Every name `--norm` accepts, in the order help texts list them: the one list of norms
# (sbt_keras.layers builds its registry from it).
NORM_NAMES = tuple(NORM_OPTIONS)

MOVING_VARIANCE_CHOICES = ("unbiased", "biased")


def uses_batch_statistics(name, mix_norms=None):
    """Whether `--norm=name` normalizes an example with statistics of other examples."""
    if name == "mix":
        components = DEFAULT_OPTIONS["mix_norms"] if mix_norms is None else mix_norms
        return "batch" in tuple(components)
    return name in BATCH_STAT_NORMS


def needs_spatial_inputs(name, mix_norms=None):
    """Whether `--norm=name` cannot normalize dense [N, C] activations."""
    if name == "mix":
        components = DEFAULT_OPTIONS["mix_norms"] if mix_norms is None else mix_norms
        return "instance" in tuple(components)
    return name in SPATIAL_ONLY_NORMS


def mix_components(mix_norms):
    """`mix_norms` checked and put in MIX_COMPONENTS order; raises ValueError."""
    if isinstance(mix_norms, str):
        mix_norms = tuple(part for part in mix_norms.split(",") if part)
    given = tuple(mix_norms)
    unknown = [c for c in given if c not in MIX_COMPONENTS]
    if unknown:
        raise ValueError(f"mix_norms={','.join(given)}: unknown component(s) "
                         f"{', '.join(unknown)}; choose 2 or 3 "
                         f"of {', '.join(MIX_COMPONENTS)}")
    if len(set(given)) != len(given) or not 2 <= len(given) <= 3:
        raise ValueError(f"mix_norms={','.join(given)}: give 2 or 3 different components of "
                         f"{', '.join(MIX_COMPONENTS)}")
    return tuple(c for c in MIX_COMPONENTS if c in given)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(name, **options):
    """Raises ValueError for an option value `--norm=name` cannot use.

    Only the options `name` reads are checked, and only what is known without the model:
    that `gn_groups` divides a layer's channels is checked when the layer is made.
    """
    used = {key: options.get(key, DEFAULT_OPTIONS[key]) for key in NORM_OPTIONS.get(name, ())}
    if "bn_batch_size" in used:
        size = used["bn_batch_size"]
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(f"bn_batch_size must be a positive integer or None, got {size!r}")
    if "momentum" in used and not 0.0 <= used["momentum"] < 1.0:
        raise ValueError(f"momentum={used['momentum']} must be in [0, 1)")
    if "epsilon" in used and not used["epsilon"] > 0:
        raise ValueError(f"epsilon={used['epsilon']} must be > 0")
    if "moving_variance" in used and used["moving_variance"] not in MOVING_VARIANCE_CHOICES:
        raise ValueError(f"moving_variance={used['moving_variance']!r} must be one of "
                         f"{', '.join(MOVING_VARIANCE_CHOICES)}")
    if "gn_groups" in used and (not _is_int(used["gn_groups"]) or used["gn_groups"] < 1):
        raise ValueError(f"gn_groups={used['gn_groups']!r} must be a positive integer")
    if name == "batch_renorm":
        if not used["renorm_r_max"] >= 1.0:
            raise ValueError(f"renorm_r_max={used['renorm_r_max']} must be >= 1")
        if not used["renorm_d_max"] >= 0.0:
            raise ValueError(f"renorm_d_max={used['renorm_d_max']} must be >= 0")
        start = used["renorm_start_step"]
        if not _is_int(start) or start < 0:
            raise ValueError(f"renorm_start_step={start!r} must be an integer >= 0")
        for key in ("renorm_r_end_step", "renorm_d_end_step"):
            if not _is_int(used[key]) or used[key] < start:
                raise ValueError(f"{key}={used[key]!r} must be an integer >= "
                                 f"renorm_start_step={start}")
    if name == "mix":
        mix_components(used["mix_norms"])


def check_groups(channels, gn_groups, layer_name=None):
    """Raises ValueError unless `gn_groups` divides `channels` ("group" norm)."""
    if channels is None:
        raise ValueError(f"{layer_name or 'group norm'}: norm 'group' needs the channel count")
    if channels % gn_groups:
        raise ValueError(
            f"{layer_name or 'group norm'}: gn_groups={gn_groups} does not divide its "
            f"{channels} channels; choose a --gn_groups that divides every normalized "
            f"layer's channel count")
