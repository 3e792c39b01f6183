"""A pack of trials under MultiWorkerMirroredStrategy: 2 local worker processes.

Both workers train the same pack of 2 ResNet-8 trials with BN (tests/pack_probe.py; there
is no command line for a single pack). Each trial must end exactly as that trial trained
alone on one device with BN over the per-replica 4 examples (tests/test_strategies.py's
comparison: every checkpoint variable and history value), with its own result.yaml in the
chief's directory and no worker's scratch copy left. A SIGTERM to worker 1 alone must stop
both workers at one step where every trial saved, and a re-run must end as an
uninterrupted pack (as tests/test_preemption.py's unpacked case). The first takes 24 s on a
quiet 2-core machine (41-58 s while other tests ran); the second, 85 s quiet, is `slow`.
"""
import json
import signal

import pytest

from pack_probe import configs
from processes import finish, free_port, killed_if_left, start
from sbt_keras import results
from sbt_keras.train import train
from test_preemption import (_assert_resumed_as_uninterrupted, _latest_checkpoint,
                             _stopped_step, _wait_for)
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


def _pack_workers(root, settings=SETTINGS):
    return _workers(["tests/pack_probe.py", str(root),
                     json.dumps(dict(settings, strategy="multi_worker")),
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


# 24 steps an epoch in blocks of 4, 72 in all (tests/test_preemption.py's run).
LONGER = dict(SETTINGS, synthetic_train=192, epochs=3, steps_per_execution=4)
TRIALS = ["lr-6", "lr-4"]


@pytest.mark.slow
@pytest.mark.fault("SIGTERM to one worker of a 2-worker multi_worker pack")
def test_sigterm_to_one_worker_stops_the_pack_at_one_step_and_resumes_exactly(tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    with killed_if_left() as started:
        uninterrupted = _pack_workers(reference, LONGER)  # alongside, on other ports
        workers = _pack_workers(run, LONGER)
        started += uninterrupted + workers
        _wait_for(run / TRIALS[-1] / results.HISTORY_FILE, workers)
        workers[1].send_signal(signal.SIGTERM)
        step = _stopped_step(workers)
        for trial in TRIALS:  # every trial saved that step: the chief's and the scratch copy
            chief, scratch = run / trial, run / trial / "workertemp_worker1"
            for records in (chief, scratch):
                assert _latest_checkpoint(records / "checkpoints") == step, records
                assert results.read_yaml(records / results.RESULT_FILE)["status"] == \
                    "preempted"
        print(f"stopped at step {step}")
        resumed = _pack_workers(run, LONGER)
        started += resumed
        for proc in resumed + uninterrupted:
            finish(proc)
    for trial in TRIALS:
        _assert_resumed_as_uninterrupted(run / trial, reference / trial, step)
        assert not list((run / trial).glob("workertemp_*"))
