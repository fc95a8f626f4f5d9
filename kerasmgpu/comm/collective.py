"""TensorFlow collective all-reduce between replica devices, in buckets, one group per device set.

Why the V2 ops and ordering tokens: TensorFlow's automatic control dependencies (the pass
that orders a `tf.function`'s stateful ops in program order) chain every stateful op
without a resource input after the previous one. `CollectiveReduceV2` is stateful and,
without an `ordering_token`, has no resource input, so in one process the all-reduce of
replica 1 is made to wait for the all-reduce of replica 0, which itself waits for replica
1: a deadlock that ends at the collective's timeout. The V1 op `CollectiveReduce` escapes
this only because it is listed among the "asynchronous" stateful ops that are never
chained, which also means two V1 collectives on one device run in no defined order (NCCL
needs one). Giving each device a resource of its own as `ordering_token` (what
`tf.distribute` does) makes the chain per device: collectives on one device run in the
order they were issued, devices never wait for each other's program order. See
docs/comm.md.

Buckets: the gradients of a replica are packed, in reverse variable order (the order the
backward pass produces them), into flat buffers of at most `bucket_bytes`; each bucket is
one all-reduce whose inputs are only its own gradients, so the executor can start it
while earlier layers are still back-propagating.
"""

import threading
import weakref
import zlib

import tensorflow as tf

from kerasmgpu import _compat

DEFAULT_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket_cap_mb

# Group keys apart from tf.distribute's (small integers), kerasmgpu.cluster's (170_000_001)
# and kerasmgpu.batchnorm's (171_000_001 up).
_FIRST_GROUP_KEY = 180_000_000
_lock = threading.Lock()
_tokens = {}  # device name -> ordering token: one order per device for every collective
_next_instance_base = [None]  # shared by every Collectives: keys never repeat in a process
# Instance keys: one base per traced step function, then one key per collective in it.
_KEYS_PER_STEP = 16384
_FIRST_INSTANCE_BASE = 1 << 20
AVERAGE_SLOTS = 4096  # first slot of weight averaging in a step (x3 when hierarchical)
SCALE_SLOTS = 2048  # first slot of the float16 scales' max all-reduces (one per bucket)
GRADIENT_DTYPES = ("float32", "bfloat16", "float16")
# float16 buckets are scaled so that the largest value of the sum stays below this: well
# under float16's largest finite value (65504), and small gradients move up with it.
FLOAT16_TARGET = 2.0**14


def communication_hint(devices):
    """NCCL between GPUs, TensorFlow's ring otherwise."""
    kinds = {tf.DeviceSpec.from_string(d).device_type for d in devices}
    return "nccl" if kinds == {"GPU"} else "ring"


def group_key(devices):
    """The collective group key of an ordered set of devices (the same in every worker).

    Derived from the device names, so that every worker computes the same key for a group
    that spans workers and different keys for the in-box groups of different workers.
    """
    return _FIRST_GROUP_KEY + zlib.crc32("|".join(devices).encode()) % 10_000_000


def ordering_tokens(devices):
    """One resource per device (created once) that orders the collectives issued on it."""
    with _lock:
        for device in devices:
            if device not in _tokens:
                with tf.init_scope(), tf.device(device):
                    _tokens[device] = tf.Variable(0.0, trainable=False, name="ordering_token")
        return [_tokens[device] for device in devices]


def all_reduce_participant(tensor, device, group_size, group_key, instance_key,
                           timeout_seconds=0):
    """One participant's sum of `tensor` over a group: the V2 op, ordered on its device.

    For callers that trace each participant on its own (synchronized BatchNorm traces
    replica after replica): the op gets `device`'s ordering token, as every collective
    here does, so it neither deadlocks on another device's program order nor runs in an
    undefined order among this device's collectives, and it fails after
    `timeout_seconds` when a peer never arrives (0: waits for ever).

    Args:
        tensor: this participant's tensor.
        device: the participant's device (the op is placed there).
        group_size, group_key, instance_key: the collective, as every participant names it.
        timeout_seconds: how long to wait for the peers.

    Returns:
        The sum, on `device`.

    Example:

    ```python
    total = all_reduce_participant(partial, "/device:CPU:1", 2, group, key, 60.0)
    ```
    """
    token = ordering_tokens([device])[0]
    with tf.device(device):
        return tf.raw_ops.CollectiveReduceV2(
            input=tensor,
            group_size=group_size,
            group_key=group_key,
            instance_key=instance_key,
            ordering_token=[token.handle],
            merge_op="Add",
            final_op="Id",
            communication_hint=communication_hint([device]),
            timeout_seconds=float(timeout_seconds),
        )


def plan_buckets(variables, bucket_bytes):
    """Indices of `variables` grouped into buckets, last variable first.

    A bucket holds variables of one dtype whose sizes add up to at most `bucket_bytes`
    (a larger variable gets a bucket of its own).

    Returns:
        A list of lists of indices into `variables`.
    """
    buckets, current, current_bytes, current_dtype = [], [], 0, None
    for index in reversed(range(len(variables))):
        variable = variables[index]
        dtype = tf.as_dtype(variable.dtype)
        size = int(tf.TensorShape(variable.shape).num_elements()) * dtype.size
        if current and (dtype != current_dtype or current_bytes + size > bucket_bytes):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
        current_dtype = dtype
    if current:
        buckets.append(current)
    return buckets


class Collectives:
    """All-reduce between the replica devices of one process (and, on a cluster, all workers').

    Args:
        local_devices: this process's replica devices, one collective participant each.
        group_devices: every participant of the group, in the same order on every
            worker (the local devices when there is one process).
        timeout_seconds: how long a collective waits for its peers (0: for ever).
    """

    def __init__(self, local_devices, group_devices=None, timeout_seconds=0):
        self.local_devices = list(local_devices)
        self.group_devices = list(group_devices or local_devices)
        self.group_size = len(self.group_devices)
        self.group_key = group_key(self.group_devices)
        self.hint = communication_hint(self.local_devices)
        self.timeout_seconds = float(timeout_seconds)
        self._tokens = None
        self._bases = weakref.WeakKeyDictionary()

    def build(self):
        """Create the per-device ordering tokens (eagerly, before any step is traced)."""
        if self._tokens is None:
            self._tokens = ordering_tokens(self.local_devices)

    def _instance_key(self, slot):
        """The instance key of collective number `slot` of the step being traced.

        The key depends on the step function (not on the switch branch or cond being
        traced), so every branch of a switch issues the same keys, and workers that take
        different branches in one step still meet.
        """
        graph = _compat.enclosing_function_graph(tf.compat.v1.get_default_graph())
        if graph not in self._bases:
            # TensorFlow fixes an instance key's shape on first use: every traced step
            # of every model gets fresh keys (in the same order on every worker).
            with _lock:
                base = _next_instance_base[0] or _FIRST_INSTANCE_BASE
                _next_instance_base[0] = base + _KEYS_PER_STEP
            self._bases[graph] = base
        if slot >= _KEYS_PER_STEP:
            raise RuntimeError(f"Too many collectives in one step ({slot + 1}).")
        return self._bases[graph] + slot

    def all_reduce(self, per_device, slot, final_op="Id", merge_op="Add"):
        """Sum one flat tensor per local device; every device gets the total.

        Args:
            per_device: one tensor per local device, same shape and dtype.
            slot: the collective's number within the step (0, 1, ...), the same on every
                worker for the same collective.
            final_op: "Id" for the sum, "Div" for the mean over the group.
            merge_op: "Add" (the sum) or "Max" (the largest value, element by element).

        Returns:
            One tensor per local device, on that device.
        """
        return self._on_every_device(
            tf.raw_ops.CollectiveReduceV2, per_device, slot, merge_op=merge_op,
            final_op=final_op,
        )

    def all_gather(self, per_device, slot):
        """Concatenate one tensor per participant (same shapes), in group order, on every device."""
        return self._on_every_device(tf.raw_ops.CollectiveGatherV2, per_device, slot)

    def all_to_all(self, per_device, slot):
        """Exchange rows: device i's row j goes to participant j, which gets one from each.

        Args:
            per_device: one tensor per local device shaped [group size, ...].

        Returns:
            Per local device, a tensor of the same shape whose row j came from
            participant j. A reduce-scatter is this plus a sum over the rows: it moves
            (n - 1) / n of the input each way, as a ring reduce-scatter does (TensorFlow
            has `CollectiveReduceScatterV2` for NCCL only; all-to-all runs everywhere).
        """
        return self._on_every_device(tf.raw_ops.CollectiveAllToAllV2, per_device, slot)

    def _on_every_device(self, op, per_device, slot, **attributes):
        """Issue the collective `op` once per local device, each ordered by its device's token.

        The ordering token orders one device's collectives among themselves only; without
        it, TensorFlow's automatic control dependencies would chain the devices' calls in
        program order and deadlock (docs/comm.md).
        """
        self.build()
        key = self._instance_key(slot)
        results = []
        for device, token, tensor in zip(self.local_devices, self._tokens, per_device):
            with tf.device(device):
                results.append(op(
                    input=tensor, group_size=self.group_size, group_key=self.group_key,
                    instance_key=key, ordering_token=[token.handle],
                    communication_hint=self.hint, timeout_seconds=self.timeout_seconds,
                    **attributes,
                ))
        return results

    def all_reduce_max(self, per_device, slot):
        """The element-wise maximum over the whole group, on every local device."""
        return Collectives.all_reduce(self, per_device, slot, merge_op="Max")

    def float16_scales(self, flats, slot):
        """Per local device, the power of two that float16 buckets are multiplied by.

        Chosen from the largest magnitude over every participant (one scalar max
        all-reduce), so that a sum over the whole group stays below `FLOAT16_TARGET`
        (no overflow) while gradients far below 1 move up out of float16's subnormal
        range (no underflow). A power of two, so scaling and unscaling are exact.
        """
        local_max = []
        for device, flat in zip(self.local_devices, flats):
            with tf.device(device):
                local_max.append(tf.reshape(tf.reduce_max(tf.abs(tf.cast(flat, tf.float32))), [1]))
        largest = self.all_reduce_max(local_max, SCALE_SLOTS + slot)
        scales = []
        for device, value in zip(self.local_devices, largest):
            with tf.device(device):
                total = tf.cast(self.group_size, tf.float32) * value[0]
                exponent = tf.floor(tf.math.log(FLOAT16_TARGET / total) / tf.math.log(2.0))
                exponent = tf.clip_by_value(exponent, -100.0, 100.0)
                scales.append(tf.where(total > 0, tf.pow(2.0, exponent), 1.0))
        return scales

    def compress(self, flats, wire_dtype, slot):
        """`flats` cast to the wire dtype (float16: scaled first); and the scales used."""
        if wire_dtype is None:
            return flats, None
        scales = self.float16_scales(flats, slot) if wire_dtype == tf.float16 else None
        wired = []
        for d, (device, flat) in enumerate(zip(self.local_devices, flats)):
            with tf.device(device):
                if scales is not None:
                    flat = flat * tf.cast(scales[d], flat.dtype)
                wired.append(tf.cast(flat, wire_dtype))
        return wired, scales

    def decompress(self, tensor, dtype, scales, d):
        """A received tensor back in `dtype` (on the current device), unscaled."""
        tensor = tf.cast(tensor, dtype)
        if scales is not None:
            tensor = tensor / tf.cast(scales[d], dtype)
        return tensor

    def all_reduce_buckets(self, per_device_lists, buckets, first_slot=0, final_op="Id",
                           wire_dtype=None):
        """All-reduce lists of tensors bucket by bucket.

        Args:
            per_device_lists: per local device, a list of dense tensors (same shapes
                and dtypes on every device; positions absent from `buckets` are
                passed through).
            buckets: lists of positions (see `plan_buckets`), in the order to issue.
            first_slot: the slot of the first bucket's collective.
            wire_dtype: None, or tf.bfloat16 / tf.float16: each bucket is cast to it
                before the all-reduce (float16: scaled by `float16_scales`) and back
                after, halving the bytes on the links.

        Returns:
            Per local device, the list with every bucketed position reduced.
        """
        results = [list(tensors) for tensors in per_device_lists]
        for number, bucket in enumerate(buckets):
            with tf.name_scope(f"bucket_{number}"):
                flats = []
                for device, tensors in zip(self.local_devices, per_device_lists):
                    with tf.device(device):
                        parts = [tf.reshape(tensors[p], [-1]) for p in bucket]
                        flats.append(parts[0] if len(parts) == 1 else tf.concat(parts, 0))
                dtype = flats[0].dtype
                wired, scales = self.compress(flats, wire_dtype, first_slot + number)
                reduced = self.all_reduce(wired, first_slot + number, final_op=final_op)
                if wire_dtype is not None:
                    for d, device in enumerate(self.local_devices):
                        with tf.device(device):
                            reduced[d] = self.decompress(reduced[d], dtype, scales, d)
                for d, (device, flat) in enumerate(zip(self.local_devices, reduced)):
                    with tf.device(device):
                        sizes = [int(per_device_lists[d][p].shape.num_elements()) for p in bucket]
                        pieces = tf.split(flat, sizes) if len(bucket) > 1 else [flat]
                        for p, piece in zip(bucket, pieces):
                            results[d][p] = tf.reshape(piece, per_device_lists[d][p].shape)
        return results


class HierarchicalCollectives(Collectives):
    """All-reduce in the box, then across workers on 1/N shards, then all-gather in the box.

    Each worker's network link carries 2 (W - 1) / W x the payload (the N local devices
    each exchange one N-th of it with their peers on the other workers), against
    2 (WN - 1) / (WN) x the payload for one flat ring over all W x N devices.

    Args:
        local_devices: this worker's replica devices.
        num_workers: W.
        task_device: `task_device(device, worker)`: `device`'s name on `worker`.
        timeout_seconds: how long a collective waits for its peers (0: for ever).
    """

    def __init__(self, local_devices, num_workers, task_device, timeout_seconds=0):
        super().__init__(local_devices, timeout_seconds=timeout_seconds)
        self.num_workers = num_workers
        self.cross = [
            Collectives([d], [task_device(d, w) for w in range(num_workers)], timeout_seconds)
            for d in local_devices
        ]
        self.total = num_workers * len(local_devices)

    def all_reduce_max(self, per_device, slot):
        local = Collectives.all_reduce(self, per_device, 3 * slot, merge_op="Max")
        return [
            cross.all_reduce_max([value], 3 * slot + 1)[0]
            for cross, value in zip(self.cross, local)
        ]

    def all_reduce(self, per_device, slot, final_op="Id", merge_op="Add"):
        if merge_op != "Add":
            raise ValueError(f"Hierarchical all-reduce sums only. Received: merge_op={merge_op!r}")
        n = len(self.local_devices)
        local = super().all_reduce(per_device, 3 * slot)
        size = int(per_device[0].shape.num_elements())
        edges = [size * i // n for i in range(n + 1)]
        lengths = [b - a for a, b in zip(edges, edges[1:])]
        longest = max(lengths)
        padded = []
        for d, (device, cross) in enumerate(zip(self.local_devices, self.cross)):
            with tf.device(device):
                shard = local[d][edges[d]:edges[d + 1]]
                summed = cross.all_reduce([shard], 3 * slot + 1)[0]
                padded.append(tf.pad(summed, [[0, longest - lengths[d]]]))
        gathered = self.all_gather(padded, 3 * slot + 2)
        results = []
        for device, flat in zip(self.local_devices, gathered):
            with tf.device(device):
                rows = tf.reshape(flat, [n, longest])
                whole = tf.concat([rows[d, :lengths[d]] for d in range(n)], 0)
                if final_op == "Div":
                    whole = whole / tf.cast(self.total, whole.dtype)
                results.append(whole)
        return results
