"""kerasmgpu: `multi_gpu_model` for Keras 3 on TensorFlow.

Public API:
    multi_gpu_model(model, gpus=None, cpu_merge=True, cpu_relocation=False,
                    sync_batchnorm=False, variables="auto", sync_period=1, bucket_bytes=None,
                    teacher_device=None, optimizer_state="full", gradient_dtype="float32")
    ParallelModel(template, devices=None, cpu_merge=True, sync_batchnorm=False,
                  variables="auto", sync_period=1, bucket_bytes=None, teacher_device=None,
                  optimizer_state="full", gradient_dtype="float32")
    measure_traffic(parallel_model, x, y) -> {device: {"sent": bytes, "received": bytes}}
    measure_memory(parallel_model) -> {device: {"weights", "gradients", "optimizer_state"}}
    simulate_devices(n)
    visible_devices()
    resolve_devices(gpus, minimum=2, argument="gpus")
    slice_sizes(batch_size, num_replicas)
    split_model(model, devices, boundaries=None, microbatches=1) -> SplitModel
    cross_validate(build_model, x, y, folds=5, devices=None, seed=0, **fit_kwargs)
    DevicePool(devices=None, data=None, ...): one worker process per device, many tasks
    cluster: multi-worker training (TF_CONFIG, Slurm)
"""

from kerasmgpu import cluster
from kerasmgpu.comm import measure_memory, measure_traffic
from kerasmgpu.devices import (
    resolve_devices,
    simulate_devices,
    simulate_devices_from_env,
    visible_devices,
)
from kerasmgpu.parallel import ParallelModel, multi_gpu_model
from kerasmgpu.pool import DevicePool, cross_validate
from kerasmgpu.slicing import slice_sizes
from kerasmgpu.split import SplitModel, split_model

__version__ = "0.1.0"

# Simulated devices are configured first (before TensorFlow starts), then the cluster
# the environment describes (TF_CONFIG, a Slurm step) is joined, whether or not devices
# are simulated: a GPU machine simulates none and must join all the same.
_simulated = simulate_devices_from_env()
if cluster.connect_from_environment() is None and _simulated:
    # Fix the simulated devices now, as the variable promises: a later
    # simulate_devices(n) with another n is then an error, not a silent change.
    visible_devices()

__all__ = [
    "DevicePool",
    "ParallelModel",
    "SplitModel",
    "cluster",
    "cross_validate",
    "measure_memory",
    "measure_traffic",
    "multi_gpu_model",
    "resolve_devices",
    "simulate_devices",
    "slice_sizes",
    "split_model",
    "visible_devices",
]
