"""Synchronized BatchNormalization: batch statistics of the whole batch, on every replica.

A plain `BatchNormalization` in a replica normalises with the mean and variance of that
replica's slice, so N replicas train differently from one device. A synchronized one
(`BatchNormalization(synchronized=True)`, or every BatchNormalization when the model is
wrapped with `sync_batchnorm=True`) sums its partial statistics over the replicas in the
forward pass: the mean, then the variance around that mean (two passes, as
`tf.nn.moments` computes them on one device), so every replica normalises with the
statistics of the whole batch, updates the moving statistics with them, and
back-propagates the exact gradient (the gradient of a sum over replicas is the sum over
replicas of the upstream gradients: another sum).

The replicas are traced one after the other (replica 0's whole forward pass, then replica
1's), so replica 0 cannot read replica 1's partial sums as tensors. The sums are in-graph
collective all-reduces instead: each replica's op is independent when traced, and they
meet when the step runs. They are the V2 ops with each device's ordering token, as the
gradients' (`kerasmgpu.comm.collective`): ordered on each device, never waiting on another
device's program order, and bounded by the same timeout as the gradients' collectives
(the cluster's collective timeout), so a dead peer ends the step with an error instead of
a hang. The n-th synchronized call of every replica shares one
collective instance key, so keys are handed out by call position, per traced step.

On a cluster the statistics cover every replica of every worker: each sum inside the
machine is followed by one sum across workers (`workers.all_reduce_sum`, the identity on
one machine), issued by replica 0 alone and read by the machine's other replicas. A worker
whose share of a short batch runs on one replica issues the same cross-worker sums in the
same order as one running all its replicas, so workers taking different branches of the
replica-count switch still meet.

Cost: per synchronized layer and step, two small all-reduces forward (channels + 1 floats,
then channels floats; the second needs the first's mean) and one backward (2 x channels);
on a cluster, each once inside the machine and once across workers.
"""

import contextlib
import itertools

import keras
import tensorflow as tf

from kerasmgpu import _compat
from kerasmgpu.comm import collective

# Apart from tf.distribute's small integers and the cluster's keys (170_000_001...).
_GROUP_KEYS = itertools.count(171_000_001)
_WORKER_GROUP_STRIDE = 100_000
_INSTANCE_KEYS = itertools.count(171_000_001)
_groups = {}


def is_batch_normalization(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def synchronized_layers(template, sync_all):
    """The BatchNormalization layers of `template` whose statistics are synchronized."""
    layers = _compat.flatten_layers(template)
    return [
        layer for layer in layers
        if is_batch_normalization(layer) and (sync_all or layer.synchronized)
    ]


class Synchronizer:
    """Makes chosen BatchNormalization layers of a template compute global statistics.

    One per wrapped model. For each traced step, `step(devices)` gives a `StepGroup` whose
    `replica(i)` context is entered around replica i's forward pass.

    Args:
        layers: the BatchNormalization layers to synchronize.
        workers: the workers the statistics are also summed over
            (`kerasmgpu.cluster.workers()`).
    """

    def __init__(self, layers, workers):
        self.layers = list(layers)
        self.workers = workers

    def prepare(self, devices):
        """Eagerly, before a step is traced: the ordering tokens of the replicas'
        collectives (created during the trace, they would make TensorFlow trace the
        step a second time)."""
        if self.layers:
            collective.ordering_tokens(list(devices))

    def step(self, devices, training):
        """The group of the replicas on `devices` for one traced step (a no-op if nothing
        is synchronized, not training, or a single replica in all)."""
        if not self.layers or not training or len(devices) * self.workers.num_workers < 2:
            return _NoSync()
        if tf.executing_eagerly():
            # Eagerly, replica 0's all-reduce would wait for replicas not yet started.
            raise ValueError(
                "Synchronized BatchNormalization needs a traced training step: its replicas "
                "meet in collectives that run concurrently. Compile with run_eagerly=False. "
                "Received: run_eagerly=True (synchronized layers: "
                f"{[layer.name for layer in self.layers]})"
            )
        return StepGroup(self.layers, devices, self.workers)


class _NoSync:
    synchronizes = False  # the replicas may share one traced program (kerasmgpu.tower)

    def replica(self, index):
        return contextlib.nullcontext()


class StepGroup:
    """The replicas of one traced step and the collective keys their layers share."""

    # Each replica's collectives have their own device and role (replica 0 alone sums
    # across workers): replicas are traced one by one, not as one shared program.
    synchronizes = True

    def __init__(self, layers, devices, workers):
        self.layers = layers
        self.devices = tuple(devices)
        self.workers = workers
        if self.devices not in _groups:
            # Group keys are resolved cluster-wide: each worker's machine group has its own.
            _groups[self.devices] = next(_GROUP_KEYS) + _WORKER_GROUP_STRIDE * (
                workers.worker_index
            )
        self.group_key = _groups[self.devices]
        self._keys = []  # collective keys by call position, shared by the replicas
        self._worker_totals = {}  # replica 0's sums across workers, by (position, part)

    def keys_at(self, position):
        """The instance keys of the `position`-th synchronized call of every replica."""
        while len(self._keys) <= position:
            self._keys.append(tuple(next(_INSTANCE_KEYS) for _ in range(3)))
        return self._keys[position]

    @contextlib.contextmanager
    def replica(self, index):
        """While replica `index`'s forward pass is traced, its layers sum over the group."""
        replica = _Replica(self, index)
        for layer in self.layers:
            # During the trace only: the layer's statistics become the group's.
            _compat.replace_batchnorm_moments(layer, replica.moments_function(layer))
        try:
            yield replica
        finally:
            for layer in self.layers:
                _compat.restore_batchnorm_moments(layer)


class _Replica:
    """One replica's side of the group: its device and its count of synchronized calls."""

    def __init__(self, group, index):
        self.group = group
        self.index = index
        self.device = group.devices[index]
        self.calls = 0

    def _sum(self, tensor, instance_key, part):
        """`tensor` summed over the replicas of the group and over the workers (not
        differentiable itself). `part` names the sum: (call position, which sum)."""
        size = len(self.group.devices)
        machine = tensor if size == 1 else collective.all_reduce_participant(
            tensor, self.device, size, self.group.group_key, instance_key,
            getattr(self.group.workers, "timeout_seconds", 0),
        )
        # One cross-worker sum per machine, in the same order on every worker and in both
        # branches of the replica-count switch: replica 0 issues it, the others read it
        # (it is traced first, and the machine sum it reads includes theirs). A replica's
        # own machine sum must still run: replica 0's waits for it.
        totals = self.group._worker_totals
        if self.index == 0:
            totals[part] = self.group.workers.all_reduce_sum([machine])[0]
            return totals[part]
        with tf.device(self.device), tf.control_dependencies([machine]):
            return tf.identity(totals[part])

    def moments_function(self, layer):
        def moments(inputs, mask):
            return self.moments(inputs, mask, _compat.batchnorm_reduction_axes(layer))

        return moments

    def moments(self, inputs, mask, axes):
        """Mean and variance over `axes` of every replica's inputs (mask-weighted).

        Forward: one all-reduce for the sums and counts, one for the squared deviations
        from the global mean. Backward: one all-reduce for both upstream gradients, since
        each replica's mean and variance depend on every replica's inputs. The gradient is
        tf.nn.moments' (the mean is a constant inside the variance, as there).
        """
        mean_key, variance_key, gradient_key = self.group.keys_at(self.calls)
        call = self.calls
        self.calls += 1
        weights = None
        if mask is not None:
            weights = tf.broadcast_to(
                tf.cast(tf.expand_dims(mask, -1), inputs.dtype), tf.shape(inputs)
            )
        shape = [1 if i in axes else -1 for i in range(len(inputs.shape))]

        @tf.custom_gradient
        def moments(x):
            if weights is None:
                count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
                local_sum = tf.reduce_sum(x, axis=axes)
            else:
                count = tf.reduce_sum(weights, axis=axes)
                local_sum = tf.reduce_sum(x * weights, axis=axes)
            channels = local_sum.shape[0]
            totals = self._sum(tf.concat([local_sum, tf.reshape(count, [-1])], 0), mean_key,
                               (call, "mean"))
            total_count = totals[channels:]
            if weights is not None:
                total_count = total_count + keras.backend.epsilon()
            mean = totals[:channels] / total_count
            centered = x - tf.reshape(mean, shape)
            deviations = tf.square(centered) if weights is None else (
                tf.square(centered) * weights
            )
            variance = self._sum(tf.reduce_sum(deviations, axis=axes), variance_key,
                                 (call, "variance"))
            variance = variance / total_count

            def gradient(mean_upstream, variance_upstream):
                upstream = [
                    tf.zeros_like(mean) if g is None else tf.convert_to_tensor(g)
                    for g in (mean_upstream, variance_upstream)
                ]
                totals = self._sum(tf.concat(upstream, 0), gradient_key, (call, "gradient"))
                mean_total, variance_total = totals[:channels], totals[channels:]
                gradient = (
                    tf.reshape(mean_total, shape) + 2.0 * tf.reshape(variance_total, shape)
                    * centered
                ) / tf.reshape(total_count, [1] * len(shape) if weights is None else shape)
                return gradient if weights is None else gradient * weights

            return (mean, variance), gradient

        return moments(inputs)
