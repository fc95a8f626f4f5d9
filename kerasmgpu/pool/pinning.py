"""How a worker process is made one device (or a group of devices) with its share of cores.

A pool worker is a process of its own, so it is pinned the way a process is pinned before
TensorFlow starts: through environment variables that TensorFlow and CUDA read once. A
worker on GPUs sees only its GPUs (`CUDA_VISIBLE_DEVICES`); on a machine without GPUs a
worker stands for one simulated device (or `KERASMGPU_SIMULATED_DEVICES=d` of them for a
group) and gets its share of the CPU cores as TensorFlow's thread pools.
"""

import os

import tensorflow as tf

from kerasmgpu.devices import ENV_CORES_PER_DEVICE, ENV_SIMULATED_DEVICES


def available_cores():
    """The number of CPU cores this process may run on (its affinity mask, where known).

    Returns:
        An int >= 1.

    Example:

    ```python
    threads = max(1, available_cores() // 2)   # each of two workers gets half
    ```
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _device_key(name):
    """("GPU", 1) for "/device:GPU:1", "GPU:1", "/gpu:1" or a fully qualified name."""
    spec = tf.DeviceSpec.from_string(name if name.startswith("/") else "/" + name)
    return (spec.device_type or "").upper(), spec.device_index or 0


def worker_environment(threads):
    """Environment variables every worker process starts with (None: unset).

    TensorFlow reads them when it starts, so they must be in place before a worker runs
    anything: a worker is its own devices in one process (no simulated split inherited
    from the parent, no cluster) and uses `threads` threads.

    Args:
        threads: TensorFlow intra-op and inter-op threads of the worker.

    Returns:
        A dict of variable name to value, or None for a variable to remove.

    Example:

    ```python
    worker_environment(1)["TF_NUM_INTRAOP_THREADS"]   # "1"
    ```
    """
    return {
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        ENV_SIMULATED_DEVICES: None,
        ENV_CORES_PER_DEVICE: None,
        "TF_CONFIG": None,
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def device_environment(group):
    """The environment variables that pin a worker process to a group of devices.

    Args:
        group: a list of device names of this process (`kerasmgpu.visible_devices()`).

    Returns:
        A dict (None: unset). GPU workers see only their GPUs (their ids among the GPUs
        this process sees); a CPU worker of one device sees no GPU, and a CPU worker of
        d > 1 devices splits its CPU into d simulated devices.

    Example:

    ```python
    device_environment(["/device:GPU:2"])   # {"CUDA_VISIBLE_DEVICES": "2"}
    ```
    """
    keys = [_device_key(name) for name in group]
    if all(kind == "GPU" for kind, _ in keys):
        inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [part.strip() for part in (inherited or "").split(",") if part.strip()]
        chosen = [ids[index] if inherited else str(index) for _, index in keys]
        return {"CUDA_VISIBLE_DEVICES": ",".join(chosen)}
    environment = {}
    if tf.config.list_physical_devices("GPU"):
        environment["CUDA_VISIBLE_DEVICES"] = "-1"
    if len(group) > 1:
        environment[ENV_SIMULATED_DEVICES] = str(len(group))
    return environment


def set_environment(changes):
    """Set (value) or unset (None) environment variables; returns their previous values."""
    saved = {name: os.environ.get(name) for name in changes}
    for name, value in changes.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return saved
