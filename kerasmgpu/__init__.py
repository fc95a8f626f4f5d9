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

What the environment asks for happens on import, before the script can start TensorFlow:
`KERASMGPU_SIMULATED_DEVICES` (and `KERASMGPU_CORES_PER_DEVICE`) split the CPU into
logical devices, and a `TF_CONFIG` naming several tasks (or a Slurm step of several
tasks) joins that cluster, whether or not devices are simulated. The public names
themselves are loaded on first use (PEP 562). The one exception is the `kerasmgpu`
command line, which must answer `--help` without starting TensorFlow: it parses its
arguments first, and the set-up then runs on the first use of the library.
"""

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it (PEP 562 lazy attributes).
_PUBLIC = {
    "ParallelModel": "kerasmgpu.parallel",
    "multi_gpu_model": "kerasmgpu.parallel",
    "SplitModel": "kerasmgpu.split",
    "split_model": "kerasmgpu.split",
    "measure_traffic": "kerasmgpu.comm",
    "measure_memory": "kerasmgpu.comm",
    "DevicePool": "kerasmgpu.pool",
    "cross_validate": "kerasmgpu.pool",
    "resolve_devices": "kerasmgpu.devices",
    "simulate_devices": "kerasmgpu.devices",
    "visible_devices": "kerasmgpu.devices",
    "slice_sizes": "kerasmgpu.slicing",
}

__all__ = sorted([*_PUBLIC, "cluster"])

_environment_applied = False


def _apply_environment():
    """Simulated devices and the TF_CONFIG cluster the environment asks for (once)."""
    global _environment_applied
    if _environment_applied:
        return
    _environment_applied = True
    from kerasmgpu import options

    options.simulated_devices_environment()  # a wrong value fails before TensorFlow loads
    from kerasmgpu import devices
    from kerasmgpu.cluster import worker

    simulated = devices.simulate_devices_from_env()
    joined = worker.connect_from_environment()
    if simulated and joined is None:
        # Fix the simulated devices now, as the variable promises: a later
        # simulate_devices(n) with another n is then an error, not a silent change.
        devices.visible_devices()


def _started_as_command_line():
    """Whether this process is the `kerasmgpu` command (console script or `-m kerasmgpu`)."""
    main = sys.modules.get("__main__")
    if os.path.basename(getattr(main, "__file__", None) or "") == "kerasmgpu":
        return True  # the console script: bin/kerasmgpu
    argv = list(getattr(sys, "orig_argv", []))
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in (
        "kerasmgpu", "kerasmgpu.tools.cli", "kerasmgpu.cluster.launch", "kerasmgpu.bench",
    )


def __getattr__(name):
    if name in _PUBLIC:
        _apply_environment()
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"kerasmgpu.{name}") is None:
        raise AttributeError(f"module 'kerasmgpu' has no attribute {name!r}")
    # A submodule (kerasmgpu.cluster, kerasmgpu.comm, ...), as an eager package had them.
    if name not in ("options", "tools"):
        _apply_environment()
    return importlib.import_module(f"kerasmgpu.{name}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


# Whatever the environment describes (simulated devices, a TF_CONFIG cluster, and any
# other way of joining the cluster module knows) is set up on import, as always.
if not _started_as_command_line():
    _apply_environment()
