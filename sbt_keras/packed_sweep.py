"""A sweep of packs (`--pack=K|auto`): the keras-tuner grid hands out packs, not points.

The grid's valid points are cut into packs (sbt_keras/packing.py); the oracle's one axis is
the pack, so `--sweep_workers` and keras-tuner's chief/worker mode hand each worker a
whole pack, and a pack's trials are trained together by training/packed.py. Every trial
keeps its own directory under trials/ and its own row in results.csv, exactly as in an
unpacked sweep; skipped points are listed as before. keras-tuner's state for a packed
sweep lives in its own project (`tuner/<grid hash>-pack<K>`), so re-running with another
--pack (or none) starts a new cursor while the trial directories carry the progress:
finished trials are not trained again and interrupted ones resume from their checkpoints.
"""
import os

import keras_tuner

from sbt_keras import packing
from sbt_keras import sweep
from sbt_keras.training.packed import train_pack

AXIS = "pack"


def search(out, grid, valid, skipped, pack, extra_callbacks=()):
    """Runs every pack of the valid points (a keras-tuner chief only hands them out)."""
    del skipped  # listed in sweep.yaml by run_sweep; never trained
    packs = {packing.name(members): members for members in packing.group(valid, pack)}
    hp = keras_tuner.HyperParameters()
    names = list(packs)
    hp.Choice(AXIS, names, default=names[0])
    oracle = sweep.ResumableGridOracle(
        objective=keras_tuner.Objective(sweep.OBJECTIVE, direction="max"), hyperparameters=hp)
    tuner = sweep._GridTuner(
        oracle=oracle,
        run_point=lambda name: _run_pack(out, packs[name], extra_callbacks),
        point_of=lambda values: values[AXIS],
        directory=os.path.join(out, "tuner"),
        project_name=f"{sweep._grid_hash(grid)}-pack{pack}", overwrite=False)
    tuner.search(verbose=0)


def _run_pack(out, members, extra_callbacks):
    results = train_pack([cfg for _, cfg in members], extra_callbacks=extra_callbacks)
    sweep.write_results(out)
    return {sweep.OBJECTIVE: max(r[sweep.OBJECTIVE] for r in results)}
