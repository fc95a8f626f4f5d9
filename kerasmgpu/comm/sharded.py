"""Sharded optimizer state (ZeRO stage 1): each device keeps the state of 1/N of the weights.

With `variables="replicated"` every device holds the weights, and normally the whole
optimizer state too (2 x the weights for Adam). With `optimizer_state="sharded"` the
trainable variables are packed, bucket by bucket (`collective.plan_buckets`), into flat
buffers cut into T equal ranges, T = every participant (the replica devices of every
worker); participant p owns range p of every bucket. Device p keeps a flat *shard*
variable per bucket (its range of the weights, the one copy its optimizer updates) and
an optimizer clone built on those shards only, so its slots (momentum, Adam's moments)
cover 1/T of the parameters. Each step:

1. reduce-scatter the gradients: every device packs its gradients into the buckets'
   buffers and sends range p to participant p (one all-to-all per bucket), which sums
   the T pieces it receives. TensorFlow's `CollectiveReduceScatterV2` runs on NCCL only;
   all-to-all runs everywhere and moves the same (T - 1) / T of the buffer each way;
2. clip over the WHOLE gradient (`clipnorm` per variable, `global_clipnorm` over all of
   them: the squared norms of the pieces are summed over the participants), as the
   optimizer would on one device;
3. apply: each device's clone updates its shards (SGD, Adam, AdamW, ... are element-wise,
   so a flat range is updated exactly as the variables it is cut from);
4. all-gather the updated shards into every device's copy of the weights.

Traffic: (T - 1) / T of the buffer out and in for the all-to-all, the same for the
all-gather: 2 (T - 1) / T x G, what a ring all-reduce moves. Memory per device: the
weights (G) plus its shards (G / T), and S / T of optimizer state instead of S.

Files stay ordinary Keras: `ParallelModel.save`, `save_weights` (and so `ModelCheckpoint`
and `BackupAndRestore`) write the template with the WHOLE optimizer state, gathered into
an optimizer built for the occasion (`gathered_optimizer`), which plain Keras loads and
resumes from; `load_weights` scatters a file's state back into the shards. At the end of
every `fit()` the whole state is also parked in the template's own optimizer until the
next training call, so that `template.save()` after training writes it too.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from kerasmgpu import _compat
from kerasmgpu.comm import collective, replicated

# Optimizers whose update is element-wise (each parameter's new value and state depend
# only on its own gradient, value and state): a flat range of parameters can be updated
# on its own. Clipping by norm is done by the strategy over the whole gradient.
ELEMENTWISE_OPTIMIZERS = (
    "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "Nadam", "Lion", "Adadelta",
)
_CLIP_SLOT = 3072  # the clipping norms' all-reduce in a step (apart from buckets, scales)
_GATHER_SLOTS = 1024  # first slot of the weights' all-gathers (one per bucket)


def check_optimizer(optimizer):
    """Raise a clear ValueError (at compile time) for an optimizer sharding cannot run exactly."""
    what = f"Received: optimizer={type(optimizer).__name__}"
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "optimizer_state='sharded' does not support loss scaling (LossScaleOptimizer, "
            "which 'mixed_float16' with compile(auto_scale_loss=True) adds): its check "
            "for non-finite gradients would run on each device's shard alone. Use the "
            "'mixed_bfloat16' policy, compile(auto_scale_loss=False), or "
            f"optimizer_state='full'. {what}"
        )
    name = type(optimizer).__name__
    if type(optimizer) is not getattr(keras.optimizers, name, None) or (
        name not in ELEMENTWISE_OPTIMIZERS
    ):
        raise ValueError(
            "optimizer_state='sharded' updates flat ranges of the parameters, which is "
            "exact only for optimizers whose update is element-wise: "
            f"keras.optimizers.{', '.join(ELEMENTWISE_OPTIMIZERS)}. Use one of them, or "
            f"optimizer_state='full'. {what}"
        )
    if optimizer.use_ema:
        raise ValueError(
            "optimizer_state='sharded' does not support use_ema=True (the moving average "
            "would have to be gathered at the end of every fit). Use use_ema=False or "
            f"optimizer_state='full'. {what} with use_ema=True"
        )
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            "optimizer_state='sharded' does not support gradient_accumulation_steps. "
            f"{what} with gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps}"
        )
    if _compat.weight_decay_exclusions(optimizer):
        raise ValueError(
            "optimizer_state='sharded' applies weight decay to whole flat ranges and "
            "cannot exclude variables from it (exclude_from_weight_decay). "
            f"{what} with exclusions {_compat.weight_decay_exclusions(optimizer)}"
        )


def check_variables(variables):
    """Raise a clear ValueError for trainable variables a flat shard cannot update."""
    for variable in variables:
        if getattr(variable, "constraint", None) is not None:
            raise ValueError(
                "optimizer_state='sharded' updates flat ranges of the parameters and cannot "
                "apply a variable's constraint (e.g. kernel_constraint=). Received: "
                f"variable {variable.path!r} with constraint {variable.constraint!r}"
            )
        if getattr(variable, "overwrite_with_gradient", False):
            raise ValueError(
                "optimizer_state='sharded' cannot update a variable with "
                f"overwrite_with_gradient=True. Received: variable {variable.path!r}"
            )


def build_recording_slots(optimizer, variables):
    """Build `optimizer` on `variables`; return each variable's slots, in creation order.

    Every Keras optimizer creates its per-variable state through the public
    `add_variable_from_reference`; recording those calls tells which slots belong to
    which variable, in an order that is the same for a variable and for its shard (same
    class and configuration).
    """
    slots = {id(v): [] for v in variables}
    original = optimizer.add_variable_from_reference

    def recording(reference_variable, *args, **kwargs):
        slot = original(reference_variable, *args, **kwargs)
        slots.setdefault(id(reference_variable), []).append(slot)
        return slot

    optimizer.add_variable_from_reference = recording
    try:
        optimizer.build(list(variables))
    finally:
        del optimizer.add_variable_from_reference
    return [slots[id(v)] for v in variables]


def _plain_variables(optimizer, slots):
    """The optimizer's variables that are not per-parameter slots (iterations, ...)."""
    slot_ids = {id(s) for per_variable in slots for s in per_variable}
    return [v for v in optimizer.variables if id(v) not in slot_ids]


class _Bucket:
    """A flat buffer of variables (indices into the trainable variables), cut in T ranges."""

    def __init__(self, indices, variables, participants):
        self.indices = list(indices)
        self.sizes = [int(np.prod(variables[j].shape)) for j in self.indices]
        self.shapes = [tuple(variables[j].shape) for j in self.indices]
        self.dtype = tf.as_dtype(variables[self.indices[0]].dtype)
        self.total = sum(self.sizes)
        self.shard = -(-self.total // participants)  # elements per participant
        self.padded = self.shard * participants

    def segment_ids(self, participant, absent):
        """For the range of `participant`, the variable index of each element (padding:
        `absent`)."""
        owner = np.full(self.padded, absent, dtype=np.int32)
        start = 0
        for j, size in zip(self.indices, self.sizes):
            owner[start:start + size] = j
            start += size
        return owner[participant * self.shard:(participant + 1) * self.shard]

    def pack(self, tensors):
        """One flat, padded buffer from this bucket's tensors (aligned with indices)."""
        parts = [tf.reshape(t, [-1]) for t in tensors]
        flat = parts[0] if len(parts) == 1 else tf.concat(parts, 0)
        if self.padded > self.total:
            flat = tf.pad(flat, [[0, self.padded - self.total]])
        return flat

    def unpack(self, flat):
        """The tensors (aligned with indices) of a flat, padded buffer."""
        flat = flat[: self.total]
        pieces = tf.split(flat, self.sizes) if len(self.sizes) > 1 else [flat]
        return [tf.reshape(p, shape) for p, shape in zip(pieces, self.shapes)]


class Sharded(replicated.Replicated):
    """Replicated weights, optimizer state sharded over every participant (ZeRO stage 1).

    Args:
        devices: this process's replica devices, in replica order.
        bucket_bytes: the largest bucket (flat buffer), in bytes.
        collectives: the group of every participant (`collective.Collectives`); default:
            between `devices`.
        first_participant: the group position of `devices[0]` (worker index x N on a
            cluster, whose group lists the devices worker by worker).
        gradient_dtype: what the gradients travel as ("float32", "bfloat16", "float16");
            the update itself is in the variables' dtype.
    """

    shards_optimizer_state = True  # a custom train_step cannot run with it

    optimizer_state = "sharded"

    def __init__(self, devices, bucket_bytes=collective.DEFAULT_BUCKET_BYTES, collectives=None,
                 first_participant=0, gradient_dtype="float32"):
        super().__init__(devices, bucket_bytes, 1, collectives=collectives,
                         gradient_dtype=gradient_dtype)
        self.participants = self.collectives.group_size
        self.first_participant = int(first_participant)
        self._buckets = None
        self._shards = None  # per local device: one flat variable per bucket
        self._shard_clones = None  # per local device: optimizer built on its shards
        self._shard_slots = None  # per local device, per bucket: the shard's slots
        self._parked = None  # between fits: the whole state, as the template's optimizer

    # ----------------------------------------------------------------- building
    def compiled(self, optimizer):
        """At compile time: refuse what cannot be sharded; keep the compiled optimizer light.

        The compiled optimizer (shared with the template) only counts iterations and
        carries the configuration and learning rate: built on no variables here, so
        that Keras does not build it on all of them (the whole state on one device).
        """
        check_optimizer(optimizer)
        if not optimizer.built:
            optimizer.build([])

    def build(self, template, optimizer):
        trainable = template.trainable_variables
        signature = [id(v) for v in trainable]
        if not (
            self._shards is None or self._template is not template
            or self._optimizer is not optimizer or signature != self._signature
        ):
            return
        check_optimizer(optimizer)
        check_variables(trainable)
        super().build(template, optimizer)  # the copies of the weights
        self._buckets = [
            _Bucket(indices, trainable, self.participants)
            for indices in collective.plan_buckets(trainable, self.bucket_bytes)
        ]
        config = dict(optimizer.get_config())
        # Norms are taken by the strategy over the whole gradient, never over a shard.
        config.update(clipnorm=None, global_clipnorm=None)
        self._shards, self._shard_clones, self._shard_slots = [], [], []
        with tf.init_scope():
            for d, device in enumerate(self.devices):
                participant = self.first_participant + d
                with tf.device(device), tf.name_scope(f"replica_{d}_shard"):
                    shards = []
                    for number, bucket in enumerate(self._buckets):
                        flat = bucket.pack([trainable[j].value for j in bucket.indices])
                        start = participant * bucket.shard
                        shards.append(keras.Variable(
                            flat[start:start + bucket.shard], dtype=bucket.dtype,
                            trainable=True, name=f"shard_{number}",
                        ))
                    clone = optimizer.__class__.from_config(config)
                    slots = build_recording_slots(clone, shards)
                self._shards.append(shards)
                self._shard_clones.append(clone)
                self._shard_slots.append(slots)
        # A compiled optimizer built with state for every variable (e.g. a loaded
        # model's, passed to compile): training continues from it.
        self._scatter_state_from(optimizer)

    def prepare(self, template, optimizer):
        self.unpark()
        super().prepare(template, optimizer)

    @contextlib.contextmanager
    def training_call(self):
        """train_on_batch(): start from the template's weights (no gathering after:
        that would cost a whole-state copy per call)."""
        self.request_sync()
        yield

    def finish(self):
        """At the end of fit(): park the whole state in the template's optimizer.

        So that `template.save()` after training writes the whole optimizer state as
        `parallel.save()` does (and `template.load_weights()` can set it); the next
        training call scatters it back (`unpark`). It costs one gather per fit and
        holds the whole state on the template's device between fits.
        """
        if self._shards is None or self._parked is not None:
            return
        self._parked = self._filled_full_optimizer(self._template)
        self._template.optimizer = self._parked

    def unpark(self):
        """Scatter a parked state (maybe loaded since) back into the shards."""
        parked, self._parked = self._parked, None
        if parked is None or self._template.optimizer is not parked:
            return  # not parked, or the template was compiled again since
        self._template.optimizer = self._optimizer
        self._scatter_state_from(parked)

    def _replica_optimizer(self, optimizer, mirrors):
        return None  # replicas update through their shards' optimizers instead

    def state_variables(self):
        """Every variable this strategy adds: copies, shards, their optimizers' state."""
        if not self.built or self._shards is None:
            return []
        found = [v for mirrors in self._mirrors for v in mirrors]
        found += [v for shards in self._shards for v in shards]
        found += [v for clone in self._shard_clones for v in clone.variables]
        return found + list(self._counters.values())

    def held_variables(self):
        """The copies of the weights, the shards, and the shards' optimizers' state."""
        if self._shards is None:
            return {"weights": [], "optimizer_state": []}
        return {
            "weights": [v for mirrors in self._mirrors for v in mirrors]
            + [v for shards in self._shards for v in shards],
            "optimizer_state": [v for clone in self._shard_clones for v in clone.variables],
        }

    def shard_optimizers(self):
        """Each local device's optimizer (built on its shards only), in replica order."""
        return list(self._shard_clones or [])

    def sync_from_template(self):
        """Copy the template's weights to every copy and every shard (eagerly)."""
        self.unpark()
        template_vars = self._template.trainable_variables
        for mirrors in self._mirrors:
            for mirror, variable in zip(mirrors, template_vars):
                mirror.assign(variable.value)
        for d, shards in enumerate(self._shards):
            participant = self.first_participant + d
            with tf.device(self.devices[d]):
                for bucket, shard in zip(self._buckets, shards):
                    flat = bucket.pack([template_vars[j].value for j in bucket.indices])
                    start = participant * bucket.shard
                    shard.assign(flat[start:start + bucket.shard])
        self._counters["steps_since_exchange"].assign(0)
        self._sync_requested = False

    # --------------------------------------------------------------- the step
    def combine(self, replica_gradients, shared_gradients, variables, shares=None):
        """Reduce-scatter, clip, update each device's shards, all-gather every copy.

        Returns:
            None for every variable: the update is applied here, on every device.
        """
        present = [
            any(g[j] is not None for g in replica_gradients) or shared_gradients[j] is not None
            for j in range(len(variables))
        ]
        missing = [variables[j].path for j, p in enumerate(present) if not p]
        if missing:
            raise ValueError(
                "optimizer_state='sharded' needs a gradient for every trainable variable "
                "(each shard is updated as a whole). The loss does not depend on "
                f"{missing}: freeze them (trainable=False) or use optimizer_state='full'."
            )
        per_device = self._dense_per_device(replica_gradients, shared_gradients, present)
        with tf.name_scope("reduce_scatter_gradients"):
            pieces = self._reduce_scatter(per_device)
        with tf.name_scope("clip_gradients"):
            pieces = self._clip(pieces)
        optimizer = self._optimizer
        for d, device in enumerate(self.devices):
            clone = self._shard_clones[d]
            with tf.device(device), tf.name_scope(f"replica_{d}_apply_shard"):
                if self._settable_rate:
                    clone.learning_rate = optimizer.learning_rate
                clone.apply_gradients(list(zip(pieces[d], self._shards[d])))
        with tf.name_scope("all_gather_weights"):
            self._all_gather_weights()
        return [None] * len(variables)

    def after_apply(self):
        """Count the step on the compiled optimizer (its clones counted their own)."""
        with tf.device(self.devices[0]), tf.name_scope("exchange"):
            self._optimizer.iterations.assign_add(1)
            self._counters["exchanges"].assign_add(1)

    def _reduce_scatter(self, per_device):
        """Per local device, per bucket: the sum over all participants of its range."""
        pieces = [[] for _ in self.devices]
        for number, bucket in enumerate(self._buckets):
            with tf.name_scope(f"bucket_{number}"):
                flats = []
                for device, gradients in zip(self.devices, per_device):
                    with tf.device(device):
                        flats.append(bucket.pack([gradients[j] for j in bucket.indices]))
                wired, scales = self.collectives.compress(flats, self._wire_dtype, number)
                rows = []
                for device, flat in zip(self.devices, wired):
                    with tf.device(device):
                        rows.append(tf.reshape(flat, [self.participants, bucket.shard]))
                received = self.collectives.all_to_all(rows, number)
                for d, device in enumerate(self.devices):
                    with tf.device(device):
                        summed = self.collectives.decompress(
                            received[d], bucket.dtype, scales, d
                        ) if self._wire_dtype is not None else received[d]
                        # Summed in the variables' dtype, whatever travelled.
                        pieces[d].append(tf.reduce_sum(summed, axis=0))
        return pieces

    def _clip(self, pieces):
        """Clip as the compiled optimizer would (clipnorm per variable, global_clipnorm
        over all), with each variable's norm summed over every participant's piece."""
        clipnorm = self._optimizer.clipnorm
        global_clipnorm = self._optimizer.global_clipnorm
        if not (clipnorm and clipnorm > 0) and not (global_clipnorm and global_clipnorm > 0):
            return pieces
        count = len(self._template.trainable_variables)
        squares, ids = [], []
        for d, device in enumerate(self.devices):
            participant = self.first_participant + d
            with tf.device(device):
                bucket_ids = [
                    tf.constant(bucket.segment_ids(participant, count))
                    for bucket in self._buckets
                ]
                total = tf.add_n([
                    tf.math.unsorted_segment_sum(
                        tf.square(tf.cast(piece, tf.float32)), segments, count + 1
                    )
                    for piece, segments in zip(pieces[d], bucket_ids)
                ])
            squares.append(total)
            ids.append(bucket_ids)
        # Every variable's squared norm, summed over all participants' pieces.
        squares = self.collectives.all_reduce(squares, _CLIP_SLOT)
        clipped = []
        for d, device in enumerate(self.devices):
            with tf.device(device):
                per_variable = squares[d][:count]
                if clipnorm and clipnorm > 0:
                    # keras' _clip_by_norm, per variable: g * c / max(||g||, c).
                    positive = per_variable > 0
                    safe = tf.where(positive, per_variable, tf.ones_like(per_variable))
                    norms = tf.where(positive, tf.sqrt(safe), per_variable)
                    divisor = tf.concat([tf.maximum(norms, clipnorm), [1.0]], 0)
                    row = [
                        piece * tf.cast(clipnorm, piece.dtype)
                        / tf.cast(tf.gather(divisor, segments), piece.dtype)
                        for piece, segments in zip(pieces[d], ids[d])
                    ]
                else:
                    # keras' clip_by_global_norm.
                    norm = tf.sqrt(tf.reduce_sum(per_variable))
                    scale = global_clipnorm * tf.minimum(1.0 / norm, 1.0 / global_clipnorm)
                    scale = scale + (norm - norm)  # NaN for a non-finite norm, as Keras
                    row = [piece * tf.cast(scale, piece.dtype) for piece in pieces[d]]
            clipped.append(row)
        return clipped

    def _all_gather_weights(self):
        copies = self.copies()
        for number, bucket in enumerate(self._buckets):
            with tf.name_scope(f"bucket_{number}"):
                updated = []
                for d, device in enumerate(self.devices):
                    with tf.device(device):
                        updated.append(tf.convert_to_tensor(self._shards[d][number].value))
                gathered = self.collectives.all_gather(updated, _GATHER_SLOTS + number)
                for d, device in enumerate(self.devices):
                    with tf.device(device):
                        for j, value in zip(bucket.indices, bucket.unpack(gathered[d])):
                            copies[d][j].assign(value)

    # ------------------------------------------------------------- files
    def _gather_flat(self, per_device, slot_base):
        """Eagerly, every participant's flat pieces of each bucket, concatenated."""
        function = tf.function(
            lambda tensors: [
                self.collectives.all_gather([t[number] for t in tensors], slot_base + number)[0]
                for number in range(len(self._buckets))
            ]
        )
        return function(per_device)

    def _gathered_state(self):
        """Per bucket and slot kind, every participant's slot values concatenated."""
        kinds = len(self._shard_slots[0][0]) if self._buckets else 0
        states = []
        for kind in range(kinds):
            per_device = [
                [tf.convert_to_tensor(self._shard_slots[d][b][kind].value)
                 for b in range(len(self._buckets))]
                for d in range(len(self.devices))
            ]
            if self.participants == len(self.devices):
                flats = [
                    tf.concat([per_device[d][b] for d in range(len(self.devices))], 0)
                    for b in range(len(self._buckets))
                ]
            else:
                flats = self._gather_flat(per_device, 0)
            states.append(flats)
        return states

    @contextlib.contextmanager
    def gathered_optimizer(self, template):
        """A context in which `template.optimizer` holds the whole optimizer state.

        An optimizer of the same class and configuration is built on the template's
        variables (where they live: the whole state on one device, for as long as the
        context lasts, as PyTorch's ZeroRedundancyOptimizer consolidates on one rank to
        save), filled from every shard and swapped in; the light compiled optimizer is
        put back after. On a cluster every worker must enter it (its shards are
        gathered with a collective).
        """
        if self._shards is None or self._parked is not None:
            yield  # not built yet, or parked: the template's optimizer is whole already
            return
        with self._full_optimizer_in(template) as full:
            yield full

    @contextlib.contextmanager
    def loading_optimizer(self, template):
        """A context in which `template.optimizer` can load a whole state from a file;
        the state is then scattered into the shards."""
        self.unpark()
        if self._shards is None:
            yield
            return
        # Filled with the current state: a file without optimizer state leaves it as is.
        with self._full_optimizer_in(template) as full:
            yield full
        self._scatter_state_from(full)
        self.request_sync()

    @contextlib.contextmanager
    def _full_optimizer_in(self, template):
        """`template.optimizer` is, inside the block, a whole optimizer holding every shard's
        state; the light compiled optimizer is put back after."""
        compiled = self._optimizer
        full = self._filled_full_optimizer(template)
        template.optimizer = full
        try:
            yield full
        finally:
            template.optimizer = compiled

    def _filled_full_optimizer(self, template):
        """An optimizer built on the template's variables, holding every shard's state."""
        full, slots = self._full_optimizer(template)
        states = self._gathered_state()
        for number, bucket in enumerate(self._buckets):
            for kind, flats in enumerate(states):
                for j, value in zip(bucket.indices, bucket.unpack(flats[number])):
                    slots[j][kind].assign(value)
        counters = self._counters_by_name()
        for target, source in zip(_plain_variables(full, slots), self._clone_plain(0)):
            # The step count and rate are the compiled optimizer's (callbacks set the rate
            # there); anything else (e.g. Nadam's running product) device 0's shard's.
            target.assign(counters.get(target.name, source).value)
        return full

    def _full_optimizer(self, template):
        config = self._optimizer.get_config()
        full = self._optimizer.__class__.from_config(config)
        slots = build_recording_slots(full, template.trainable_variables)
        return full, slots

    def _clone_plain(self, d):
        """Device d's shard optimizer's own variables that are not slots.

        A rate set from the compiled optimizer's variable (`clone.learning_rate =
        optimizer.learning_rate`) is tracked by the clone too: it is not its own.
        """
        clone = self._shard_clones[d]
        foreign = {id(v) for v in self._optimizer.variables}
        return [v for v in _plain_variables(clone, self._shard_slots[d]) if id(v) not in foreign]

    def _counters_by_name(self):
        return {
            v.name: v for v in self._optimizer.variables
            if v.name in ("iteration", "learning_rate")
        }

    def _scatter_state_from(self, optimizer):
        """Copy a whole optimizer's state (built on the template's variables) into the shards.

        Which of `optimizer`'s variables belongs to which parameter is read from the
        positions of a twin built here on the same variables (same class and
        configuration: same order). Returns False when `optimizer` is not built on them.
        """
        variables = self._template.trainable_variables
        twin = optimizer.__class__.from_config(optimizer.get_config())
        twin_slots = build_recording_slots(twin, variables)
        everything = optimizer.variables
        if len(everything) != len(twin.variables):
            return False
        position = {id(v): i for i, v in enumerate(twin.variables)}
        slots = [[everything[position[id(s)]] for s in per] for per in twin_slots]
        plain = [everything[position[id(v)]] for v in _plain_variables(twin, twin_slots)]
        for d, device in enumerate(self.devices):
            participant = self.first_participant + d
            with tf.device(device):
                for number, bucket in enumerate(self._buckets):
                    for kind, target in enumerate(self._shard_slots[d][number]):
                        flat = bucket.pack([slots[j][kind].value for j in bucket.indices])
                        start = participant * bucket.shard
                        target.assign(flat[start:start + bucket.shard])
                for target, source in zip(self._clone_plain(d), plain):
                    target.assign(source.value)
        counters = self._counters_by_name()
        for source in plain:
            if source.name in counters:
                counters[source.name].assign(source.value)
        return True
