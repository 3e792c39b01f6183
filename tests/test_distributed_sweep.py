"""keras-tuner's chief/worker mode: a chief and 2 worker processes on localhost share a grid."""
import pathlib

import pytest
import yaml

from processes import finish, free_port, start
from sbt_keras import results

FLAGS = ["--dataset=synthetic", "--model=resnet8", "--norm=batch", "--image_size=8",
         "--synthetic_train=128", "--synthetic_test=32", "--epochs=2", "--median_of=1",
         "--deterministic", "--grid_batch_size=4,8,16", "--grid_log2_base_lr=-7,-6"]


def _start(out, tuner_id=None, port=None):
    env = {}
    if tuner_id:
        env.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port))
    return start(["-m", "sbt_keras.run", *FLAGS, f"--output_dir={out}"], **env)


def _table(out):
    return [{k: v for k, v in r.items() if k != "wall_seconds"}
            for r in results.read_csv(pathlib.Path(out) / "results.csv")]


@pytest.mark.slow  # ~70 s: three processes; the oracle's hand-out is tested in test_parallel_grid
def test_chief_and_two_workers_share_one_grid(tmp_path):
    reference = tmp_path / "single"
    finish(_start(reference))

    out, port = tmp_path / "shared", free_port()
    procs = [_start(out, "chief", port), _start(out, "tuner0", port),
             _start(out, "tuner1", port)]
    for p in procs:
        finish(p)

    assert _table(out) == _table(reference)  # every point once, same numbers as one process
    workers = [yaml.safe_load(p.read_text())["worker"]
               for p in sorted((out / "trials").glob("*/result.yaml"))]
    assert len(workers) == 6 and set(workers) <= {"tuner0", "tuner1"}
    assert len(set(workers)) == 2, workers  # both workers took trials
