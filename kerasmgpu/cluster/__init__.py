"""Training across machines: a cluster of workers (TF_CONFIG, Slurm), and its launcher.

- `local`: `SingleMachine`, the same interface when there is no cluster.
- `worker`: joining the cluster TF_CONFIG describes, and the collectives between workers
  (gather of outputs, all-reduce of gradients) that `ParallelModel` calls.
- `slurm`: the cluster of a Slurm job step, read with TensorFlow's `SlurmClusterResolver`.
- `backup`: the `BackupAndRestore` that `kerasmgpu launch --backup-dir` adds to `fit`.
- `launch`: `kerasmgpu launch`, the workers of a cluster on this machine, or this node's
  share of a cluster of several nodes (`--hosts`, Slurm), with restarts.
- `sharding`: sharded input, `shard()` (each worker reads its own part of the data) and
  the agreement on steps per epoch when the parts are uneven.
- `supervise`: the launcher's worker processes: start, stream their lines, stop, restart.
- `network`: the private loopback-only network the launcher runs workers in.
- `watchdog`: the process that ends a worker whose peers never start.
- `tuner`: `kerasmgpu launch --tuner`, KerasTuner's chief and one tuner worker per device.
- `epochs`: the workers' agreement on steps per epoch.
- `machine`: this machine for the launchers: free ports, visible GPUs, usable cores.

The public names are re-exported here: `kerasmgpu.cluster.connect()`, `current()`,
`ClusterError`, `parse_tf_config()`, `shard()`, `set_input()`.
"""

import importlib

# Public name -> the module that defines it. Loaded on first use (PEP 562): `kerasmgpu
# launch` imports `kerasmgpu.cluster.launch`, which needs neither TensorFlow nor the
# cluster's collectives, and must answer `--help` at once.
_PUBLIC = {
    "shard": "sharding",
    "sharding_policy": "sharding",
    **{
        name: "worker"
        for name in (
            "ENV_INPUT", "ENV_REGISTER_TIMEOUT", "ENV_TIMEOUT", "Cluster", "ClusterError",
            "connect", "connect_from_environment", "current", "parse_tf_config", "set_input",
            "workers",
        )
    },
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kerasmgpu.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kerasmgpu.cluster.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
