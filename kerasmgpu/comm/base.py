"""What the training step asks of a communication strategy (the defaults: one set of variables).

A strategy decides which variables each replica reads, turns the replicas' gradients
into the update the compiled optimizer applies to the template, and may keep state of
its own around training calls (copies to refresh, weights to average).
"""

import contextlib


class Strategy:
    """Base of the strategies in `kerasmgpu.comm`: every replica reads the template's variables."""

    name = "central"
    sync_period = 1
    optimizer_state = "full"
    gradient_dtype = "float32"

    def replica_variables(self, replica, variables):
        """The trainable variables replica `replica` reads and differentiates."""
        return variables

    def combine(self, replica_gradients, shared_gradients, variables, shares=None):
        """The gradients the compiled optimizer applies to `variables` (None: no update)."""
        raise NotImplementedError

    def across_workers(self, gradients, workers):
        """Sum this worker's combined gradients with the other workers' (on a cluster)."""
        return workers.all_reduce_sum(gradients)

    def after_apply(self):
        """Run in the step after the template's update (e.g. periodic weight averaging)."""

    def prepare(self, template, optimizer):
        """Eagerly, before a train function is traced: build whatever the step needs."""

    def fit_callbacks(self, callbacks):
        """The callbacks fit() runs, with any this strategy needs around them."""
        return callbacks

    def training_call(self):
        """A context around one train_on_batch() call."""
        return contextlib.nullcontext()

    def compiled(self, optimizer):
        """At compile time: check the optimizer (a clear error for what cannot work)."""

    def gathered_optimizer(self, template):
        """A context in which `template.optimizer` holds the whole state (to save it)."""
        return contextlib.nullcontext()

    def loading_optimizer(self, template):
        """A context in which `template.optimizer` can load a whole state from a file."""
        return contextlib.nullcontext()

    def held_variables(self):
        """The variables this strategy adds: {"weights": [...], "optimizer_state": [...]}."""
        return {"weights": [], "optimizer_state": []}
