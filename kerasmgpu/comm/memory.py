"""Bytes of weights, gradients and optimizer state each device holds (`measure_memory`).

Weights and optimizer state are variables: each is counted on the device its storage
lives on (`variable.value.device`), wherever it came from (the template, the replicas'
copies, the shards of `optimizer_state="sharded"`, the compiled optimizer and its
replica clones). Gradients are tensors of a step, not variables: each replica's backward
pass produces one gradient per trainable variable it differentiates, on its device (the
placement the project's tests check), so every replica device is counted one full set
in the variables' dtype; with sharded optimizer state it also holds its summed range
(1 / T of the set) while its shard is updated.
"""

import numpy as np
import tensorflow as tf


def _bytes(variable):
    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size


def _device_key(device):
    spec = tf.DeviceSpec.from_string(device)
    return (spec.device_type or "CPU").upper(), spec.device_index or 0


def measure_memory(parallel_model):
    """Bytes of weights, gradients and optimizer state held on each device.

    Build the model's training state first (fit, train_on_batch, or `measure_traffic`):
    before, the optimizer and the replicas' copies do not exist yet.

    Args:
        parallel_model: a compiled `kerasmgpu.ParallelModel`.

    Returns:
        `{device_name: {"weights": bytes, "gradients": bytes, "optimizer_state": bytes,
        "total": bytes}}` for the replica devices and any other device that holds a
        variable (e.g. the host), device names as TensorFlow spells them.

    Example:

    ```python
    parallel.fit(x, y, epochs=1)
    memory = kerasmgpu.measure_memory(parallel)
    busiest = max(memory.values(), key=lambda m: m["optimizer_state"])
    ```
    """
    optimizer = getattr(parallel_model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "measure_memory needs a compiled model: call compile() first. "
            f"Received: parallel_model={parallel_model!r} (not compiled)"
        )
    strategy = parallel_model.comm
    names = {_device_key(d): d for d in parallel_model.devices}
    report = {}

    def add(device, kind, amount):
        key = _device_key(device)
        name = names.setdefault(key, device)
        entry = report.setdefault(
            name, {"weights": 0, "gradients": 0, "optimizer_state": 0, "total": 0}
        )
        entry[kind] += amount
        entry["total"] += amount

    for device in parallel_model.devices:
        add(device, "weights", 0)
    seen = set()

    def count(variables, kind):
        for variable in variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            add(variable.value.device, kind, _bytes(variable))

    template = parallel_model.template
    count(template.variables, "weights")
    held = strategy.held_variables()
    count(held["weights"], "weights")
    count(optimizer.variables, "optimizer_state")
    count(held["optimizer_state"], "optimizer_state")
    # Between fits a sharded state is parked whole in the template's own optimizer.
    template_optimizer = getattr(template, "optimizer", None)
    if template_optimizer is not None:
        count(template_optimizer.variables, "optimizer_state")

    gradient_set = sum(_bytes(v) for v in template.trainable_variables)
    participants = getattr(strategy, "participants", None)
    for device in parallel_model.devices:
        add(device, "gradients", gradient_set)
        if participants:
            add(device, "gradients", -(-gradient_set // participants))
    return report
