"""Bytes each device sends and receives in one training step, read from the partitioned graph.

TensorFlow runs a multi-device `tf.function` as one graph per device (the partition
graphs), joined by `_Send`/`_Recv` pairs wherever a tensor crosses devices. Collective
all-reduces do not appear as send/receive pairs: they move their payload themselves, a
ring all-reduce of P bytes over n devices sending and receiving 2 (n - 1) / n x P bytes on
every device (NCCL's ring algorithm moves the same). So one step's traffic is:

- every `_Send`: its tensor's bytes, sent by the sending device and received by the
  receiving one (sizes from the static shapes of the traced step, which `measure_traffic`
  traces on a batch of known size);
- every `CollectiveReduceV2`: 2 (n - 1) / n x its input's bytes, both ways, on its device;
  every `CollectiveGatherV2`: (n - 1) x its input's bytes, both ways; every
  `CollectiveAllToAllV2` (the reduce-scatter of sharded optimizer state): (n - 1) / n x
  its input's bytes, both ways (each of n rows but its own goes to another participant).
  Sizes follow the dtype that travels (half for 16-bit gradients).

Weight averaging that runs every H steps (local SGD) counts 1/H of its bytes per step.
On one process (simulated devices) the "transfers" are in-memory hand-overs, but they are
exactly the transfers a GPU machine would make over its links.
"""

import keras
import numpy as np
import tensorflow as tf

from kerasmgpu import _compat
from kerasmgpu.comm import collective

_SENDS = ("_Send", "_HostSend")
_COLLECTIVES = ("CollectiveReduceV2", "CollectiveReduce")


def measure_traffic(parallel_model, x, y=None, sample_weight=None):
    """Bytes every device sends and receives in one training step of `parallel_model`.

    The step is traced afresh on this batch (its size known, so every transfer has a
    size) and run once with TensorFlow collecting its partitioned graphs; every variable
    (weights, optimizer state, metrics, replica copies) is restored afterwards, so the
    model is left as it was.

    Args:
        parallel_model: a compiled `kerasmgpu.ParallelModel`.
        x, y, sample_weight: one batch, as for `train_on_batch`.

    Returns:
        `{device_name: {"sent": bytes, "received": bytes}}` for every device that sends
        or receives anything, device names as TensorFlow spells them.

    Example:

    ```python
    traffic = kerasmgpu.measure_traffic(parallel, x[:128], y[:128])
    device, sent_or_received = kerasmgpu.comm.traffic.busiest(traffic)
    ```
    """
    if getattr(parallel_model, "optimizer", None) is None:
        raise ValueError(
            "measure_traffic needs a compiled model: call compile() first. "
            f"Received: parallel_model={parallel_model!r} (not compiled)"
        )
    x, y, sample_weight = (
        None if t is None else tf.nest.map_structure(tf.convert_to_tensor, t)
        for t in (x, y, sample_weight)
    )
    _compat.build_for_batch(parallel_model, (x, y, sample_weight))
    optimizer = parallel_model.optimizer
    if not optimizer.built:
        # Built here, as Keras' fit builds it before its first step: built inside the step,
        # its state would be created (on the first call, outside the snapshot, so never
        # restored) and initialised across devices, counted as if it were step traffic.
        optimizer.build(parallel_model.template.trainable_variables)
    strategy = parallel_model.comm
    strategy.prepare(parallel_model.template, optimizer)
    saved = _snapshot(parallel_model, strategy)
    step = tf.function(parallel_model.train_step)
    # As fit hands a batch to train_step: (x,), (x, y) or (x, y, sample_weight), which a
    # template's own train_step (a GAN's, given only images) reads as on one device.
    data = keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
    collected = []
    try:
        # Traced before collecting: what tracing runs eagerly (state a strategy creates
        # on first use, e.g. replica optimizers' slots) is set-up, not a step's traffic.
        graph = step.get_concrete_function(data).graph
        with _compat.run_metadata(collected):
            step(data)
    finally:
        _restore(saved)
    metadata = collected[0]
    period = getattr(strategy, "sync_period", 1)
    return traffic_from_partitions(metadata, _static_shapes(graph), period)


def busiest(traffic):
    """The device that moves the most bytes one way, and that number.

    Links are full duplex, so a device's time on the wire follows the larger of what it
    sends and what it receives.

    Returns:
        `(device_name, bytes)`.
    """
    device = max(traffic, key=lambda d: max(traffic[d]["sent"], traffic[d]["received"]))
    return device, max(traffic[device]["sent"], traffic[device]["received"])


def gradient_bytes(model):
    """G: the bytes of one full set of gradients (the trainable variables)."""
    return int(sum(
        int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in model.trainable_variables
    ))


def summary(parallel_model, x, y=None, sample_weight=None):
    """What a benchmark reports for one mode: busiest device, its bytes, G, per device.

    Returns:
        A dict: "busiest_device", "busiest_bytes" (one way), "gradient_bytes" (G),
        "ring_bytes" (2 (N - 1) / N x G, the ideal all-reduce), "devices" (the
        `measure_traffic` result).
    """
    traffic = measure_traffic(parallel_model, x, y, sample_weight)
    device, moved = busiest(traffic)
    g = gradient_bytes(parallel_model.template)
    n = len(parallel_model.devices)
    return {
        "busiest_device": device,
        "busiest_bytes": moved,
        "gradient_bytes": g,
        "ring_bytes": 2 * (n - 1) / n * g if n > 1 else 0.0,
        "devices": traffic,
    }


# ---------------------------------------------------------------------------------

def traffic_from_partitions(metadata, shapes, sync_period=1):
    """Sum the sends and collectives of every partition graph in `metadata`."""
    traffic = {}

    def add(device, key, amount):
        entry = traffic.setdefault(device, {"sent": 0, "received": 0})
        entry[key] += amount

    for function_graphs in metadata.function_graphs:
        for partition in function_graphs.partition_graphs:
            nodes = {node.name: node for node in partition.node}
            for node in partition.node:
                if node.op in _SENDS:
                    size = _tensor_bytes(node.input[0], nodes, shapes, node.attr["T"].type)
                    add(node.attr["send_device"].s.decode(), "sent", size)
                    add(node.attr["recv_device"].s.decode(), "received", size)
                elif node.op == "CollectiveAllToAllV2":
                    group = _const_int(node, 1, nodes, "group_size")
                    if group is None or group < 2:
                        continue
                    payload = _tensor_bytes(node.input[0], nodes, shapes, node.attr["T"].type)
                    moved = int(round((group - 1) / group * payload))
                    add(node.device, "sent", moved)
                    add(node.device, "received", moved)
                elif node.op == "CollectiveGatherV2":
                    group = _const_int(node, 1, nodes, "group_size")
                    if group is None or group < 2:
                        continue
                    # A ring all-gather passes every other participant's piece along.
                    payload = _tensor_bytes(node.input[0], nodes, shapes, node.attr["T"].type)
                    add(node.device, "sent", (group - 1) * payload)
                    add(node.device, "received", (group - 1) * payload)
                elif node.op in _COLLECTIVES:
                    group = _const_int(node, 1, nodes, "group_size")
                    if group is None or group < 2:
                        continue
                    payload = _tensor_bytes(node.input[0], nodes, shapes, node.attr["T"].type)
                    moved = 2 * (group - 1) / group * payload
                    instance = _const_int(node, 3, nodes, "instance_key")
                    if instance is not None and instance % _keys_per_step() >= (
                        collective.AVERAGE_SLOTS
                    ):
                        moved /= sync_period  # weight averaging runs once every H steps
                    add(node.device, "sent", int(round(moved)))
                    add(node.device, "received", int(round(moved)))
    return traffic


def _keys_per_step():
    return collective._KEYS_PER_STEP  # noqa: SLF001  (same package)


def _static_shapes(graph):
    """{op name: [(shape, dtype) per output]} for the step graph and the graphs it nests."""
    shapes = {}
    pending = [graph]
    seen = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for op in current.get_operations():
            shapes.setdefault(op.name, [(t.shape, t.dtype) for t in op.outputs])
        pending.extend(_compat.nested_function_graphs(current))
    return shapes


def _tensor_bytes(reference, nodes, shapes, dtype_enum):
    """Bytes of the tensor `reference` ("node:index") of a partition graph."""
    name, _, index = reference.lstrip("^").partition(":")
    index = int(index or 0)
    dtype = tf.as_dtype(dtype_enum) if dtype_enum else None
    node = nodes.get(name)
    if node is not None and node.op == "Const":
        tensor = node.attr["value"].tensor
        elements = int(np.prod([d.size for d in tensor.tensor_shape.dim]))
        return elements * tf.as_dtype(tensor.dtype).size
    traced = _traced_shape(name, index, shapes)
    if traced is not None:
        return int(traced[0].num_elements()) * (dtype or traced[1]).size
    if node is not None and node.op in ("Identity", "IdentityN") and node.input:
        return _tensor_bytes(node.input[0], nodes, shapes, dtype_enum)
    if node is not None and node.op.endswith("BackpropFilterWithBias") and index == 1:
        # Where TensorFlow uses oneDNN (Intel CPUs), a convolution's filter and bias
        # gradients are fused into one op, not in the traced step: its second output is
        # the bias gradient, one value per output channel (the filter's last dimension).
        traced = _traced_shape(name, 0, shapes)
        if traced is not None:
            return int(traced[0][-1]) * (dtype or traced[1]).size
    raise ValueError(
        f"measure_traffic could not size the transferred tensor {reference!r}: its shape "
        "is unknown in the traced step."
    )


def _traced_shape(name, index, shapes):
    """(shape, dtype) of output `index` of the traced op `name`, when fully known."""
    # Inlined functions prefix their ops' names (e.g. "cond/then/_3/..."): the name, then
    # ever shorter tails of it.
    for tail in [name] + [name.split("/", n)[-1] for n in range(1, name.count("/") + 1)]:
        if tail in shapes and index < len(shapes[tail]):
            shape, dtype = shapes[tail][index]
            if shape.is_fully_defined():
                return shape, dtype
    return None


def _const_int(node, position, nodes, what):
    if len(node.input) <= position:
        return None
    source = nodes.get(node.input[position].split(":")[0].lstrip("^"))
    if source is None or source.op != "Const":
        return None
    return int(tf.make_ndarray(source.attr["value"].tensor))


def _snapshot(parallel_model, strategy):
    variables = list(parallel_model.variables)
    variables += list(parallel_model.optimizer.variables)
    variables += list(getattr(parallel_model, "metrics_variables", []))
    # A template's own optimizers (a GAN's d_optimizer and g_optimizer), applied by its step.
    variables += [
        v for value in vars(parallel_model.template).values()
        if isinstance(value, keras.optimizers.Optimizer) for v in value.variables
    ]
    if hasattr(strategy, "state_variables"):
        variables += strategy.state_variables()
    unique = {id(v): v for v in variables}
    return [(v, np.array(v.numpy())) for v in unique.values()]


def _restore(saved):
    for variable, value in saved:
        variable.assign(value)
