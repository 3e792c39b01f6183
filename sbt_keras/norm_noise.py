"""How noisy normalization statistics are: each layer's statistics from small groups of
examples (batch norm with BN batch size n) or from one example (layer, instance, group
norm), against the same statistics over a large reference sample.

    moments = norm_noise.measure(network, images)          # one pass per calibrated layer
    rows = norm_noise.table_rows(moments, sizes=[1, 2, 4, ..., 256], gn_groups=8)

What is measured (docs/normalization.md, "Statistics noise", has the reading):

1. **Activations.** For every normalization layer of the network, its input (for a network
   without normalization, the output of every Conv2D and of every Dense layer that is not
   an output: where a norm would go). They are collected with a multi-output sub-model
   run over the reference images in chunks, and each chunk is reduced at once, in float64,
   to per example and channel sums over the pixels (`LayerMoments`): nothing bigger than a
   chunk's activations is ever held.
2. **Forward mode.** `forward="reference"` (default) runs the network in inference mode
   with every batch-statistics norm (batch, batch_renorm, the batch part of mix, Keras
   BatchNormalization) given the statistics of its own input over the whole reference
   sample as its moving statistics, calibrated layer by layer in network order: the
   network batch norm computes with an infinitely large BN batch, whose statistics are
   what the small groups' statistics estimate. At initialisation this is the only sensible
   choice (the moving statistics are still 0 and 1). `forward="inference"` uses the
   moving statistics the network holds (a trained run as it is evaluated). Either way
   each layer's input is computed with exact statistics upstream: the noise measured is
   the noise each layer adds on its own, not the noise compounded through noisy upstream
   layers in a small-batch training step.
3. **Reference statistics.** Per channel c: mean mu_c and biased variance sigma2_c over
   all E examples x H x W pixels of the reference sample.
4. **Batch norm, BN batch size n.** The sample (in a seeded random order, as shuffled SGD
   batches are) is cut into G = E // n consecutive groups of n examples; each group g has
   per channel the mean mu_gc and variance over its N = n x H x W values. Reported, as
   means over groups and channels:
   - `var_err`  E[(v_gc - sigma2_c)^2 / sigma2_c^2] with v_gc the unbiased (Bessel,
     N/(N-1)) variance: the estimate whose Gaussian error is 2/(N-1);
   - `var_err_biased` the same with the biased variance the forward pass divides by
     (Gaussian: (2N-1)/N^2; it differs from var_err only when N is small);
   - `mean_err` E[(mu_gc - mu_c)^2 / sigma2_c] (i.i.d. values, any distribution: 1/N).
   The reference contains the group itself, which pulls the two together: for the mean of
   independent examples E[(mu_g - mu_ref)^2] = (1 - n/E) Var(mu_g) exactly, so every error
   is divided by (1 - n/E) (first order for the variance). Hence n <= E/2 (two groups).
5. **Gaussian theory.** Pixels of one image are correlated, so the number N of
   independent values behind a group's statistic lies between n (all pixels of an
   example identical: `theory_var_n` = 2/(n-1)) and n x H x W (independent pixels:
   `theory_var_N` = 2/(nHW-1)). `eff_values` = 2/var_err + 1 is the N a Gaussian
   measurement implies; `eff_per_example` = eff_values / n. Non-Gaussian values have a
   larger error for the same N: `theory_var_N_kurtosis` = (kappa - (N-3)/(N-1))/N is the
   exact independent-values error for kurtosis kappa (3 for a Gaussian), kappa measured
   per channel over the reference sample and averaged. None of these lines is a strict
   bound for real activations; they are the two ends of the independence scale for
   Gaussian values.
6. **Layer, instance, group norm.** Their statistics are per example, so they do not
   depend on n at all. For each example and channel group (layer: all C channels, one
   group; instance: each channel; group: C/G channels each, G = `gn_groups`) the mean and
   variance over its N = (C/G) x H x W values are compared in the same way with the same
   statistic over the whole sample (all examples x pixels x the group's channels), divided
   by (1 - 1/E). Their Gaussian line is 2/(N-1) with that N. Unlike batch norm's, this
   deviation is not noise from the choice of batch mates: it is a fixed function of the
   example (every example always gets the same statistics), mostly genuine differences
   between images (contrast, colour), and the i.i.d. line says little about it.

`table_rows` also averages every number over the layers (arithmetically; nan where some
layer has no estimate, e.g. a dense layer's variance at n = 1). Everything but
`find_sites`, `plan`, `collect` and `measure` is numpy only; those import TensorFlow when
called.
"""
import dataclasses
import math

import numpy as np

from sbt_keras.errors import ConfigError

EXAMPLE_KINDS = ("layer", "instance", "group")
KINDS = ("batch",) + EXAMPLE_KINDS

# Long-form table columns (CSV), in order.
COLUMNS = (
    "layer", "source", "kind", "height", "width", "channels", "channels_used", "norm",
    "gn_groups", "n", "values_per_stat", "samples", "var_err", "var_err_stderr",
    "var_err_biased", "mean_err", "theory_var_n", "theory_var_N", "theory_var_N_kurtosis",
    "theory_var_biased_N", "theory_mean_n", "theory_mean_N", "eff_values",
    "eff_per_example", "kurtosis",
)
MEAN_LAYER = "(mean over layers)"


# ------------------------------------------------------------------------------ theory
def gaussian_variance_error(count):
    """E[(s^2 - sigma^2)^2] / sigma^4 of the unbiased variance s^2 of `count` i.i.d.
    Gaussian values: 2/(count - 1); nan for count <= 1 (no estimate)."""
    return 2.0 / (count - 1) if count > 1 else math.nan


def gaussian_biased_variance_error(count):
    """The same for the biased variance (divide by `count`): (2 count - 1)/count^2."""
    return (2.0 * count - 1.0) / count ** 2 if count >= 1 else math.nan


def variance_error_with_kurtosis(count, kurtosis):
    """Var(s^2)/sigma^4 of the unbiased variance of `count` i.i.d. values of kurtosis
    `kurtosis` (E[(x-mu)^4]/sigma^4; 3 for a Gaussian): (kappa - (N-3)/(N-1)) / N."""
    if count <= 1:
        return math.nan
    return (kurtosis - (count - 3.0) / (count - 1.0)) / count


def effective_count(var_err):
    """The number of i.i.d. Gaussian values whose unbiased variance has squared relative
    error `var_err`: 2/var_err + 1 (the inverse of gaussian_variance_error)."""
    return 2.0 / var_err + 1.0 if var_err > 0 and math.isfinite(var_err) else math.nan


# ------------------------------------------------------------------------------ sizes
def parse_sizes(text, reference):
    """BN batch sizes from "1:256" (every power of two from 1 to 256) or "1,4,16".

    Each must be a power of two and leave at least two groups in the reference sample
    (n <= reference / 2: a single group would be the reference itself). ConfigError
    otherwise, naming the flag.
    """
    text = str(text).strip()
    try:
        parts = [int(part) for part in text.split(":" if ":" in text else ",")
                 if part.strip()]
    except ValueError:
        parts = None
    if parts is None or (":" in text and len(parts) != 2):
        raise ConfigError(f"--sizes={text} is not a range LOW:HIGH or a list of integers, "
                          f"e.g. 1:256 or 1,4,16")
    if ":" in text:
        low, high = parts
        if not (_power_of_two(low) and _power_of_two(high)) or low > high:
            raise ConfigError(f"--sizes={text}: a range LOW:HIGH needs powers of two "
                              f"with LOW <= HIGH, e.g. 1:256")
        sizes = [2 ** k for k in range(low.bit_length() - 1, high.bit_length())]
    else:
        sizes = sorted(set(parts))
    if not sizes:
        raise ConfigError("--sizes is empty; give e.g. 1:256")
    bad = [n for n in sizes if not _power_of_two(n)]
    if bad:
        raise ConfigError(f"--sizes={text}: {', '.join(map(str, bad))} not a power of two; "
                          f"BN batch sizes are 1, 2, 4, ...")
    too_big = [n for n in sizes if 2 * n > reference]
    if too_big:
        raise ConfigError(f"--sizes={text}: {', '.join(map(str, too_big))} leaves fewer than "
                          f"two groups in the --reference={reference} sample; use sizes up "
                          f"to {reference // 2} or a larger --reference")
    return sizes


def _power_of_two(n):
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


# ------------------------------------------------------------------------------ moments
@dataclasses.dataclass
class LayerMoments:
    """One measured activation's per-example, per-channel sums, float64.

    With d = x - shift_c (shift: a per-channel value near the mean, taken from the first
    chunk, so that sums of squares do not cancel), over the `height` x `width` pixels of
    each example: s1[e, c] = sum d, s2[e, c] = sum d^2; over everything: p3[c] = sum d^3,
    p4[c] = sum d^4 (kurtosis only). A dense activation has height = width = 1.
    """
    name: str
    source: str  # "norm input", "conv output" or "dense output"
    height: int
    width: int
    shift: np.ndarray  # [C]
    s1: np.ndarray  # [E, C]
    s2: np.ndarray  # [E, C]
    p3: np.ndarray  # [C]
    p4: np.ndarray  # [C]
    spatial: bool = True  # False for a dense [N, C] activation

    @property
    def kind(self):
        return "conv" if self.spatial else "dense"

    @property
    def examples(self):
        return self.s1.shape[0]

    @property
    def channels(self):
        return self.s1.shape[1]

    @property
    def pixels(self):
        return self.height * self.width

    def reference(self):
        """(mean [C], biased variance [C]) over the whole sample, in activation units."""
        count = self.examples * self.pixels
        m1 = self.s1.sum(0) / count
        return self.shift + m1, np.maximum(self.s2.sum(0) / count - m1 ** 2, 0.0)

    def kurtosis(self):
        """E[(x - mu)^4] / sigma^4 per channel over the whole sample (nan if constant)."""
        count = self.examples * self.pixels
        m1, m2 = self.s1.sum(0) / count, self.s2.sum(0) / count
        m3, m4 = self.p3 / count, self.p4 / count
        var = m2 - m1 ** 2
        mu4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(var > 0, mu4 / var ** 2, np.nan)

    def live_channels(self):
        """Channels whose reference variance is not (numerically) zero."""
        _, var = self.reference()
        return var > 1e-12 * max(float(var.max()), 1e-300)

    def batch_errors(self, n):
        """Errors of the statistics of consecutive groups of `n` examples (module doc, 4)."""
        groups = self.examples // n
        used = self.examples - self.examples % n
        live = self.live_channels()
        t1 = self.s1[:used, live].reshape(groups, n, -1).sum(1)
        t2 = self.s2[:used, live].reshape(groups, n, -1).sum(1)
        result = _deviations(t1, t2, n * self.pixels, self.s1[:, live].sum(0),
                             self.s2[:, live].sum(0), self.examples * self.pixels,
                             1.0 - n / self.examples)
        return dict(result, n=n, values_per_stat=n * self.pixels,
                    samples=groups * int(live.sum()), channels_used=int(live.sum()))

    def example_errors(self, kind, gn_groups=None):
        """Errors of per-example statistics (module doc, 6) for `kind` in EXAMPLE_KINDS;
        None where the kind does not apply: instance on a dense activation, group where
        `gn_groups` does not divide the channels."""
        channels = self.channels
        groups = {"layer": 1, "instance": channels, "group": gn_groups}[kind]
        if kind == "group" and (not gn_groups or channels % gn_groups):
            return None
        per_group = channels // groups
        count = per_group * self.pixels
        if count <= 1:  # instance (or one channel per group) on a dense activation
            return None
        # Sums about one shift per channel group: move each channel's sums from its own
        # shift to the group's mean shift h (d_c = shift_c - h).
        shift = self.shift.reshape(groups, per_group)
        offset = (shift - shift.mean(1, keepdims=True)).reshape(-1)
        pixels = self.pixels
        u1 = self.s1 + pixels * offset
        u2 = self.s2 + 2 * offset * self.s1 + pixels * offset ** 2
        t1 = u1.reshape(self.examples, groups, per_group).sum(2)
        t2 = u2.reshape(self.examples, groups, per_group).sum(2)
        result = _deviations(t1, t2, count, t1.sum(0), t2.sum(0), self.examples * count,
                             1.0 - 1.0 / self.examples)
        return dict(result, values_per_stat=count, samples=int(np.isfinite(t1).sum()),
                    gn_groups=groups if kind == "group" else "",
                    channels_used=channels)


def _deviations(t1, t2, count, total1, total2, total_count, shared):
    """Squared relative errors of the statistics of samples [S, K] of `count` values each
    (sums t1 = sum d, t2 = sum d^2) against the statistics of all `total_count` values
    (sums total1, total2 [K]), divided by `shared` = 1 - (sample share of the reference)."""
    ref_mean = total1 / total_count
    ref_var = total2 / total_count - ref_mean ** 2
    mean = t1 / count
    biased = np.maximum(t2 / count - mean ** 2, 0.0)
    unbiased = biased * count / (count - 1) if count > 1 else np.full_like(biased, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = ref_var > 0
        var_rel = ((unbiased - ref_var) / ref_var)[:, keep] ** 2
        biased_rel = ((biased - ref_var) / ref_var)[:, keep] ** 2
        mean_rel = (mean - ref_mean)[:, keep] ** 2 / ref_var[keep]
    per_sample = var_rel.mean(1) / shared
    samples = len(per_sample)
    stderr = (float(per_sample.std(ddof=1) / math.sqrt(samples)) if samples > 1
              and count > 1 else math.nan)
    return dict(var_err=float(per_sample.mean()), var_err_stderr=stderr,
                var_err_biased=float(biased_rel.mean() / shared),
                mean_err=float(mean_rel.mean() / shared))


class MomentAccumulator:
    """Builds LayerMoments chunk by chunk: `add` reduces each activation chunk [b, H, W, C]
    or [b, C] (numpy or a tensor) at once, in float64, to its per-example sums."""

    def __init__(self, name, source="norm input"):
        self.name, self.source = name, source
        self.shift = None
        self.s1, self.s2, self.p3, self.p4 = [], [], 0.0, 0.0
        self.height = self.width = 1
        self.spatial = True

    def add(self, chunk):
        a = np.asarray(chunk).astype(np.float64)
        if a.ndim == 4:
            self.height, self.width = a.shape[1:3]
        elif a.ndim == 2:
            self.spatial = False
        else:
            raise ValueError(f"{self.name}: activations of shape {a.shape} are neither "
                             f"[N, H, W, C] nor [N, C]")
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if self.shift is None:
            self.shift = a.mean((0, 1))
        d = a - self.shift
        sq = d * d
        self.s1.append(d.sum(1))
        self.s2.append(sq.sum(1))
        self.p3 = self.p3 + (sq * d).sum((0, 1))
        self.p4 = self.p4 + (sq * sq).sum((0, 1))

    def result(self):
        if self.shift is None:
            raise ValueError(f"{self.name}: no activations")
        return LayerMoments(name=self.name, source=self.source, height=self.height,
                            width=self.width, shift=self.shift, s1=np.concatenate(self.s1),
                            s2=np.concatenate(self.s2), p3=self.p3, p4=self.p4,
                            spatial=self.spatial)


def accumulate(name, batches, source="norm input"):
    """LayerMoments from an iterable of activation chunks (see MomentAccumulator)."""
    acc = MomentAccumulator(name, source)
    for chunk in batches:
        acc.add(chunk)
    return acc.result()


# ------------------------------------------------------------------------------ network
@dataclasses.dataclass
class Site:
    """One measured activation: `tensor` (symbolic) of the functional network."""
    name: str
    source: str
    tensor: object
    layer: object = None  # the normalization layer, if `tensor` is its input
    calibrate: bool = False  # a norm with moving statistics used at inference


def find_sites(network):
    """The activations to measure, in network (topological) order: the input of every
    normalization layer; for a network without any, the output of every Conv2D and every
    Dense layer whose output is not a network output. Top-level layers only."""
    import keras

    from sbt_keras.layers import (BatchRenormalization, ExampleNormalization,
                                  MixedNormalization, SubBatchNormalization)

    norm_types = (SubBatchNormalization, BatchRenormalization, ExampleNormalization,
                  MixedNormalization, keras.layers.BatchNormalization)
    sites = []
    for layer in network.layers:
        if isinstance(layer, norm_types):
            calibrate = (not isinstance(layer, ExampleNormalization)
                         and (not isinstance(layer, MixedNormalization)
                              or "batch" in layer.components))
            sites.append(Site(layer.name, "norm input", layer.input, layer, calibrate))
    if sites:
        return sites
    outputs = list(network.outputs)
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            sites.append(Site(layer.name, "conv output", layer.output))
        elif isinstance(layer, keras.layers.Dense) and not any(
                layer.output is t for t in outputs):
            sites.append(Site(layer.name, "dense output", layer.output))
    return sites


def plan(network, examples, forward="reference"):
    """What `measure` will cost: {sites, passes, values_per_example, examples, layers}
    (passes: with forward="reference" one forward pass over a prefix of the network per
    calibrated layer, plus one for any layers after the last; else one)."""
    sites = find_sites(network)
    values = sum(int(np.prod(s.tensor.shape[1:])) for s in sites)
    calibrated = [i for i, s in enumerate(sites) if s.calibrate and forward == "reference"]
    passes = len(calibrated) + (1 if not calibrated or calibrated[-1] < len(sites) - 1 else 0)
    return dict(sites=len(sites), passes=passes, values_per_example=values,
                examples=examples, layers=[s.name for s in sites])


def collect(network, images, sites, chunk=256):
    """LayerMoments of `sites` over `images`, with the network in inference mode, run in
    chunks of `chunk` examples through one multi-output sub-model; each chunk's
    activations are reduced before the next chunk runs."""
    import keras
    import tensorflow as tf

    sub = keras.Model(network.inputs, [s.tensor for s in sites])
    accumulators = [MomentAccumulator(s.name, s.source) for s in sites]
    for start in range(0, len(images), chunk):
        # Eager: a new sub-model per pass would retrace a tf.function every time, and
        # a chunk's convolutions dwarf the per-layer Python overhead.
        got = sub(tf.convert_to_tensor(images[start:start + chunk]), training=False)
        for acc, activation in zip(accumulators, got if isinstance(got, (list, tuple))
                                   else [got]):
            acc.add(activation)
    return [acc.result() for acc in accumulators]


def measure(network, images, *, chunk=256, forward="reference", restore=True):
    """LayerMoments of every site (`find_sites`) of `network` over `images` (float32,
    standardized as in training), in network order.

    forward="reference": every batch-statistics norm first gets its input's statistics
    over `images` as moving statistics (biased variance), in network order, so that each
    measured input is computed as with an infinitely large BN batch; the input of the
    layer being calibrated is measured in the same pass (it does not depend on that layer
    or later ones), so a network with L such layers costs L forward passes over prefixes
    of the network. The original moving statistics are put back afterwards unless
    `restore` is False. forward="inference": one pass with the moving statistics as held.
    """
    if forward not in ("reference", "inference"):
        raise ValueError(f"forward={forward!r} must be 'reference' or 'inference'")
    sites = find_sites(network)
    if not sites:
        raise ValueError(f"{network.name}: no normalization, Conv2D or hidden Dense layer "
                         f"to measure")
    if forward == "inference":
        return collect(network, images, sites, chunk)
    saved = [(s.layer.moving_mean, s.layer.moving_mean.numpy(), s.layer.moving_variance,
              s.layer.moving_variance.numpy()) for s in sites if s.calibrate]
    measured, pending = [], []
    try:
        for site in sites:
            pending.append(site)
            if site.calibrate:
                measured += collect(network, images, pending, chunk)
                pending = []
                mean, variance = measured[-1].reference()
                site.layer.moving_mean.assign(mean.astype(np.float32))
                site.layer.moving_variance.assign(variance.astype(np.float32))
        if pending:
            measured += collect(network, images, pending, chunk)
    finally:
        if restore:
            for mean_var, mean, variance_var, variance in saved:
                mean_var.assign(mean)
                variance_var.assign(variance)
    return measured


# ------------------------------------------------------------------------------ table
def table_rows(moments, sizes, kinds=KINDS, gn_groups=8):
    """Long-form rows (dicts with COLUMNS keys) for every measured layer: one per BN batch
    size n for "batch", one (n empty: any n) per per-example kind, then the arithmetic
    means over layers (layer = MEAN_LAYER, source = how many layers) of each (kind, n).
    A kind that does not apply to a layer (instance on dense, group where gn_groups does
    not divide the channels) gets no row for it."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    rows = []
    for m in moments:
        live = m.live_channels()
        kappa = float(np.nanmean(m.kurtosis()[live])) if live.any() else math.nan
        base = dict(layer=m.name, source=m.source, kind=m.kind, height=m.height,
                    width=m.width, channels=m.channels, kurtosis=kappa)
        for kind in kinds:
            if kind == "batch":
                for n in sizes:
                    got = m.batch_errors(n)
                    count = got["values_per_stat"]
                    eff = effective_count(got["var_err"])
                    rows.append(dict(
                        base, **got, norm="batch", gn_groups="",
                        theory_var_n=gaussian_variance_error(n),
                        theory_var_N=gaussian_variance_error(count),
                        theory_var_N_kurtosis=variance_error_with_kurtosis(count, kappa),
                        theory_var_biased_N=gaussian_biased_variance_error(count),
                        theory_mean_n=1.0 / n, theory_mean_N=1.0 / count,
                        eff_values=eff, eff_per_example=eff / n))
            else:
                got = m.example_errors(kind, gn_groups)
                if got is None:
                    continue
                count = got["values_per_stat"]
                rows.append(dict(
                    base, **got, norm=kind, n="",
                    theory_var_n="", theory_var_N=gaussian_variance_error(count),
                    theory_var_N_kurtosis=variance_error_with_kurtosis(count, kappa),
                    theory_var_biased_N=gaussian_biased_variance_error(count),
                    theory_mean_n="", theory_mean_N=1.0 / count,
                    eff_values=effective_count(got["var_err"]), eff_per_example=""))
    return rows + mean_rows(rows)


# var_err_stderr of a mean row is the layers' mean standard error: the typical Monte-Carlo
# error of one layer's value (the layers share their examples, so their mean is not much
# more precise than one of them).
_AVERAGED = ("var_err", "var_err_stderr", "var_err_biased", "mean_err", "theory_var_n",
             "theory_var_N", "theory_var_N_kurtosis", "theory_var_biased_N", "theory_mean_n",
             "theory_mean_N", "eff_per_example", "kurtosis")


def mean_rows(rows):
    """Arithmetic means over layers of each (norm, n) of per-layer `rows` (the standard
    error too: see _AVERAGED)."""
    groups = {}
    for r in rows:
        if r["layer"] != MEAN_LAYER:
            groups.setdefault((r["norm"], r["n"]), []).append(r)
    out = []
    for (norm, n), members in groups.items():
        row = dict(layer=MEAN_LAYER, source=f"{len(members)} layers", norm=norm, n=n,
                   gn_groups=members[0]["gn_groups"])
        for key in _AVERAGED:
            values = [r[key] for r in members if r.get(key) not in ("", None)]
            row[key] = float(np.mean(values)) if values else ""
        out.append(row)
    return out
