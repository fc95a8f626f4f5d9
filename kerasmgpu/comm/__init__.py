"""How replicas agree on one update: the communication layer of the training step.

The step hands the replicas' gradients to a communication strategy and applies what it
returns. A new algorithm (an all-reduce, compression, periodic averaging) is a class here
with the same `combine` method (`base.Strategy`), chosen by `ParallelModel`'s options.

- `central`: sum every variable's gradients on the device that holds the variable (the
  layout of Keras 2's `multi_gpu_model` and TensorFlow's multi-GPU CIFAR-10 tutorial).
- `replicated`: a copy of the variables and the optimizer per device, gradients summed by
  bucketed collective all-reduces overlapping the backward pass (`collective`), or local
  SGD with the weights averaged every `sync_period` steps.
- `sharded`: replicated weights with the optimizer state sharded over the devices
  (ZeRO stage 1: reduce-scatter, update 1/N, all-gather), `optimizer_state="sharded"`.
- 16-bit gradients (`gradient_dtype`): the collectives of `replicated` and `sharded` move
  bfloat16 or (scaled) float16 gradients; the update stays in the variables' dtype.
- `traffic`: the bytes each device sends and receives in one step (`measure_traffic`);
  `memory`: the bytes each device holds (`measure_memory`).
"""

from kerasmgpu import options
from kerasmgpu.comm import collective
from kerasmgpu.comm.base import Strategy
from kerasmgpu.comm.central import Central
from kerasmgpu.comm.collective import DEFAULT_BUCKET_BYTES, GRADIENT_DTYPES
from kerasmgpu.comm.memory import measure_memory
from kerasmgpu.comm.replicated import Replicated
from kerasmgpu.comm.sharded import Sharded
from kerasmgpu.comm.traffic import measure_traffic

VARIABLE_LAYOUTS = ("auto", "replicated", "central")
OPTIMIZER_STATES = ("full", "sharded")
# How "replicated" all-reduces across workers: "hierarchical" (in the box, across workers
# on 1/N shards, in the box) or "flat" (one ring over every device). Hierarchical moves
# 2 (W-1)/W x G over each worker's network link against 2 (WN-1)/(WN) x G (measured on
# 2 x 2: 14.9 against 22.4 MB a step for G = 7.45 MB). See docs/comm.md.
CLUSTER_ALL_REDUCE = "hierarchical"


def check_layout(variables, sync_period, bucket_bytes, optimizer_state="full",
                 gradient_dtype="float32"):
    """Check the layout options at wrap time; return them normalised.

    `sync_period` accepts numpy integers and `bucket_bytes` whole floats (`25e6`); an option
    that does nothing in the layout asked for (`sync_period`, `bucket_bytes`,
    `optimizer_state="sharded"` or 16-bit gradients with `variables="central"`) is an error
    rather than silently ignored. With "auto" they are accepted: they apply where "auto"
    picks "replicated" (two or more GPUs, or whenever sharded state or 16-bit gradients are
    asked for).

    Returns:
        `(variables, sync_period, bucket_bytes)`.
    """
    options.one_of(
        variables, "variables", VARIABLE_LAYOUTS,
        "'replicated' keeps a copy of the weights per device (all-reduce), 'central' one "
        "copy on one device, 'auto' picks 'replicated' on GPUs and 'central' otherwise.",
    )
    options.one_of(
        optimizer_state, "optimizer_state", OPTIMIZER_STATES,
        "'full' keeps the whole optimizer state with every copy of the weights, 'sharded' "
        "splits it over the devices (with variables='replicated').",
    )
    options.one_of(
        gradient_dtype, "gradient_dtype", GRADIENT_DTYPES,
        "the dtype gradients travel in between devices ('float32': as computed; "
        "'bfloat16' or 'float16': half the bytes).",
    )
    sync_period = options.whole_number(sync_period, "sync_period", minimum=1)
    bucket_bytes = options.byte_size(bucket_bytes, "bucket_bytes", allow_none=True)
    if optimizer_state == "sharded" and variables == "central":
        raise ValueError(
            "optimizer_state='sharded' splits the optimizer state over the copies of the "
            "weights: it needs variables='replicated' (or 'auto'). Received: "
            f"optimizer_state='sharded' with variables={variables!r}"
        )
    if gradient_dtype != "float32" and variables == "central":
        raise ValueError(
            "gradient_dtype compresses the collectives between copies of the weights: it "
            "needs variables='replicated' (or 'auto'). Received: "
            f"gradient_dtype={gradient_dtype!r} with variables={variables!r}"
        )
    if optimizer_state == "sharded" and sync_period != 1:
        raise ValueError(
            "optimizer_state='sharded' is synchronous training (every device updates its "
            "share of the weights every step); local SGD keeps a whole state per replica. "
            f"Received: optimizer_state='sharded' with sync_period={sync_period!r}"
        )
    if sync_period != 1 and variables == "central":
        raise ValueError(
            "sync_period > 1 (local SGD) needs a copy of the weights per device: use "
            f"variables='replicated'. Received: sync_period={sync_period!r} with "
            f"variables={variables!r}"
        )
    if variables == "central":
        options.only_with(
            "bucket_bytes", bucket_bytes, None,
            "variables='replicated' (the all-reduce buckets between weight copies)",
            "variables", variables,
        )
    return variables, sync_period, bucket_bytes


def resolve_layout(variables, devices, sync_period=1, collectives_needed=False):
    """"auto" -> "replicated" on two or more GPUs (or with local SGD, sharded optimizer
    state or 16-bit gradients: `collectives_needed`), else "central".

    Why: on GPUs the copies live in separate memories joined by links, and a ring
    all-reduce moves 2 (N - 1) / N x G bytes per device against (N - 1) x G each way for
    the device holding central variables (measured with `measure_traffic`); the scaling
    predictor puts all-reduce ahead on every link and GPU count. Simulated CPU devices
    share one memory and one set of cores: copies cost memory and save nothing (measured
    step times on this 2-core machine are equal within noise), so "central" stays.
    """
    if variables != "auto":
        return variables
    if sync_period != 1 or collectives_needed:
        return "replicated"
    import tensorflow as tf

    kinds = {tf.DeviceSpec.from_string(d).device_type for d in devices}
    return "replicated" if kinds == {"GPU"} and len(devices) > 1 else "central"


def make_strategy(variables, devices, workers, sync_period=1, bucket_bytes=None,
                  optimizer_state="full", gradient_dtype="float32"):
    """The strategy for a layout, on these replica devices and workers (checked first)."""
    variables, sync_period, bucket_bytes = check_layout(
        variables, sync_period, bucket_bytes, optimizer_state, gradient_dtype
    )
    sharded = optimizer_state == "sharded"
    variables = resolve_layout(
        variables, devices, sync_period,
        collectives_needed=sharded or gradient_dtype != "float32",
    )
    if variables == "central":
        return Central()
    collectives = None
    timeout = getattr(workers, "timeout_seconds", 0)
    if sharded:
        # One group of every device, worker by worker: the shards are 1/(W x N) each.
        group = [
            tf_device_of_task(device, task)
            for task in range(workers.num_workers) for device in devices
        ] if workers.num_workers > 1 else None
        return Sharded(
            devices, bucket_bytes or DEFAULT_BUCKET_BYTES,
            collectives=collective.Collectives(devices, group, timeout),
            first_participant=workers.worker_index * len(devices),
            gradient_dtype=gradient_dtype,
        )
    if workers.num_workers > 1:
        if CLUSTER_ALL_REDUCE == "hierarchical":
            collectives = collective.HierarchicalCollectives(
                devices, workers.num_workers, tf_device_of_task, timeout
            )
        else:
            # One flat group: every worker's replica devices, worker by worker.
            group = [
                tf_device_of_task(device, task)
                for task in range(workers.num_workers) for device in devices
            ]
            collectives = collective.Collectives(devices, group, timeout)
    return Replicated(
        devices, bucket_bytes or DEFAULT_BUCKET_BYTES, sync_period, collectives=collectives,
        gradient_dtype=gradient_dtype,
    )


def tf_device_of_task(device, task):
    """`device`'s name on worker `task` (same job, replica and device, another task)."""
    import tensorflow as tf

    return tf.DeviceSpec.from_string(device).replace(task=task).to_string()


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "GRADIENT_DTYPES",
    "OPTIMIZER_STATES",
    "Central",
    "Replicated",
    "Sharded",
    "Strategy",
    "VARIABLE_LAYOUTS",
    "check_layout",
    "make_strategy",
    "measure_memory",
    "measure_traffic",
    "resolve_layout",
]
