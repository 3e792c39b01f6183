"""Handing out grid points to several workers at once.

keras-tuner 1.4.8's `GridSearchOracle.populate_space` creates the next point only from a
trial that has *finished* (it waits in case the finished trial declared new
hyper-parameters): asked by three workers at once it answers RUNNING, RUNNING, IDLE, and
every worker after the first two spins on IDLE until a trial ends, so `--sweep_workers=N`
never runs more than two trials at a time, and mostly one. A sweep declares every axis up
front (sweep.py builds the whole `HyperParameters` before the search), so there is nothing
to wait for: the next point is the first combination, in keras-tuner's own order, that no
trial has been started on.

What "started" means is keras-tuner's own record, `Oracle._tried_so_far` (the hashes of
the values of every trial created, saved in oracle.json), so:
- every point runs exactly once: `create_trial` is synchronized (one request at a time on
  the chief) and records a point's hash before it answers;
- kill and resume keep working: a reloaded oracle sends the trials that were running back
  through keras-tuner's retry queue (which `create_trial` serves first) and hands out the
  points never started; the finished ones are already in `_tried_so_far`;
- when every point has been handed out the answer is STOPPED, not IDLE: the worker that
  asked exits instead of polling the chief in a loop, and the chief still waits for the
  trials that are running (its `exit_chief` check).

The private keras-tuner hooks used here are listed in `sbt_keras/upstream.py`.
"""
import itertools

RUNNING = "RUNNING"  # keras_tuner TrialStatus values (plain strings)
STOPPED = "STOPPED"


class HandOutEveryPointAtOnce:
    """Mixin for a `keras_tuner.oracles.GridSearchOracle` whose space is fixed up front:
    `populate_space` answers with the first combination not started yet."""

    def populate_space(self, trial_id):
        del trial_id
        for values in grid_combinations(self.get_space()):
            if self._compute_values_hash(values) not in self._tried_so_far:
                return {"status": RUNNING, "values": values}
        return {"status": STOPPED, "values": None}


def grid_combinations(hyperparameters):
    """Every combination of a space of unconditional `Choice`s, in GridSearchOracle's order:
    the first hyper-parameter varies slowest, each one's default first, then its other
    values in their order."""
    names, value_lists = [], []
    for hp in hyperparameters.space:
        if getattr(hp, "conditions", None):
            raise ValueError(f"{hp.name}: a grid with conditional hyper-parameters cannot be "
                             f"handed out up front")
        values = list(hp.values)
        if hp.default in values:
            values.remove(hp.default)
        names.append(hp.name)
        value_lists.append([hp.default] + values)
    for combination in itertools.product(*value_lists):
        yield dict(zip(names, combination))
