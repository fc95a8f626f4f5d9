"""Which devices a search trains on, and the cores the machine offers.

The devices come from kerasmgpu (`kerasmgpu.visible_devices()`: the GPUs, or the
simulated logical CPUs of a machine without GPUs). Each device gets a worker process of
its own from `kerasmgpu.DevicePool`, which pins it to its device and cores.
"""

import os

import kerasmgpu


def available_cores():
    """The number of CPU cores this process may run on (its affinity mask, where known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_devices(devices=None):
    """The device names candidates train on.

    Args:
        devices: None (all of `kerasmgpu.visible_devices()`), an int n >= 1 (the first n),
            or a list of device ids (ints) or names ("/device:GPU:1", "CPU:0", ...).

    Returns:
        A list of visible device names.

    Example:

    ```python
    resolve_devices(2)  # ['/device:CPU:0', '/device:CPU:1'] with 2+ simulated devices
    ```
    """
    return kerasmgpu.resolve_devices(devices, minimum=1, argument="devices")
