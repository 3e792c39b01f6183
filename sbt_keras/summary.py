"""The start summary: what a run is about to do, in four plain lines.

    resnet8, norm none: 78,042 parameters
    data: cifar10 from ../shared/data/cifar10-subset (binary files), 4,660 train / 846 test, 32×32×3, no augmentation
    m = 16, η̃ = 2⁻⁸ = 0.003906, η = m·η̃ = 0.0625, weight decay 0.0001, BN batch: none (norm none)
    291 steps/epoch × 4 epochs = 1,164 steps (lr × 0.1 at steps 582, 873); strategy default, 1 replica (CPU); records: runs/x
"""
from sbt_keras import cost, norms


def data_source(cfg):
    """Where the data comes from, as the user would recognise it."""
    if cfg.dataset == "synthetic":
        return "synthetic (random images)"
    if cfg.cifar_dir:
        return f"{cfg.dataset} from {cfg.cifar_dir} (binary files)"
    where = cfg.data_dir or "~/tensorflow_datasets"
    return f"{cfg.dataset} via tensorflow-datasets in {where}"


def start_lines(cfg, info, *, parameters, replicas, devices, bn_batch_size, boundaries=(),
                warmup_steps=0):
    """The summary's lines; `devices` e.g. 'CPU' or '2 GPU'."""
    per_epoch, total = cost.run_steps(cfg, info)
    shape = "×".join(str(n) for n in info.image_shape)
    if norms.uses_batch_statistics(cfg.norm, cfg.mix_norms):
        bn = f"BN batch {bn_batch_size}"
    else:
        bn = f"BN batch: none (norm {cfg.norm})"
    schedule = []
    if boundaries:
        schedule.append(f"lr × {cfg.lr_decay_factor:g} at step{'s' * (len(boundaries) > 1)} "
                        + ", ".join(f"{b:,}" for b in boundaries))
    if warmup_steps:
        schedule.append(f"warm-up over {warmup_steps:,} steps")
    return [
        f"{cfg.model}, norm {cfg.norm}: {parameters:,} parameters",
        f"data: {data_source(cfg)}, {info.num_train:,} train / {info.num_test:,} test, "
        f"{shape}, {'augmented' if cfg.augment else 'no augmentation'}",
        f"m = {cfg.batch_size}, η̃ = {cost.power_of_two(cfg.log2_base_lr)} = {cfg.base_lr:.6g}, "
        f"η = m·η̃ = {cfg.batch_size * cfg.base_lr:.6g}, weight decay {cfg.weight_decay:g}, "
        f"{bn}",
        f"{per_epoch:,} steps/epoch × {cfg.epochs} epochs = {total:,} steps"
        + (f" ({'; '.join(schedule)})" if schedule else "")
        + f"; strategy {cfg.strategy}, {replicas} replica{'s' * (replicas != 1)} ({devices})"
        + f"; records: {cfg.output_dir}",
    ]


def log_start(cfg, info, network, replicas, bn_batch_size, schedule, log=None):
    """Logs the start summary of a run whose network is built."""
    import tensorflow as tf
    from absl import logging

    gpus = len(tf.config.list_logical_devices("GPU"))
    tpus = len(tf.config.list_logical_devices("TPU"))
    devices = f"{tpus} TPU" if tpus else f"{gpus} GPU" if gpus else "CPU"
    for line in start_lines(cfg, info, parameters=network.count_params(), replicas=replicas,
                            devices=devices, bn_batch_size=bn_batch_size,
                            boundaries=schedule.boundaries,
                            warmup_steps=schedule.warmup_steps):
        (log or logging.info)(line)
