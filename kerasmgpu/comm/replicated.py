"""Replicated variables: a copy of the weights and of the optimizer per device, all-reduced.

Replica 0's copy *is* the template's trainable variables, updated by the compiled
optimizer, so `save()`, `ModelCheckpoint` and the `.keras` optimizer state are what they
are without replication. Replicas 1..N-1 keep mirrors of those variables on their own
device and optimizer clones built there (same class and configuration; slots are placed
with their variables). Each step:

- synchronous (`sync_period=1`): every replica's gradients are summed with collective
  all-reduces, bucket by bucket in reverse layer order, and every replica applies the
  same summed gradient to its copy: the copies stay bitwise identical (a ring all-reduce
  hands every participant the same bytes, and each device runs the same update).
- local SGD (`sync_period=H > 1`): every replica applies the gradient of its own slice's
  mean loss with its own optimizer state; every H steps the weights are averaged with
  one all-reduce (optimizer states stay local).

The copies are refreshed from the template at the start of every `fit()` and
`train_on_batch()` (after callbacks such as BackupAndRestore have loaded weights), so
weights set on the template outside training (load_weights, set_weights) are picked up.
With local SGD the replicas are averaged at the end of every `fit()`/`train_on_batch()`,
so the template then holds the averaged model.
"""

import contextlib

import keras
import tensorflow as tf

from kerasmgpu.comm import base, collective


def _dense(gradient):
    if gradient is None:
        return None
    return tf.convert_to_tensor(gradient)  # sparse gradients are densified to all-reduce


class Replicated(base.Strategy):
    """Copies of the trainable variables on every replica device, kept equal by all-reduce.

    Args:
        devices: this process's replica devices, in replica order.
        bucket_bytes: the largest all-reduce bucket, in bytes.
        sync_period: average the weights every this many steps (1: all-reduce the
            gradients every step, synchronous training).
        collectives: the all-reduce to use (`collective.Collectives` or
            `collective.HierarchicalCollectives`); default: between `devices`.
        gradient_dtype: "float32" (gradients all-reduced as they are), "bfloat16" or
            "float16" (cast before the all-reduce, back after; float16 scaled).
    """

    name = "replicated"
    optimizer_state = "full"

    def __init__(self, devices, bucket_bytes=collective.DEFAULT_BUCKET_BYTES, sync_period=1,
                 collectives=None, gradient_dtype="float32"):
        self.devices = list(devices)
        self.bucket_bytes = int(bucket_bytes)
        self.sync_period = int(sync_period)
        self.collectives = collectives or collective.Collectives(self.devices)
        self.gradient_dtype = gradient_dtype
        # What travels on the links: None for the variables' own dtype.
        self._wire_dtype = None if gradient_dtype == "float32" else tf.as_dtype(gradient_dtype)
        self._template = None
        self._optimizer = None
        self._signature = None
        self._mirrors = None  # per replica >= 1: list of keras.Variable
        self._clones = None  # per replica >= 1: optimizer
        self._counters = None
        self._sync_requested = True
        self._average_function = None

    # ----------------------------------------------------------------- building
    def build(self, template, optimizer):
        """Create the mirrors, optimizer clones and counters (eagerly, idempotent)."""
        trainable = template.trainable_variables
        signature = [id(v) for v in trainable]
        rebuild = (
            self._mirrors is None
            or self._template is not template
            or self._optimizer is not optimizer
            or signature != self._signature  # layers frozen or unfrozen since
        )
        if not rebuild:
            return
        self._template, self._optimizer = template, optimizer
        self._signature = signature
        # A schedule serializes as a dict; a plain rate as a number (settable).
        self._settable_rate = not isinstance(optimizer.get_config().get("learning_rate"), dict)
        self.collectives.build()
        with tf.init_scope():
            self._mirrors, self._clones = [], []
            for index, device in enumerate(self.devices[1:], start=1):
                with tf.device(device), tf.name_scope(f"replica_{index}_copy"):
                    mirrors = [
                        keras.Variable(
                            # A tensor, not the tf.Variable: that would share its storage.
                            tf.identity(v.value), dtype=v.dtype, trainable=True,
                            name=v.name, aggregation=v.aggregation,
                        )
                        for v in trainable
                    ]
                    clone = self._replica_optimizer(optimizer, mirrors)
                self._mirrors.append(mirrors)
                self._clones.append(clone)
            with tf.device(self.devices[0]):
                self._counters = {
                    "steps_since_exchange": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "exchanges": tf.Variable(0, dtype=tf.int64, trainable=False),
                }
        self._average_function = None
        self._sync_requested = True

    def _replica_optimizer(self, optimizer, mirrors):
        """A replica's optimizer: the compiled one's class and configuration, on its copy."""
        clone = optimizer.__class__.from_config(optimizer.get_config())
        clone.build(mirrors)
        return clone

    @property
    def built(self):
        return self._counters is not None

    @property
    def exchanges(self):
        """How many all-reduce rounds (gradients or weights) training has run."""
        return 0 if self._counters is None else int(self._counters["exchanges"].numpy())

    def replica_variables(self, replica, variables=None):
        """The trainable variables replica `replica` reads and differentiates."""
        if replica == 0:
            return self._template.trainable_variables if variables is None else variables
        return self._mirrors[replica - 1]

    def prepare(self, template, optimizer):
        self.build(template, optimizer)
        self.sync_if_requested()

    @contextlib.contextmanager
    def training_call(self):
        """train_on_batch(): start from the template's weights; end averaged (local SGD)."""
        self.request_sync()
        try:
            yield
        finally:
            self.finish()

    def across_workers(self, gradients, workers):
        return list(gradients)  # the all-reduce group already spans every worker

    def copies(self):
        """Every replica's copy of the trainable variables, replica 0 (the template) first."""
        return [self.replica_variables(i) for i in range(len(self.devices))]

    def state_variables(self):
        """Every variable this strategy adds: mirrors, clones' state, counters."""
        if not self.built:
            return []
        found = [v for mirrors in self._mirrors for v in mirrors]
        found += [v for clone in self._clones for v in clone.variables]
        return found + list(self._counters.values())

    def held_variables(self):
        """Replicas 1..N-1's copies of the weights and their optimizers' state."""
        if not self.built:
            return {"weights": [], "optimizer_state": []}
        return {
            "weights": [v for mirrors in self._mirrors for v in mirrors],
            "optimizer_state": [v for clone in self._clones for v in clone.variables],
        }

    # ----------------------------------------------------- refreshing the copies
    def request_sync(self):
        """Refresh the copies from the template before the next step."""
        self._sync_requested = True

    def sync_if_requested(self):
        if self._sync_requested and self.built:
            self.sync_from_template()

    def sync_from_template(self):
        """Copy the template's weights and optimizer state to every other replica (eager)."""
        template_vars = self._template.trainable_variables
        source_state = self._optimizer.variables
        for mirrors, clone in zip(self._mirrors, self._clones):
            for mirror, variable in zip(mirrors, template_vars):
                mirror.assign(variable.value)
            if len(clone.variables) == len(source_state):
                for target, source in zip(clone.variables, source_state):
                    if tuple(target.shape) == tuple(source.shape):
                        target.assign(source.value)
        self._counters["steps_since_exchange"].assign(0)
        self._sync_requested = False

    # --------------------------------------------------------------- the step
    def combine(self, replica_gradients, shared_gradients, variables, shares=None):
        """Agree on gradients, update replicas 1..N-1, return replica 0's (the template's) update.

        Args:
            replica_gradients: per replica that ran this step (k <= N), gradients with
                respect to its own copy (of its share b_i / B of the global loss).
            shared_gradients: gradients counted once (weight regularization), with
                respect to the template's variables, or None entries.
            variables: the template's trainable variables.
            shares: per replica that ran, b_i / B (needed by local SGD).

        Returns:
            What the compiled optimizer applies to the template (None: no gradient).
        """
        count = len(self.devices)
        ran = len(replica_gradients)
        present = [
            any(g[j] is not None for g in replica_gradients) or shared_gradients[j] is not None
            for j in range(len(variables))
        ]
        if self.sync_period == 1:
            per_replica = self._synchronous_gradients(replica_gradients, shared_gradients, present)
            updates = range(1, count)
        else:
            per_replica = self._local_gradients(
                replica_gradients, shared_gradients, shares, present
            )
            updates = range(1, ran)  # replicas without a slice this step stand still
        optimizer = self._optimizer
        for i in updates:
            clone = self._clones[i - 1]
            pairs = [
                (g, v) for g, v, p in zip(per_replica[i], self._mirrors[i - 1], present) if p
            ]
            with tf.device(self.devices[i]), tf.name_scope(f"replica_{i}_apply"):
                if self._settable_rate:
                    # Follow changes made to the template's optimizer's rate (callbacks
                    # such as ReduceLROnPlateau).
                    clone.learning_rate = optimizer.learning_rate
                clone.apply_gradients(pairs)
        return [g if p else None for g, p in zip(per_replica[0], present)]

    def after_apply(self):
        """Count the exchange (every step), or average the weights every H steps."""
        counters = self._counters
        with tf.device(self.devices[0]), tf.name_scope("exchange"):
            if self.sync_period == 1:
                counters["exchanges"].assign_add(1)
                return
            counters["steps_since_exchange"].assign_add(1)
            since = counters["steps_since_exchange"].read_value()
            tf.cond(
                since >= self.sync_period,
                self._average_and_count,
                lambda: tf.constant(False),
            )

    def _zeros_like_variable(self, j, replica):
        variable = self.replica_variables(replica)[j]
        with tf.device(self.devices[replica]):
            return tf.zeros(variable.shape, variable.dtype)

    def _synchronous_gradients(self, replica_gradients, extra_gradients, present):
        per_device = self._dense_per_device(replica_gradients, extra_gradients, present)
        buckets = [
            [j for j in bucket if present[j]]
            for bucket in collective.plan_buckets(
                self._template.trainable_variables, self.bucket_bytes
            )
        ]
        buckets = [b for b in buckets if b]
        with tf.name_scope("all_reduce_gradients"):
            return self.collectives.all_reduce_buckets(
                per_device, buckets, wire_dtype=self._wire_dtype
            )

    def _dense_per_device(self, replica_gradients, extra_gradients, present):
        """Per device, a dense gradient for every present variable (zeros for a replica
        without a slice this step); the terms counted once are added on device 0."""
        count = len(self.devices)
        per_device = []
        for i in range(count):
            grads = replica_gradients[i] if i < len(replica_gradients) else None
            row = []
            for j, flag in enumerate(present):
                if not flag:
                    row.append(None)
                    continue
                gradient = _dense(grads[j]) if grads is not None else None
                if i == 0 and extra_gradients[j] is not None:
                    with tf.device(self.devices[0]):
                        extra = _dense(extra_gradients[j])
                        gradient = extra if gradient is None else gradient + extra
                row.append(self._zeros_like_variable(j, i) if gradient is None else gradient)
            per_device.append(row)
        return per_device

    def _local_gradients(self, replica_gradients, extra_gradients, shares, present):
        """Each replica's gradient of its own slice's mean loss (plus its regularization)."""
        regularized = [
            (j, v.regularizer) for j, v in enumerate(self._template.trainable_weights)
            if getattr(v, "regularizer", None) is not None
        ]
        per_replica = []
        for i, grads in enumerate(replica_gradients):
            with tf.device(self.devices[i]), tf.name_scope(f"replica_{i}_local_gradients"):
                row = []
                # An empty slice (a worker's share of a tiny last batch) has no gradient.
                scale = tf.math.divide_no_nan(1.0, shares[i])
                for j, flag in enumerate(present):
                    g = grads[j]
                    row.append(
                        None if g is None or not flag
                        else _dense(g) * tf.cast(scale, g.dtype)
                    )
                if i == 0:
                    own = extra_gradients
                else:
                    own = self._regularization_gradients(i, regularized)
                for j, extra in enumerate(own):
                    if extra is not None:
                        row[j] = _dense(extra) if row[j] is None else row[j] + _dense(extra)
                row = [
                    (self._zeros_like_variable(j, i) if g is None and present[j] else g)
                    for j, g in enumerate(row)
                ]
            per_replica.append(row)
        return per_replica

    def _regularization_gradients(self, replica, regularized):
        variables = self.replica_variables(replica)
        result = [None] * len(variables)
        if not regularized:
            return result
        with tf.GradientTape() as tape:
            penalty = tf.add_n([
                tf.cast(regularizer(variables[j]), tf.float32) for j, regularizer in regularized
            ])
        gradients = tape.gradient(penalty, [variables[j] for j, _ in regularized])
        for (j, _), gradient in zip(regularized, gradients):
            result[j] = gradient
        return result

    # ---------------------------------------------------------- weight averaging
    def _average_weights(self):
        """Average every replica's weights with one bucketed all-reduce and assign them."""
        copies = self.copies()
        values = [[tf.convert_to_tensor(v.value) for v in copy] for copy in copies]
        buckets = collective.plan_buckets(self._template.trainable_variables, self.bucket_bytes)
        with tf.name_scope("average_weights"):
            # Slots apart from the gradient all-reduce's: the two may share a step.
            averaged = self.collectives.all_reduce_buckets(
                values, buckets, first_slot=collective.AVERAGE_SLOTS, final_op="Div"
            )
        for i, (copy, new_values) in enumerate(zip(copies, averaged)):
            with tf.device(self.devices[i]):
                for variable, value in zip(copy, new_values):
                    variable.assign(value)

    def _average_and_count(self):
        self._average_weights()
        self._counters["steps_since_exchange"].assign(0)
        self._counters["exchanges"].assign_add(1)
        return tf.constant(True)

    def finish(self):
        """At the end of fit()/train_on_batch(): average the replicas if they drifted."""
        if self.sync_period == 1 or not self.built:
            return
        if int(self._counters["steps_since_exchange"].numpy()) == 0:
            return
        if self._average_function is None:
            self._average_function = tf.function(self._average_and_count)
        self._average_function()

    def fit_callbacks(self, callbacks):
        """`callbacks` with what fit() needs around them: the copies refreshed after every
        other callback's on_train_begin (BackupAndRestore may load weights there), and
        averaged (local SGD) before any other callback's on_train_end."""
        return [_AverageAtEnd(self)] + list(callbacks or []) + [_RefreshAtStart(self)]


class _RefreshAtStart(keras.callbacks.Callback):
    def __init__(self, strategy):
        super().__init__()
        self._strategy = strategy

    def on_train_begin(self, logs=None):
        self._strategy.sync_from_template()


class _AverageAtEnd(keras.callbacks.Callback):
    def __init__(self, strategy):
        super().__init__()
        self._strategy = strategy

    def on_train_end(self, logs=None):
        self._strategy.finish()
