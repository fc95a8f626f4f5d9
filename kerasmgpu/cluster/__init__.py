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

The public names are re-exported here: `kerasmgpu.cluster.connect()`, `current()`,
`ClusterError`, `parse_tf_config()`, `shard()`, `set_input()`.
"""

from kerasmgpu.cluster.sharding import shard, sharding_policy
from kerasmgpu.cluster.worker import (
    ENV_INPUT,
    ENV_REGISTER_TIMEOUT,
    ENV_TIMEOUT,
    Cluster,
    ClusterError,
    connect,
    connect_from_environment,
    current,
    parse_tf_config,
    set_input,
    workers,
)

__all__ = [
    "ENV_INPUT",
    "ENV_REGISTER_TIMEOUT",
    "ENV_TIMEOUT",
    "Cluster",
    "ClusterError",
    "connect",
    "connect_from_environment",
    "current",
    "parse_tf_config",
    "set_input",
    "shard",
    "sharding_policy",
    "workers",
]
