"""A pack of trials under MultiWorkerMirroredStrategy: 2 local worker processes.

Both workers train the same pack of 2 ResNet-8 trials with BN (tests/pack_probe.py; there
is no command line for a single pack). Each trial must end exactly as that trial trained
alone on one device with BN over the per-replica 4 examples (tests/test_strategies.py's
comparison: every checkpoint variable and history value), with its own result.yaml in the
chief's directory and no worker's scratch copy left.
"""
import json

import pytest

from pack_probe import configs
from processes import finish, free_port, start
from sbt_keras import results
from sbt_keras.train import train
from test_strategies import RUN, _assert_same

# m = 8 over 24 examples: 3 steps, one epoch; 2 replicas normalize over 4 examples each.
SETTINGS = {k: v for k, v in RUN.items() if k != "base_lr"}
SETTINGS.update(norm="batch", log2_base_lr=-5)
RATES = [-6, -4]


def _workers(args):
    """`python ARGS` as both workers of a 2-worker cluster on localhost."""
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    return [start(args, TF_CONFIG=json.dumps({"cluster": cluster,
                                               "task": {"type": "worker", "index": i}}))
            for i in range(2)]


def _pack_workers(root):
    return _workers(["tests/pack_probe.py", str(root),
                     json.dumps(dict(SETTINGS, strategy="multi_worker")),
                     *map(str, RATES)])


def test_a_pack_on_two_workers_equals_its_trials_alone_on_one_device(tmp_path):
    pack = tmp_path / "pack"
    workers = _pack_workers(pack)  # they run while this process trains the references
    alone = configs(tmp_path / "alone", dict(SETTINGS, bn_batch_size=4), RATES)
    for cfg in alone:
        train(cfg)
    for proc in workers:
        finish(proc)

    for cfg in alone:
        trial = pack / cfg.output_dir.rsplit("/", 1)[1]
        _assert_same(trial, cfg.output_dir)
        result = results.read_yaml(trial / results.RESULT_FILE)
        assert result["status"] == "completed" and result["steps"] == 3
        assert result["pack"] == ["lr-6", "lr-4"]
        derived = results.read_yaml(trial / results.CONFIG_FILE)["derived"]
        assert (derived["replicas"], derived["bn_batch_size"]) == (2, 4)
        # Only the chief keeps records; worker 1's scratch copy is gone.
        assert not list(trial.glob("workertemp_*"))
    # The trials differ: each was trained with its own eta_tilde.
    with pytest.raises(AssertionError):
        _assert_same(pack / "lr-6", pack / "lr-4")
