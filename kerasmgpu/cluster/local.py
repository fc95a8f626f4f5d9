"""This machine alone: the cluster interface the training step uses, when there is none.

`ParallelModel` talks to "the workers" through one interface whether it trains on one
machine or on a TF_CONFIG cluster (`kerasmgpu.cluster.worker.Cluster`): its worker's rows
of a global batch, gathering outputs, summing gradients and state updates over workers.
On one machine every one of those is the identity, which is what `SingleMachine` does;
the step then reads the same on one machine and on many.
"""

import contextlib

from kerasmgpu import slicing


class SingleMachine:
    """One worker that is the whole cluster: every cross-worker operation is the identity."""

    worker_index = 0
    num_workers = 1
    is_chief = True

    def global_batch(self, x, y, sample_weight, needs_x=False):
        """What a step reads of a batch: `(x_local, x, y, sample_weight, global_size)`.

        One machine's batch is the global batch, whatever the input mode.
        """
        return x, x, y, sample_weight, slicing.batch_size_of(x)

    def agree_on_input(self, call, args, kwargs):
        """`fit`/`evaluate`/`predict` arguments as given: one worker agrees with itself."""
        return args, kwargs

    def local_rows(self, structure, global_size=None):
        """This worker's rows of a global batch: all of them."""
        return structure

    def local_rows_of_gathered(self, tensor, global_size):
        return tensor

    def gather_structure(self, structure, global_size):
        """Every worker's outputs in batch order: this worker's."""
        return structure

    def all_reduce_sum(self, tensors):
        return list(tensors)

    def call_rows(self, size):
        """This worker's rows of a model call's batch: all of them."""
        return 0, size

    def gather_call(self, tensor, size):
        return tensor

    def combine_state(self, variables, values):
        return list(values)

    def total_over_workers(self, local):
        """A scalar summed over workers (its gradient flows to this worker's terms)."""
        return local

    def same_keys_per_branch(self, branches):
        return branches

    def translate_errors(self, what):
        return contextlib.nullcontext()

    def __repr__(self):
        return "SingleMachine()"
