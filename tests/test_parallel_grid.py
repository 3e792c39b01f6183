"""Several workers asking the sweep's grid oracle at once each get a different point at once;
every point runs exactly once, also across a kill and reload of the oracle."""
import collections
import copy
import threading
import time

import keras_tuner
import pytest

from sbt_keras import parallel_grid
from sbt_keras.sweep import ResumableGridOracle

BATCH_SIZES, RATES = [4, 8, 16], [-8.0, -7.0, -6.0, -5.0]
POINTS = {(m, lr) for m in BATCH_SIZES for lr in RATES}


def _oracle(directory, cls=ResumableGridOracle):
    hp = keras_tuner.HyperParameters()
    hp.Choice("batch_size", BATCH_SIZES, default=BATCH_SIZES[0])
    hp.Choice("log2_base_lr", RATES, default=RATES[0])
    oracle = cls(objective=keras_tuner.Objective("test_accuracy", "max"), hyperparameters=hp)
    oracle._set_project_dir(str(directory), "grid")  # create_trial and end_trial save
    oracle.verbose = 0
    return oracle


def _point(trial):
    values = trial.hyperparameters.values
    return values["batch_size"], values["log2_base_lr"]


def _finish(oracle, trial):
    oracle.update_trial(trial.trial_id, {"test_accuracy": 0.5})
    # As over gRPC, the worker reports a copy: in-process, `trial` is the oracle's own.
    ended = copy.copy(trial)
    ended.status = "COMPLETED"
    oracle.end_trial(ended)


def test_three_workers_asking_at_once_each_get_a_point(tmp_path):
    ours = _oracle(tmp_path / "ours")
    assert [ours.create_trial(f"w{i}").status for i in range(3)] == ["RUNNING"] * 3
    assert len({_point(t) for t in ours.ongoing_trials.values()}) == 3
    # keras-tuner's own oracle makes the third worker wait for a trial to end.
    stock = _oracle(tmp_path / "stock", keras_tuner.oracles.GridSearchOracle)
    assert [stock.create_trial(f"w{i}").status for i in range(3)] == [
        "RUNNING", "RUNNING", "IDLE"]


def test_three_workers_run_short_fake_trials_in_parallel_each_point_once(tmp_path):
    oracle, spans, lock = _oracle(tmp_path), [], threading.Lock()

    def worker(tuner_id):
        while True:
            trial = oracle.create_trial(tuner_id)
            if trial.status == "STOPPED":
                return
            assert trial.status == "RUNNING", trial.status  # never IDLE: no polling loop
            start = time.monotonic()
            time.sleep(0.15)  # the fake trial
            with lock:
                spans.append((_point(trial), tuner_id, start, time.monotonic()))
            _finish(oracle, trial)

    threads = [threading.Thread(target=worker, args=(f"worker{i}",), daemon=True)
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    points = collections.Counter(point for point, *_ in spans)
    assert set(points) == POINTS and set(points.values()) == {1}  # each point exactly once
    assert {tuner for _, tuner, _, _ in spans} == {"worker0", "worker1", "worker2"}
    # From the recorded times, not the wall clock: how many trials ran at once. Every
    # trial's start lies inside the spans of the two others started in the same round.
    most_at_once = max(sum(1 for _, _, s, e in spans if s <= start < e)
                       for _, _, start, _ in spans)
    assert most_at_once == 3, sorted(spans, key=lambda s: s[2])


def test_a_reloaded_oracle_retries_the_running_trials_then_hands_out_the_rest(tmp_path):
    first = _oracle(tmp_path)
    started = [first.create_trial(f"w{i}") for i in range(3)]
    _finish(first, started[0])
    first.save()  # (create_trial and end_trial save too)

    # The chief is killed; a new one reloads its state from disk.
    second = _oracle(tmp_path)
    second.reload()
    runs = [_point(started[0])]
    while True:
        trial = second.create_trial("w0")
        if trial.status == "STOPPED":
            break
        runs.append(_point(trial))
        _finish(second, trial)
    # The two interrupted trials come back first (keras-tuner's retry queue), then every
    # point never started; nothing runs twice and nothing is left out.
    assert set(runs[1:3]) == {_point(started[1]), _point(started[2])}
    assert sorted(runs) == sorted(POINTS)


def test_points_are_handed_out_in_keras_tuners_grid_order(tmp_path):
    combos = list(parallel_grid.grid_combinations(_oracle(tmp_path).get_space()))
    assert [(c["batch_size"], c["log2_base_lr"]) for c in combos] == [
        (m, lr) for m in BATCH_SIZES for lr in RATES]


def test_conditional_spaces_are_refused():
    hp = keras_tuner.HyperParameters()
    hp.Choice("model", ["a", "b"])
    with hp.conditional_scope("model", ["a"]):
        hp.Choice("depth", [1, 2])
    with pytest.raises(ValueError, match="conditional"):
        list(parallel_grid.grid_combinations(hp))
