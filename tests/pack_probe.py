"""One pack of trials trained by `train_pack`, for the multi-worker pack tests.

    python tests/pack_probe.py ROOT SETTINGS_JSON LOG2_RATE...

Trains the trials lr<RATE> under ROOT (one per rate, the other settings from the JSON
object) as one pack, as a sweep's pack would be trained; every worker of a cluster runs the
same command with its own TF_CONFIG. A script rather than the command line: packs come only
from a sweep, whose keras-tuner state (one oracle per worker under multi_worker,
docs/scale_out.md) is not what the tests check. Exits 143 when preempted, as
`sbt_keras.run` does.
"""
import dataclasses
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sbt_keras.config import Config  # noqa: E402
from sbt_keras.errors import Preempted  # noqa: E402


def configs(root, settings, rates):
    """The resolved configs of the pack's trials (the tests build their references alike)."""
    base = Config(**settings)
    return [dataclasses.replace(base, log2_base_lr=rate,
                                output_dir=str(pathlib.Path(root) / f"lr{rate:g}")).resolve()
            for rate in rates]


def main(argv):
    from sbt_keras.training.packed import train_pack

    root, settings, rates = argv[1], json.loads(argv[2]), [float(r) for r in argv[3:]]
    try:
        train_pack(configs(root, settings, rates))
    except Preempted as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    main(sys.argv)
