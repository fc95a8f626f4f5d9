"""Candidate networks trained concurrently, one per device, on `kerasmgpu.DevicePool`.

The device pool is the library's (`kerasmgpu.DevicePool`): one worker process per device,
started with "spawn", pinned to its device with its share of the cores, that loads the
data once (`zoo.evolve.data.prepare_data`, called once in each worker) and restarts dead
workers. This module adds what a search needs: a task that trains one candidate and turns
a failure into fitness 0, the largest candidates first, and one result dict per candidate.
"""

import functools
import time
import warnings

import kerasmgpu
from kerasmgpu.pool import TaskFailure, current_worker
from zoo.checks import check_whole_number
from zoo.evolve.data import check_dataset, prepare_data
from zoo.evolve.fitness import train_candidate
from zoo.evolve.genome import PARAMETERS, describe, estimated_cost


def _train_task(data, network, seed):
    """A pool task: train one candidate in this worker; a failure gives fitness 0."""
    worker = current_worker()
    start = time.perf_counter()
    try:
        scores, error = train_candidate(network, seed, data, worker.settings), None
    except Exception as exc:
        scores = {"accuracy": 0.0, "test_accuracy": 0.0, "epochs": 0}
        error = f"{type(exc).__name__}: {exc}"
    return {**scores, "error": error, "seconds": time.perf_counter() - start,
            "device": worker.device}


class CandidatePool:
    """Worker processes, one per device, that train candidate networks concurrently.

    Use it as a context manager (or call `start` and `close`). Starting a worker costs a
    few seconds (it imports TensorFlow and loads the data), so one pool serves a whole
    search. Each worker sees only its own GPU; on a machine without GPUs each stands for
    one (simulated) device and limits TensorFlow to its share of the cores. When a worker
    dies (e.g. out of memory) the workers are started afresh and the unfinished
    candidates trained again; the candidate it was training fails after `retries` retries.

    Args:
        dataset: a zoo dataset name (each worker loads it with `zoo.datasets.load`) or
            arrays `((x_train, y_train), (x_test, y_test))`; features are flattened.
        devices: None (all visible devices), an int, or a list of device ids or names;
            one worker per device, so 1 trains candidates one after the other.
        epochs: the most epochs a candidate trains; early stopping usually ends sooner.
        batch_size: training batch size.
        patience: epochs without a lower validation loss before training stops (the
            weights of the best epoch are kept).
        validation_split: fraction of the training set held out to score candidates.
        retries: how many times a candidate whose worker died under it is trained again.

    Example:

    ```python
    with CandidatePool("digits", devices=2) as pool:
        results = pool.train([(network, candidate_seed(0, network)) for network in networks])
    ```
    """

    def __init__(self, dataset="digits", devices=None, epochs=100, batch_size=128, patience=5,
                 validation_split=0.2, retries=2):
        check_whole_number("epochs", epochs, 1)
        check_whole_number("batch_size", batch_size, 1)
        check_whole_number("patience", patience, 0)
        check_whole_number("retries", retries, 0)
        if not 0 < validation_split < 1:
            raise ValueError(
                f"validation_split must be in (0, 1). Received: {validation_split!r}"
            )
        self.dataset = check_dataset(dataset)
        # Handed to the workers when they start (and to replacements when they restart).
        self.settings = {
            "epochs": epochs, "batch_size": batch_size, "patience": patience,
            "validation_split": validation_split,
        }
        self._pool = kerasmgpu.DevicePool(
            devices, data=functools.partial(prepare_data, self.dataset, validation_split),
            settings=self.settings, retries=retries,
        )
        self.devices = self._pool.devices
        self.threads_per_worker = self._pool.threads_per_worker
        self.retries = retries

    @property
    def worker_pids(self):
        """The process ids of the running workers, in device order (empty when stopped)."""
        return self._pool.worker_pids

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def start(self):
        """Start the workers and wait until each has loaded the data. Returns the pool."""
        self._pool.start()
        return self

    def close(self):
        """Stop the workers (idempotent); candidates still training are abandoned."""
        self._pool.close()

    def train(self, candidates, progress=None):
        """Train candidates on the pool's devices, each as soon as a worker is free.

        Args:
            candidates: a list of `(network, seed)` pairs (see `candidate_seed`).
            progress: optional callable, called with each result as it arrives.

        Returns:
            A list of results in the order of `candidates`, each a dict with "params",
            "accuracy" (validation; 0 when training failed), "test_accuracy", "epochs",
            "device", "seconds", "seed" and "error" (None, or what went wrong).
        """
        for network, _ in candidates:
            missing = [name for name in PARAMETERS if name not in network]
            if missing:
                raise ValueError(f"A candidate lacks {missing}. Received: {network!r}")
        # Largest networks first: a big one started last would leave the other workers
        # idle at the end of the generation. The order changes no result.
        order = sorted(range(len(candidates)),
                       key=lambda index: -estimated_cost(candidates[index][0]))
        results = [None] * len(candidates)

        def arrived(position, scores):
            index = order[position]
            if isinstance(scores, TaskFailure):  # its worker died more than `retries` times
                scores = {"accuracy": 0.0, "test_accuracy": 0.0, "epochs": 0,
                          "error": scores.error, "seconds": 0.0,
                          "device": scores.device or "an unknown device"}
            results[index] = self._result(candidates[index], scores, progress)

        self._pool.map(
            _train_task,
            [(dict(candidates[index][0]), int(candidates[index][1])) for index in order],
            on_error="return", callback=arrived,
        )
        return results

    def _result(self, candidate, scores, progress):
        network, seed = candidate
        result = {"params": {name: network[name] for name in PARAMETERS}, **scores,
                  "seed": int(seed)}
        if result["error"] is not None:
            warnings.warn(
                f"Candidate {describe(network)} failed on {result['device']}: "
                f"{result['error']}. Its fitness is 0.",
                RuntimeWarning,
                stacklevel=4,
            )
        if progress is not None:
            progress(result)
        return result
