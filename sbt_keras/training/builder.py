"""The run's network and its summed-gradient model, built from a resolved Config.

Shared by `train.py` and by the instruments that load a run's checkpoint
(`training/snapshot.py`), so a measured network is built exactly as it was trained.
"""
from sbt_keras import models, norms
from sbt_keras.training.summed_sgd import SummedGradientModel, build_optimizer


def build_model(cfg, info, bn_batch_size, schedule):
    """(network, model): the network `cfg` describes for data shaped like `info`, wrapped in
    the paper's update rule and compiled with `schedule`. Call it inside the strategy's
    scope."""
    network = models.build(
        cfg.model, input_shape=info.image_shape, num_classes=info.num_classes,
        norm=cfg.norm, norm_dense=cfg.norm_dense, **cfg.norm_options(bn_batch_size))
    model = SummedGradientModel(
        network, weight_decay=cfg.weight_decay,
        decayed_variables=models.decayed_variables(network, cfg.weight_decay_on),
        unrolled_steps=cfg.unrolled_steps, gns_every_steps=cfg.gns_every_steps,
        gns_bn_batch_size=bn_batch_size if norms.uses_batch_statistics(
            cfg.norm, cfg.mix_norms) else None)
    model.compile(optimizer=build_optimizer(schedule),
                  steps_per_execution=cfg.steps_per_execution, jit_compile=cfg.jit_compile)
    return network, model
