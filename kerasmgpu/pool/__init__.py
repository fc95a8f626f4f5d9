"""Many small models at once: a pool of device workers, and cross-validation on it.

- `workers`: `DevicePool`, one worker process per device (or group of devices), pinned,
  with its share of the cores, the data loaded once per worker; `current_worker()`.
- `pinning`: the environment that makes a process one device with its cores.
- `crossval`: `cross_validate`, k folds of one or several candidates trained concurrently.

The KerasTuner launcher (`kerasmgpu launch --tuner`) is in `kerasmgpu.cluster.tuner`.
"""

from kerasmgpu.pool.crossval import cross_validate, fold_indices, fold_seed, train_fold
from kerasmgpu.pool.workers import DevicePool, TaskError, TaskFailure, current_worker

__all__ = [
    "DevicePool",
    "TaskError",
    "TaskFailure",
    "cross_validate",
    "current_worker",
    "fold_indices",
    "fold_seed",
    "train_fold",
]
