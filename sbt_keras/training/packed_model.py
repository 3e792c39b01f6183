"""K summed-gradient models trained as one compiled program (packed trials).

    members = [build_model(cfg_k, ...)[1] for cfg_k in pack]   # SummedGradientModels
    packed = PackedModel(members)
    packed.compile(steps_per_execution=..., jit_compile=...)
    packed.fit(shared_batches, ...)

Formulation: K separate sub-graphs in one step. Each step runs every active member's own
`SummedGradientModel.train_step` on the same batch -- its own forward pass, its own
gradient tape, its own weight decay, its own SGD optimizer with its own schedule (so its
own eta_tilde(k)) -- traced together into one graph, one `steps_per_execution` loop, one
host round trip per block. Nothing is shared between members but the input batch, so a
member's trajectory is the one its trial would follow alone, operation for operation
(tests/test_packed.py checks histories and weights against unpacked runs), and a NaN in
one member cannot reach another: no value flows between their sub-graphs.

Why this formulation on CPU: the alternative (one network with K x the channels and
grouped convolutions, `feature_group_count`) was found far slower under XLA's CPU grouped
convolution (issue 16: 0.34 s/step at K = 4, m = 2 vs 9 ms unpacked), while K sub-graphs
let the executor run the members' ops side by side and pay the per-step overhead once;
`make bench` measures it against one trial at a time (docs/bench_cpu.md). The grouped
formulation (one fused network) is training/grouped.py; `--pack_formulation` chooses.

Freezing: `freeze(k)` drops member k from the step and from evaluation (the train and
test functions are retraced once, at a block boundary), so a diverged trial stops costing
compute and its weights stay as they were when it was frozen.

Logs carry each member's metrics as `t<k>_loss`, `t<k>_accuracy` (k: the member's index in
the pack), and `val_t<k>_...` for the evaluation; `PackCallbacks` (training/packed.py)
hands each member its own under the usual names.
"""
import keras

from sbt_keras.training.summed_sgd import SummedGradientModel


def prefix(k):
    return f"t{k}_"


class PackedModel(SummedGradientModel):
    """The members' steps as one program. Inherits SummedGradientModel's step loop
    (`make_train_function`: whole blocks of `steps_per_execution`, strategy-safe),
    its evaluation loop, its whole-block check in `fit`, and its strategy handling."""

    def __init__(self, members, **kwargs):
        keras.Model.__init__(self, **kwargs)  # no network of its own
        if not members:
            raise ValueError("a pack needs at least one member")
        self.members = list(members)
        self.active = list(range(len(self.members)))
        self.unrolled_steps = members[0].unrolled_steps
        self.gns_every_steps = 0  # no noise measurement across a pack (packing.check_grid)
        self._fit_starting = False

    @property
    def metrics(self):
        # Every member's trackers, so Keras resets them at each epoch and evaluation start.
        return [m for member in self.members for m in member.metrics]

    def get_metrics_result(self):
        """Every active member's metrics under its logged name, read from the metric
        variables (summed over replicas). Keras's fit and evaluate report these, since the
        names match the step's logs, rather than the last step's replica-averaged logs:
        an evaluation batch padded on some replicas makes that average inexact."""
        return {prefix(k) + metric.name: metric.result()
                for k in self.active for metric in self.members[k].metrics}

    def compile(self, steps_per_execution=1, jit_compile=False):
        # Keras wants an optimizer; the members' own optimizers do the updates, this one
        # is never applied.
        super().compile(optimizer=keras.optimizers.SGD(0.0, name="unused"),
                        steps_per_execution=steps_per_execution, jit_compile=jit_compile)

    def call(self, inputs, training=False):
        return [self.members[k].network(inputs, training=training) for k in self.active]

    def train_step(self, data):
        logs = {}
        for k in self.active:
            for name, value in self.members[k].train_step(data).items():
                logs[prefix(k) + name] = value
        return logs

    def test_step(self, data):
        logs = {}
        for k in self.active:
            for name, value in self.members[k].test_step(data).items():
                logs[prefix(k) + name] = value
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Each member's optimizer is built over its own network's variables."""
        del data_batch
        if self._fit_starting:
            self._fit_starting = False
            self._check_whole_blocks(iterator.num_batches)
        self.built = True
        with self.distribute_strategy.scope():
            for member in self.members:
                member.built = True
                if not member.optimizer.built:
                    member.optimizer.build(member.trainable_variables)
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build([])

    def freeze(self, k):
        """Stops training and evaluating member k; retraces the step without it (unless it
        was the last active one: then the caller stops the fit)."""
        if k not in self.active:
            return
        if len(self.active) == 1:
            return  # nothing else to run: the caller stops training
        self.active.remove(k)
        # Keras's fit calls self.train_function each block: the new one takes effect at
        # the next block; evaluate rebuilds the test function when it is None.
        self.train_function = None
        self.test_function = None
        self.make_train_function()

    def assemble(self):
        """Nothing to do: the members' networks are the trained weights (the grouped
        formulation, training/grouped.py, fills its fused network from them here)."""

    def publish(self, indices):
        """Nothing to do: the members' networks are the trained weights (the grouped
        formulation copies its fused slices into them here)."""
        del indices

    @property
    def step(self):
        """The global step: every active member's optimizer has made it."""
        return int(self.members[self.active[0]].optimizer.iterations.numpy())

