"""The run configuration: one frozen dataclass, built once from flags and validated up front.

Each setting is declared once, as a `Config` field made by `setting()`: its default, help
text, help group, choices, and whether it is an execution-only setting or a TensorBoard
HParam. The flags (`flags.py`), the execution-field set, the HParams and a sweep's
comparison of fixed settings are all derived from those declarations.

Every module below `run.py` takes a `Config` (never FLAGS). `resolve()` fills in defaults that
depend on other settings (weight decay per model, base_lr from log2_base_lr, bn_batch_size)
and raises `ConfigError` with a one-line, flag-named message for anything impossible, before
TensorFlow is even imported. The resolved config is saved as `config.yaml` beside each run.
"""
import dataclasses
import math
import os
import re
from fractions import Fraction
from typing import Optional, Tuple

from sbt_keras import data, distribute, models, norms
from sbt_keras.errors import ConfigError

PRECISIONS = ("float32", "mixed_bfloat16")
# --tpu: `local`, a TPU name, or grpc://host:port (a malformed address would otherwise
# hang in the TPU resolver instead of failing).
_TPU_ADDRESS = re.compile(r"^(grpc://[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}"
                          r"|[A-Za-z0-9][A-Za-z0-9._\-]*)$")
# Help groups, in the order `--helpfull` lists them.
GROUPS = ("model", "normalization", "data", "optimization", "schedule", "records",
          "execution")


_NO_LEGACY = object()


def setting(default, help, *, group, choices=None, execution=False, hparam=False,
            legacy=_NO_LEGACY):
    """A Config field together with everything its flag needs: the one declaration of a
    setting. `execution`: changes how a run executes, not what it computes (a run directory
    may be resumed with another value). `hparam`: shown in TensorBoard's HParams dashboard.
    `legacy`: for a setting added later, what a record written before it existed meant
    (so an older run directory is compared with the value it really used)."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata=dict(
        help=help, group=group, choices=tuple(choices) if choices else None,
        execution=execution, hparam=hparam, legacy=legacy))


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one training run. Field names are the absl flag names; each field's
    metadata holds its help text and group (see `setting`)."""

    # Model.
    model: str = setting("resnet20", "Network architecture.", group="model",
                         choices=models.MODELS, hparam=True)
    norm: str = setting("batch", "Normalization after each conv (and hidden dense) layer; "
                        "'batch' is sub-batch BN (docs/normalization.md).",
                        group="normalization", choices=norms.NORM_NAMES, hparam=True)
    norm_dense: bool = setting(True, "alexnet_reduced: also normalize the hidden dense layers "
                               "(paper Fig. 5); --nonorm_dense normalizes convs only (Fig. 6).",
                               group="normalization")
    bn_batch_size: int = setting(0, "Examples per BN statistics group inside each replica's "
                                 "batch; 0 = the whole per-replica batch (ordinary BN).",
                                 group="normalization", hparam=True)
    bn_momentum: float = setting(0.99, "BN moving-average momentum, per step.",
                                 group="normalization")
    bn_epsilon: float = setting(1e-3, "Epsilon added to every normalization's variance.",
                                group="normalization")
    bn_sync: bool = setting(False, "Synchronized BN: statistics over the whole global batch, "
                            "across replicas (the paper's per-worker BN is the default).",
                            group="normalization", hparam=True)
    bn_moving_variance: str = setting(
        "unbiased", "Population variance used at inference: 'unbiased' averages each BN "
        "group's variance times n/(n-1), n = examples x pixels per group (Ioffe & Szegedy "
        "2015); 'biased' averages the groups' biased variances.", group="normalization",
        choices=norms.MOVING_VARIANCE_CHOICES, legacy="biased")
    gn_groups: int = setting(
        0, "Channel groups of --norm=group; must divide every normalized layer's channels. "
        "0: the model's default (Wu & He's 32 for resnet50; 16 for the CIFAR models, whose "
        "first stage has 16 channels).", group="normalization", legacy=0)
    renorm_r_max: float = setting(3.0, "--norm=batch_renorm: final clip r_max of "
                                  "sigma_B/sigma (Ioffe 2017: 3).", group="normalization",
                                  legacy=3.0)
    renorm_d_max: float = setting(5.0, "--norm=batch_renorm: final clip d_max of "
                                  "(mu_B - mu)/sigma (Ioffe 2017: 5).", group="normalization",
                                  legacy=5.0)
    renorm_start_step: int = setting(
        -1, "--norm=batch_renorm: r_max = 1 and d_max = 0 up to this step, then linear "
        "ramps (-1: 5% of all iterations).", group="normalization", legacy=-1)
    renorm_r_end_step: int = setting(
        -1, "--norm=batch_renorm: step at which r_max reaches --renorm_r_max (-1: 40% of "
        "all iterations).", group="normalization", legacy=-1)
    renorm_d_end_step: int = setting(
        -1, "--norm=batch_renorm: step at which d_max reaches --renorm_d_max (-1: 25% of "
        "all iterations).", group="normalization", legacy=-1)
    mix_norms: Tuple[str, ...] = setting(
        ("batch", "layer"), "--norm=mix: the statistics it mixes, 2 or 3 of batch, instance, "
        "layer (all three with softmax weights: Switchable Normalization).",
        group="normalization", legacy=("batch", "layer"))
    mix_per_channel: bool = setting(False, "--norm=mix: learn one mixing weight per channel "
                                    "instead of one per layer.", group="normalization",
                                    legacy=False)
    # Data.
    dataset: str = setting("cifar10", "Dataset.", group="data", choices=data.DATASETS,
                           hparam=True)
    cifar_dir: Optional[str] = setting(
        None, "Read CIFAR from the original binary layout in this directory "
        "(cifar-10-batches-bin/ or cifar-100-binary/) instead of tfds.", group="data",
        execution=True)
    data_dir: Optional[str] = setting(None, "tensorflow-datasets data_dir (may be gs://).",
                                      group="data", execution=True)
    manual_dir: Optional[str] = setting(
        None, "imagenet2012: directory holding ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar (default <data_dir>/downloads/manual).", group="data",
        execution=True)
    download: bool = setting(True, "Let tfds download the dataset if missing.", group="data",
                             execution=True)
    augment: bool = setting(False, "Paper augmentation. CIFAR: pad 4, random 32x32 crop, "
                            "random flip; ImageNet: shorter side random in [256, 480], random "
                            "224 crop, flip (without it: the evaluation centre crop).",
                            group="data", hparam=True)
    train_examples: int = setting(0, "Use only the first N training examples (0 = all).",
                                  group="data")
    test_examples: int = setting(0, "Use only the first N test examples (0 = all).",
                                 group="data")
    image_size: int = setting(32, "Synthetic data: image side in pixels.", group="data")
    num_classes: int = setting(10, "Synthetic data: classes.", group="data")
    synthetic_train: int = setting(1024, "Synthetic data: training examples.", group="data")
    synthetic_test: int = setting(256, "Synthetic data: test examples.", group="data")
    # Optimisation: summed-gradient SGD, eta = batch_size * base_lr.
    batch_size: int = setting(128, "SGD batch size m: examples per step, all replicas "
                              "together.",
                              group="optimization", hparam=True)
    base_lr: Optional[float] = setting(
        None, "Base learning rate eta_tilde of the summed-gradient update; the mean-gradient "
        "learning rate is eta = batch_size * base_lr.", group="optimization", hparam=True)
    log2_base_lr: Optional[float] = setting(
        None, "log2 of --base_lr (the paper's x-axis); give one of the two.",
        group="optimization", hparam=True)
    weight_decay: Optional[float] = setting(
        None, "L2 coefficient lambda (loss + lambda/2 |w|^2); default: the model's "
        "(5e-4 for alexnet_reduced, 1e-4 for the ResNets).", group="optimization",
        hparam=True)
    weight_decay_on: str = setting("kernels", "Decay conv/dense kernels only, or all "
                                   "trainable variables but --norm=mix's mixing logits.",
                                   group="optimization",
                                   choices=models.DECAY_SCOPES)
    epochs: int = setting(82, "Training epochs (passes over the training set).",
                         group="schedule", hparam=True)
    lr_decay_fractions: Tuple[float, ...] = setting(
        (0.5, 0.75), "Multiply the learning rate by --lr_decay_factor at these fractions of "
        "all iterations (each boundary rounded half up to a whole step).", group="schedule")
    lr_decay_epochs: Tuple[int, ...] = setting(
        (), "Decay at the start of these epochs (counted from 0, so 30 = after 30 epochs) "
        "instead of at fractions.", group="schedule")
    lr_decay_factor: float = setting(0.1, "Multiplier at each decay.", group="schedule")
    warmup: bool = setting(False, "Goyal et al. gradual warm-up: start at "
                           "eta * warmup_start_factor, linear to eta over warmup_fraction of "
                           "all iterations.", group="schedule", hparam=True)
    warmup_fraction: float = setting(0.05, "Warm-up length, a fraction of all iterations.",
                                     group="schedule")
    warmup_start_factor: float = setting(1.0 / 32, "Warm-up starting multiplier.",
                                         group="schedule")
    # Evaluation and records.
    median_of: int = setting(5, "Report the median test accuracy of this many final epochs.",
                             group="records")
    divergence_factor: float = setting(
        0.0, "Also stop as diverged when the running train loss exceeds this multiple of its "
        "first value (0 = only NaN/Inf).", group="records")
    checkpoint_every_steps: int = setting(
        0, "Also checkpoint every N steps (0 = at epoch ends only); for long epochs on "
        "preemptible machines.", group="records", execution=True)
    keep_checkpoint_every_epochs: int = setting(
        0, "Also keep the initial weights and every K-th epoch end as checkpoints of their "
        "own (checkpoints/epochs/), for warm starts, interpolation and the instruments "
        "(0 = only the newest 3 rolling checkpoints).", group="records", execution=True,
        legacy=0)
    gns_every_steps: int = setting(
        0, "Measure the gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. "
        "2018) every K steps (0 = never): from each replica's gradient with 2+ replicas, "
        "else from the batch's two halves (one extra forward and backward pass). Never "
        "changes training.", group="records", legacy=0)
    gns_ema: float = setting(0.99, "Decay of the separate moving averages of |G|^2 and "
                             "tr(Sigma) before their ratio, in (0, 1).", group="records",
                             legacy=0.99)
    eval_batch_size: int = setting(512, "Test-set batch size in examples, a power of two so any "
                                   "replica count divides it; the last batch is padded "
                                   "(padding not counted).", group="records", execution=True)
    histogram_freq: int = setting(0, "Write weight histograms to TensorBoard every N epochs "
                                  "(0 = never).", group="records", execution=True)
    output_dir: str = setting("runs/default", "Where the run's records go.", group="records",
                              execution=True)
    # Sharp-minima instruments (Keskar et al. 2017; docs/sharp_minima.md).
    train_eval_examples: int = setting(
        4096, "After the last epoch, evaluate the final network in inference mode on this "
        "many un-augmented training examples (a fixed sample, seed 0; the whole training set "
        "when it has fewer; 0 = all): result.yaml's train_eval_accuracy, train_eval_loss and "
        "generalization_gap.", group="records")
    sharpness: str = setting(
        "none", "'final': measure the epsilon-sharpness of the final network (history.csv, "
        "TensorBoard train/sharpness, result.yaml).", group="records",
        choices=("none", "final"))
    sharpness_every: int = setting(
        0, "Also measure the epsilon-sharpness at every K-th epoch end (0 = never).",
        group="records")
    sharpness_epsilons: Tuple[float, ...] = setting(
        (1e-3, 5e-4), "Box sizes epsilon; training measures the first (python -m "
        "tools.sharpness measures all of them).", group="records")
    sharpness_p: int = setting(
        100, "Random subspace dimension of the sharpness box; 0 = the full parameter "
        "space.", group="records")
    sharpness_sample: int = setting(
        1024, "Training examples the sharpness is measured on (a fixed sample, seed 0; the "
        "whole training set when it has fewer; 0 = all).", group="records")
    sharpness_maxiter: int = setting(10, "L-BFGS-B iterations of each sharpness search.",
                                     group="records")
    init_from: str = setting(
        "", "Warm start: RUN_DIR[:EPOCH] whose network weights and BN moving statistics "
        "(at the end of EPOCH; default its newest checkpoint) this run starts from, with a "
        "fresh optimizer and schedule.", group="records")
    # Execution.
    seed: int = setting(0, "Seed for initialization, data order and augmentation.",
                        group="execution", hparam=True)
    deterministic: bool = setting(False, "Also enable TF op determinism (identical "
                                  "histories, slower).", group="execution", execution=True)
    strategy: str = setting("default", "tf.distribute strategy: default (one device), "
                            "mirrored (local GPUs), multi_worker (cluster from TF_CONFIG), "
                            "tpu (see --tpu).", group="execution",
                            choices=distribute.STRATEGIES, execution=True)
    tpu: str = setting("", "With --strategy=tpu: `local` on a TPU VM, a TPU name, or "
                       "grpc://ADDRESS:8470.", group="execution", execution=True)
    precision: str = setting("float32", "mixed_bfloat16 computes in bfloat16 on GPU/TPU; "
                             "weights, loss, gradients and BN statistics stay float32.",
                             group="execution", choices=PRECISIONS)
    steps_per_execution: int = setting(
        0, "Training steps per compiled call; must divide the steps per epoch (0 = auto: "
        "the largest divisor up to 32).", group="execution", execution=True)
    unrolled_steps: int = setting(
        1, "Steps traced one after another in each iteration of a block's loop (the largest "
        "divisor of --steps_per_execution up to this); the same updates in the same order "
        "(measurements: docs/bench_cpu.md).", group="execution", execution=True)
    jit_compile: bool = setting(False, "Compile the train step with XLA.", group="execution",
                                execution=True)
    pack_formulation: str = setting(
        "auto", "With --pack: how K packed trials are computed. 'separate': K sub-graphs in "
        "one step (any model and norm); 'grouped': one fused network with K weight sets, "
        "grouped convolutions (CIFAR ResNets, --norm=none|batch, one device); 'auto': "
        "grouped on GPU/TPU, on CPU by the measured crossover in m and norm "
        "(docs/packing.md).", group="execution", choices=("auto", "separate", "grouped"),
        execution=True)
    tpu_timeout: float = setting(
        120.0, "--strategy=tpu: give up (one line, exit 2) when the TPU has not answered "
        "within this many seconds.", group="execution", execution=True)
    sweep_failure_limit: int = setting(
        5, "A sweep stops (exit 1) after this many trials in a row failed; skipped points do "
        "not count, 0 never stops. Re-running the sweep retries its failed trials.",
        group="execution", execution=True)

    # ------------------------------------------------------------------ resolution
    def resolve(self) -> "Config":
        """Returns a copy with derived defaults filled in; raises ConfigError if impossible."""
        c = self
        for field in dataclasses.fields(c):
            if field.metadata["choices"]:
                _choose(field.name, getattr(c, field.name), field.metadata["choices"])
        info = self.data_info()  # validates dataset name, cifar_dir contents and caps
        if c.manual_dir and c.dataset != "imagenet2012":
            raise ConfigError("--manual_dir only applies to --dataset=imagenet2012; drop it")
        if c.dataset == "imagenet2012":
            from sbt_keras.data import imagenet  # imports TensorFlow: only when asked for
            imagenet.check_available(c.data_dir, c.manual_dir)
        if c.tpu and c.strategy != "tpu":
            raise ConfigError(f"--tpu={c.tpu} only applies to --strategy=tpu; set that or "
                              f"drop --tpu")
        if c.tpu and not _TPU_ADDRESS.match(c.tpu):
            raise ConfigError(f"--tpu={c.tpu!r} is not `local`, a TPU name (letters, digits, "
                              f"'-', '_', '.') or grpc://HOST:PORT")
        if c.strategy == "tpu" and not c.tpu:
            raise ConfigError("--strategy=tpu needs --tpu: `local` on a TPU VM, else the "
                              "TPU's name or grpc://ADDRESS:8470")
        if c.strategy == "multi_worker":
            distribute.check_tf_config(os.environ.get("TF_CONFIG"))

        if c.base_lr is not None and c.log2_base_lr is not None:
            raise ConfigError("--base_lr and --log2_base_lr were both given; set only one")
        if c.base_lr is None and c.log2_base_lr is None:
            raise ConfigError("set the base learning rate: --base_lr=ETA_TILDE or "
                              "--log2_base_lr=K (eta_tilde = 2**K)")
        base_lr = c.base_lr if c.base_lr is not None else _power_of_two(c.log2_base_lr)
        if not (base_lr > 0 and math.isfinite(base_lr)):
            raise ConfigError(f"--base_lr={base_lr} must be a positive finite number")
        if not math.isfinite(c.batch_size * base_lr):
            raise ConfigError(f"--base_lr={base_lr} gives eta = --batch_size x eta_tilde = "
                              f"{c.batch_size} x {base_lr}, beyond the float range; the "
                              f"paper's rates are 2**-12 .. 2**0")
        if not 0 <= c.seed < 2 ** 32:
            raise ConfigError(f"--seed={c.seed} must be in [0, 2**32) (numpy's seed range)")
        if not c.tpu_timeout > 0:
            raise ConfigError(f"--tpu_timeout={c.tpu_timeout} must be > 0 seconds")
        if c.sweep_failure_limit < 0:
            raise ConfigError(f"--sweep_failure_limit={c.sweep_failure_limit} must be >= 0 "
                              f"(0: never stop)")
        weight_decay = (models.spec(c.model).weight_decay if c.weight_decay is None
                        else c.weight_decay)
        if weight_decay < 0:
            raise ConfigError(f"--weight_decay={weight_decay} must be >= 0")

        _positive("batch_size", c.batch_size)
        _positive("epochs", c.epochs)
        _positive("eval_batch_size", c.eval_batch_size)
        _positive("median_of", c.median_of)
        if c.batch_size > info.num_train:
            raise ConfigError(f"--batch_size={c.batch_size} is larger than the "
                              f"{info.num_train} training examples; lower it")
        if c.median_of > c.epochs:
            raise ConfigError(f"--epochs={c.epochs} is fewer than the {c.median_of} final "
                              f"epochs whose median is reported; raise --epochs or lower "
                              f"--median_of")
        if c.bn_batch_size < 0:
            raise ConfigError(f"--bn_batch_size={c.bn_batch_size} must be >= 1 (or 0 for "
                              f"the per-replica batch)")
        if c.bn_batch_size and c.batch_size % c.bn_batch_size:
            raise ConfigError(f"--batch_size={c.batch_size} is not divisible by "
                              f"--bn_batch_size={c.bn_batch_size}; choose a divisor")
        if c.bn_batch_size and not norms.uses_batch_statistics(c.norm, c.mix_norms):
            raise ConfigError(f"--bn_batch_size only applies to the norms with batch "
                              f"statistics ({', '.join(sorted(norms.BATCH_STAT_NORMS))}; mix "
                              f"with a batch component), not --norm={c.norm}; drop it")
        if c.bn_sync and (c.norm != "batch" or c.bn_batch_size not in (0, c.batch_size)):
            raise ConfigError("--bn_sync normalizes over the whole batch of every replica; "
                              "use it with --norm=batch and without --bn_batch_size")
        if not 0 <= c.bn_momentum < 1:
            raise ConfigError(f"--bn_momentum={c.bn_momentum} must be in [0, 1)")
        if not c.bn_epsilon > 0:
            raise ConfigError(f"--bn_epsilon={c.bn_epsilon} must be > 0")
        if not 0 < c.lr_decay_factor <= 1:
            raise ConfigError(f"--lr_decay_factor={c.lr_decay_factor} must be in (0, 1]")
        fractions = tuple(float(f) for f in c.lr_decay_fractions)
        if any(not 0 < f < 1 for f in fractions) or list(fractions) != sorted(fractions):
            raise ConfigError(f"--lr_decay_fractions={','.join(map(str, fractions))} must be "
                              f"increasing and inside (0, 1)")
        decay_epochs = tuple(int(e) for e in c.lr_decay_epochs)
        if (any(not 0 < e < c.epochs for e in decay_epochs)
                or list(decay_epochs) != sorted(decay_epochs)):
            raise ConfigError(f"--lr_decay_epochs={','.join(map(str, decay_epochs))} must be "
                              f"increasing and inside (0, --epochs={c.epochs})")
        if c.warmup and not 0 < c.warmup_fraction < 1:
            raise ConfigError(f"--warmup_fraction={c.warmup_fraction} must be in (0, 1)")
        if c.warmup and not 0 < c.warmup_start_factor <= 1:
            raise ConfigError(f"--warmup_start_factor={c.warmup_start_factor} must be in "
                              f"(0, 1]")
        if c.divergence_factor < 0 or (0 < c.divergence_factor <= 1):
            raise ConfigError(f"--divergence_factor={c.divergence_factor} must be 0 (off) or "
                              f"> 1")
        if c.checkpoint_every_steps < 0:
            raise ConfigError(f"--checkpoint_every_steps={c.checkpoint_every_steps} must be "
                              f">= 0")
        norm_resolved = _check_norm_options(c, info.num_train // c.batch_size * c.epochs)
        steps_per_execution = _steps_per_execution(
            c.steps_per_execution, info.num_train // c.batch_size, c.checkpoint_every_steps,
            c.gns_every_steps)
        if c.gns_every_steps < 0:
            raise ConfigError(f"--gns_every_steps={c.gns_every_steps} must be >= 1 (or 0: "
                              f"never measure)")
        if not 0 < c.gns_ema < 1:
            raise ConfigError(f"--gns_ema={c.gns_ema} must be in (0, 1)")
        if c.gns_every_steps and c.bn_sync:
            raise ConfigError("--gns_every_steps needs each replica's gradient to be its own "
                              "examples'; with --bn_sync it is not: drop one of them")
        if c.keep_checkpoint_every_epochs < 0:
            raise ConfigError(f"--keep_checkpoint_every_epochs={c.keep_checkpoint_every_epochs}"
                              f" must be >= 0 (0: keep only the newest checkpoints)")
        if c.histogram_freq < 0:
            raise ConfigError(f"--histogram_freq={c.histogram_freq} must be >= 0")
        if not c.output_dir:
            raise ConfigError("--output_dir is empty; give a directory for the run's records")
        if c.train_eval_examples < 0:
            raise ConfigError(f"--train_eval_examples={c.train_eval_examples} must be >= 0 "
                              f"(0: the whole training set)")
        if c.sharpness_every < 0:
            raise ConfigError(f"--sharpness_every={c.sharpness_every} must be >= 0 (0: never)")
        if not c.sharpness_epsilons or any(not (math.isfinite(e) and e > 0)
                                           for e in c.sharpness_epsilons):
            raise ConfigError(f"--sharpness_epsilons={','.join(map(str, c.sharpness_epsilons))}"
                              f" must be positive box sizes, e.g. 1e-3,5e-4")
        if c.sharpness_p < 0:
            raise ConfigError(f"--sharpness_p={c.sharpness_p} must be >= 0 (0: the full space)")
        if c.sharpness_sample < 0:
            raise ConfigError(f"--sharpness_sample={c.sharpness_sample} must be >= 0 (0: the "
                              f"whole training set)")
        if c.sharpness_maxiter < 1:
            raise ConfigError(f"--sharpness_maxiter={c.sharpness_maxiter} must be >= 1")
        if c.init_from:  # reads the source's config.yaml and checkpoint list (no TensorFlow)
            from sbt_keras.training import warm_start
            warm_start.check_source(c, info)
        return dataclasses.replace(
            c, base_lr=float(base_lr), log2_base_lr=math.log2(base_lr),
            weight_decay=float(weight_decay),
            steps_per_execution=steps_per_execution,
            unrolled_steps=_unrolled_steps(c.unrolled_steps, steps_per_execution),
            lr_decay_fractions=fractions, lr_decay_epochs=decay_epochs, **norm_resolved)

    def norm_options(self, bn_batch_size) -> dict:
        """The normalization settings a resolved Config builds its model with, under their
        Config names; `bn_batch_size` is the BN batch `check_replicas` resolved (None: the
        whole replica batch, as synchronized BN needs)."""
        return dict(bn_batch_size=None if self.bn_sync else bn_batch_size,
                    bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                    bn_sync=self.bn_sync, bn_moving_variance=self.bn_moving_variance,
                    **{name: getattr(self, name) for name in NEW_NORM_OPTIONS})

    def data_info(self) -> "data.DataInfo":
        """Sizes of the chosen data, computed without TensorFlow (validates the source)."""
        if self.cifar_dir and self.dataset not in ("cifar10", "cifar100"):
            raise ConfigError(f"--cifar_dir reads CIFAR binaries; it cannot be used with "
                              f"--dataset={self.dataset}")
        return data.describe(
            self.dataset, cifar_dir=self.cifar_dir, train_examples=self.train_examples,
            test_examples=self.test_examples, image_size=self.image_size,
            num_classes=self.num_classes, synthetic_train=self.synthetic_train,
            synthetic_test=self.synthetic_test)

    def check_replicas(self, num_replicas: int) -> int:
        """Checks divisibility that depends on the strategy's replica count; returns the BN
        batch size the run uses (`bn_batch_size`, or the per-replica batch when 0)."""
        if self.batch_size % num_replicas:
            raise ConfigError(f"--batch_size={self.batch_size} is not divisible by the "
                              f"{num_replicas} replicas of --strategy={self.strategy}")
        if self.eval_batch_size % num_replicas:
            raise ConfigError(f"--eval_batch_size={self.eval_batch_size} is not divisible by "
                              f"the {num_replicas} replicas of --strategy={self.strategy}; "
                              f"use a multiple of {num_replicas}")
        per_replica = self.batch_size // num_replicas
        bn_batch_size = self.batch_size if self.bn_sync else (self.bn_batch_size
                                                              or per_replica)
        if per_replica % bn_batch_size and not self.bn_sync:
            raise ConfigError(f"--bn_batch_size={self.bn_batch_size} does not divide the "
                              f"per-replica batch {per_replica} (= --batch_size "
                              f"{self.batch_size} / {num_replicas} replicas); choose a "
                              f"divisor of {per_replica}")
        self._check_bn_over_one_value(bn_batch_size)
        if self.gns_every_steps and num_replicas == 1:
            from sbt_keras.gradient_noise import check_split
            try:  # one device: the noise is measured on the batch's two halves
                check_split(self.batch_size, bn_batch_size
                            if norms.uses_batch_statistics(self.norm, self.mix_norms) else None)
            except ValueError as error:
                raise ConfigError(f"--gns_every_steps on one device: {error}") from None
        return bn_batch_size

    def _check_bn_over_one_value(self, bn_batch_size):
        """Refuses batch statistics over a single value: a dense unit over one example, or
        a conv channel over one example whose deepest normalized layer is 1x1 pixels. Its
        variance is 0, so the layer outputs beta, passes no gradient, and training stops
        without an error."""
        if bn_batch_size != 1 or self.norm not in ("batch", "batch_renorm"):
            return
        spec = models.spec(self.model)
        where = None
        if self.norm_dense and spec.norm_dense_layers:
            where = "each dense unit"
        elif spec.smallest_norm_side(self.data_info().image_shape[0]) == 1:
            where = f"the 1x1-pixel channels of {self.model}'s deepest layers"
        if where:
            raise ConfigError(
                f"--norm={self.norm} over BN groups of 1 example normalizes {where} over a "
                f"single value (variance 0: the output is constant and training stops "
                f"silently); use --norm=layer|group|mix, a larger --bn_batch_size, or "
                f"--nonorm_dense")

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        """Plain types only, so it round-trips through YAML."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


# Normalization options beyond BN's own, passed to the layers under these same names.
NEW_NORM_OPTIONS = ("gn_groups", "renorm_r_max", "renorm_d_max", "renorm_start_step",
                    "renorm_r_end_step", "renorm_d_end_step", "mix_norms", "mix_per_channel")
# Config names of BN's settings -> the normalization layers' option names.
BN_OPTION_NAMES = {"bn_momentum": "momentum", "bn_epsilon": "epsilon",
                   "bn_moving_variance": "moving_variance"}
# -1 renorm steps: Ioffe's (2017) 5k / 40k / 25k steps as fractions of the run.
RENORM_STEP_FRACTIONS = {"renorm_start_step": 0.05, "renorm_r_end_step": 0.40,
                         "renorm_d_end_step": 0.25}


def _check_norm_options(c, total_steps):
    """Checks the normalization options against --norm and the model; returns the resolved
    values of those that have defaults depending on them (gn_groups, the renorm steps)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    read = set(norms.NORM_OPTIONS.get(c.norm, ()))
    if c.norm == "mix" and "batch" not in c.mix_norms:
        read -= {"momentum", "moving_variance"}  # no batch component: no moving statistics
    for name in NEW_NORM_OPTIONS + tuple(BN_OPTION_NAMES):
        if getattr(c, name) != defaults[name] and BN_OPTION_NAMES.get(name, name) not in read:
            raise ConfigError(f"--{name} does not apply to --norm={c.norm}; drop it")
    spec = models.spec(c.model)
    if c.gn_groups < 0:
        raise ConfigError(f"--gn_groups={c.gn_groups} must be >= 1 (or 0: the model's)")
    # Only the options --norm reads get resolved values: the others stay at their defaults,
    # so resolving a resolved Config changes nothing.
    for name in RENORM_STEP_FRACTIONS:
        if getattr(c, name) < -1:
            raise ConfigError(f"--{name}={getattr(c, name)} must be a step >= 0, or -1 for "
                              f"the default fraction of the run")
    resolved = {"gn_groups": c.gn_groups or spec.gn_groups,
                **{name: getattr(c, name) if getattr(c, name) >= 0
                   else steps_at(fraction, total_steps)
                   for name, fraction in RENORM_STEP_FRACTIONS.items()}}
    try:
        resolved["mix_norms"] = norms.mix_components(c.mix_norms)
        options = {name: getattr(c, name) for name in NEW_NORM_OPTIONS}
        norms.check_options(c.norm, **{**options, **resolved})
    except ValueError as error:
        raise ConfigError(f"--{error}") from None
    channels = [n for n in spec.norm_channels
                if c.norm_dense or n not in spec.dense_norm_channels]
    if c.norm == "group" and any(n % resolved["gn_groups"] for n in channels):
        bad = next(n for n in channels if n % resolved["gn_groups"])
        raise ConfigError(f"--gn_groups={resolved['gn_groups']} does not divide the {bad} "
                          f"channels of a normalized layer of {c.model}; choose a divisor of "
                          f"{math.gcd(*channels)}")
    dense = c.norm_dense and spec.norm_dense_layers
    if dense and norms.needs_spatial_inputs(c.norm, resolved["mix_norms"]):
        raise ConfigError(f"--norm={c.norm} takes statistics over each channel's pixels, "
                          f"and {c.model}'s dense layers have one value per channel; add "
                          f"--nonorm_dense or choose another --norm")
    return {name: value for name, value in resolved.items() if name in read}


def fields_where(key):
    """Names of the Config fields whose `setting()` metadata has `key` true."""
    return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata[key])


def legacy_values():
    """{field: the value a record written before the field existed meant}."""
    return {f.name: list(f.metadata["legacy"]) if isinstance(f.metadata["legacy"], tuple)
            else f.metadata["legacy"]
            for f in dataclasses.fields(Config) if f.metadata["legacy"] is not _NO_LEGACY}

# Settings that change how a run executes but not what it computes: an output_dir may be
# resumed with other values of these, and a sweep ignores them when comparing settings.
EXECUTION_FIELDS = fields_where("execution")
HPARAM_FIELDS = fields_where("hparam")


def hparams_of(cfg: Config, bn_batch_size: int) -> dict:
    """The settings shown in TensorBoard's HParams dashboard; `bn_batch_size` is the BN
    batch the run really uses (0 resolves to the per-replica batch)."""
    values = {name: getattr(cfg, name) for name in sorted(HPARAM_FIELDS)}
    return {**values, "bn_batch_size": bn_batch_size}


MAX_AUTO_STEPS_PER_EXECUTION = 32


def _steps_per_execution(requested, steps_per_epoch, checkpoint_every, noise_every=0):
    """Keras runs whole blocks of steps: a block must not cross an epoch end or a
    checkpoint, and a gradient-noise measurement ends a block, so it must divide all three.
    0 picks the largest such block up to 32 (fewer host round trips; batch-level checks
    then run once per block)."""
    period = math.gcd(steps_per_epoch, checkpoint_every, noise_every)
    if requested == 0:
        return largest_divisor(period, MAX_AUTO_STEPS_PER_EXECUTION)
    if requested < 0:
        raise ConfigError(f"--steps_per_execution={requested} must be >= 1 (or 0 for auto)")
    if steps_per_epoch % requested:
        raise ConfigError(f"--steps_per_execution={requested} does not divide the "
                          f"{steps_per_epoch} steps per epoch; use a divisor or 0 (auto)")
    if checkpoint_every % requested:
        raise ConfigError(f"--steps_per_execution={requested} does not divide "
                          f"--checkpoint_every_steps={checkpoint_every}; use a divisor")
    if noise_every % requested:
        raise ConfigError(f"--steps_per_execution={requested} does not divide "
                          f"--gns_every_steps={noise_every}; use a divisor")
    return requested


def _unrolled_steps(requested, steps_per_execution):
    """The largest divisor of the block up to `requested`: that many steps are traced one
    after the other inside each iteration of the block's loop (same maths, fewer loop
    iterations, and the executor may overlap neighbouring steps' independent ops)."""
    if requested < 1:
        raise ConfigError(f"--unrolled_steps={requested} must be >= 1 (1: no unrolling)")
    return largest_divisor(steps_per_execution, requested)


def steps_at(fraction, total_steps):
    """floor(fraction * total_steps + 1/2): a fraction of all iterations, halves rounded up.

    Computed exactly, with `fraction` read as the decimal it prints as (0.29, not the
    binary 0.28999...), so neither float error nor Python's round-half-to-even moves
    a step: 0.5 of 1001 steps is 501, 0.29 of 50 is 15.
    """
    exact = Fraction(repr(float(fraction))) * int(total_steps)
    return math.floor(exact + Fraction(1, 2))


def largest_divisor(n, at_most):
    """The largest divisor of `n` that is at most `at_most` (>= 1)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _power_of_two(log2_rate):
    """2**log2_rate; ConfigError when that is not a positive float (--log2_base_lr=5000)."""
    try:
        rate = 2.0 ** log2_rate
    except OverflowError:
        rate = math.inf
    if not (rate > 0 and math.isfinite(rate)):
        raise ConfigError(f"--log2_base_lr={log2_rate} gives eta_tilde = 2**{log2_rate}, "
                          f"outside the float range; the paper's rates are 2**-12 .. 2**0")
    return rate


def _choose(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"--{flag}={value} is unknown; choose one of {', '.join(choices)}")


def _positive(flag, value):
    if not value > 0:
        raise ConfigError(f"--{flag}={value} must be a positive integer")
