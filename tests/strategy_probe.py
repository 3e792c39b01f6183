"""One training run under MirroredStrategy over N logical CPUs, for the equivalence tests.

    python tests/strategy_probe.py N --flag=value ...

The command line cannot split one CPU into replicas (a real machine has real devices), so
this script does that first and then trains exactly as `python -m sbt_keras.run` would.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from sbt_keras import flags as run_flags  # noqa: E402
from sbt_keras.train import train  # noqa: E402


def main(argv):
    replicas = int(argv[1])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    run_flags.define_flags()
    flags.FLAGS(["strategy_probe", *argv[2:]])
    cfg = run_flags.config_from_flags().resolve()
    train(cfg, strategy=tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(replicas)]))


if __name__ == "__main__":
    main(sys.argv)
