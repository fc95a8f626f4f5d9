"""Genetic hyperparameter search over the zoo's MLPs, candidates trained one per device.

The search explores the MLP family of `zoo.mlp` (neurons per layer, number of layers,
activation, optimizer). A generation of networks is trained, each network's fitness is
its validation accuracy after training with early stopping, and the next generation is
bred from the fittest: the best `retain` fraction survive, a few others survive by luck
(`random_select`), and the rest are children whose every parameter comes from one of
two parents, sometimes mutated (`mutate_chance`). `brute` trains the whole grid instead.

Candidates train concurrently, one per device. Each device gets a worker process
(started with the "spawn" method) that sees only its own GPU, or on a machine without
GPUs stands for one simulated device and gets its share of the CPU cores: the Python
training loop holds the interpreter lock, so threads in one process barely overlap
(measured on a 2-core machine, four small MLPs on digits: 1.04x faster than one after
the other with two threads, 1.74x with two processes). As with any "spawn" program, a
script that starts a search must do so under `if __name__ == "__main__":`.

A candidate's training is seeded from the search seed and the candidate's parameters
only, so with a fixed seed the search gives the same ranking whether its candidates
train concurrently or one after the other, on whichever worker.

```
python -m zoo.evolve --dataset digits --population 8 --generations 3 --devices 2
python -m zoo.evolve --dataset digits --mode brute --nb-neurons 64,128 --nb-layers 1,2
python -m zoo.evolve --dataset digits --bench-generation --population 8 --devices 2
```
"""

import argparse
import collections
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import queue
import random
import secrets
import statistics
import sys
import time
import warnings

import numpy as np

import kerasmgpu

# The search space of the MLP genetic search.
CHOICES = {
    "nb_neurons": (64, 128, 256, 512, 768, 1024),
    "nb_layers": (1, 2, 3, 4),
    "activation": ("relu", "elu", "tanh", "sigmoid"),
    "optimizer": ("rmsprop", "adam", "sgd", "adagrad", "adadelta", "adamax", "nadam"),
}
PARAMETERS = tuple(CHOICES)

_ENV_SIMULATED_DEVICES = "KERASMGPU_SIMULATED_DEVICES"
_STARTUP_TIMEOUT_SECONDS = 600


# --------------------------------------------------------------------------------------
# The genetic algorithm (pure functions of a random.Random)
# --------------------------------------------------------------------------------------


def search_space(choices=None):
    """The search space: `CHOICES`, with the entries of `choices` replacing its own.

    Args:
        choices: None, or a dict mapping some of "nb_neurons", "nb_layers", "activation",
            "optimizer" to a non-empty list of values to try.

    Returns:
        A dict with the four parameters, each mapped to a tuple of values.

    Example:

    ```python
    search_space({"nb_layers": [1, 2]})["nb_layers"]  # (1, 2)
    ```
    """
    if choices is None:
        return dict(CHOICES)
    if not isinstance(choices, dict):
        raise ValueError(
            f"choices must be a dict mapping some of {', '.join(PARAMETERS)} to lists of "
            f"values. Received: choices={choices!r}"
        )
    unknown = sorted(set(choices) - set(PARAMETERS))
    if unknown:
        raise ValueError(
            f"choices has unknown parameter(s) {unknown}; the searched parameters are "
            f"{', '.join(PARAMETERS)}. Received: choices={choices!r}"
        )
    space = dict(CHOICES)
    for name, values in choices.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(
                f"choices[{name!r}] must be a list of values. Received: {values!r}"
            )
        values = tuple(values)
        if not values:
            raise ValueError(f"choices[{name!r}] must not be empty. Received: {values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"choices[{name!r}] lists a value twice. Received: {values!r}")
        for value in values:
            _check_value(name, value)
        space[name] = values
    return space


def _check_value(name, value):
    import keras

    if name in ("nb_neurons", "nb_layers"):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} values must be whole numbers >= 1. Received: {value!r}")
    elif name == "activation":
        try:
            keras.activations.get(value)
        except (ValueError, TypeError):
            raise ValueError(
                f"activation values must be Keras activation names such as 'relu'. "
                f"Received: {value!r}"
            ) from None
    elif name == "optimizer":
        try:
            keras.optimizers.get(value)
        except (ValueError, TypeError):
            raise ValueError(
                f"optimizer values must be Keras optimizer names such as 'adam'. "
                f"Received: {value!r}"
            ) from None


def random_network(rng, choices=None):
    """A network drawn uniformly from the search space.

    Args:
        rng: a `random.Random`.
        choices: the search space (default `CHOICES`).

    Returns:
        A dict of the four parameters, e.g.
        `{"nb_neurons": 512, "nb_layers": 2, "activation": "relu", "optimizer": "adam"}`.

    Example:

    ```python
    random_network(random.Random(0))
    ```
    """
    space = choices or CHOICES
    return {name: rng.choice(space[name]) for name in PARAMETERS}


def mutate(network, rng, choices=None):
    """A copy of `network` with one randomly picked parameter drawn afresh."""
    space = choices or CHOICES
    mutant = dict(network)
    name = rng.choice(PARAMETERS)
    mutant[name] = rng.choice(space[name])
    return mutant


def breed(mother, father, rng, mutate_chance=0.2, choices=None):
    """Two children, each parameter taken from either parent; each maybe mutated.

    Args:
        mother, father: networks (dicts of the four parameters).
        rng: a `random.Random`.
        mutate_chance: probability that a child has one parameter redrawn.
        choices: the search space mutations draw from (default `CHOICES`).

    Returns:
        A list of two networks.

    Example:

    ```python
    breed(random_network(rng), random_network(rng), rng)
    ```
    """
    children = []
    for _ in range(2):
        child = {name: rng.choice((mother[name], father[name])) for name in PARAMETERS}
        if rng.random() < mutate_chance:
            child = mutate(child, rng, choices)
        children.append(child)
    return children


def next_generation(networks, accuracies, rng, retain=0.4, random_select=0.1,
                    mutate_chance=0.2, choices=None):
    """Breed the next generation from a scored one.

    The best `retain` fraction survive (at least two, so that there are parents to
    breed from), each other network survives with probability `random_select`, and
    children of two distinct survivors fill the population back to its size. Ties in
    accuracy keep the population's order, so the result depends only on `rng`.

    Args:
        networks: the current generation (list of parameter dicts).
        accuracies: their fitness, in the same order.
        rng: a `random.Random`.
        retain, random_select, mutate_chance: the algorithm's rates, in [0, 1].
        choices: the search space mutations draw from (default `CHOICES`).

    Returns:
        A list of as many networks: the survivors, best first, then the children.

    Example:

    ```python
    networks = next_generation(networks, [0.91, 0.35, 0.88, 0.97], random.Random(0))
    ```
    """
    if len(networks) != len(accuracies):
        raise ValueError(
            f"networks and accuracies must have the same length. Received: "
            f"{len(networks)} networks and {len(accuracies)} accuracies"
        )
    graded = [networks[i] for i in sorted(range(len(networks)), key=lambda i: -accuracies[i])]
    kept = min(len(graded), max(2, int(len(graded) * retain)))
    parents = graded[:kept]
    for network in graded[kept:]:
        if rng.random() < random_select:
            parents.append(network)
    children = []
    while len(parents) + len(children) < len(networks):
        mother, father = rng.sample(range(len(parents)), 2)
        for child in breed(parents[mother], parents[father], rng, mutate_chance, choices):
            if len(parents) + len(children) < len(networks):
                children.append(child)
    return [dict(network) for network in parents] + children


def candidate_seed(seed, network):
    """The seed a network trains with: a function of the search seed and its parameters.

    It does not depend on the order, the worker or the device, which is what makes a
    concurrent search rank like a sequential one.
    """
    text = json.dumps([seed] + [network[name] for name in PARAMETERS])
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % (2**31 - 1)


def _key(network):
    return tuple(network[name] for name in PARAMETERS)


def _estimated_cost(network):
    """A rough relative training cost: weights of the hidden layers (inputs ~1,000 wide)."""
    return network["nb_neurons"] * (1000 + network["nb_neurons"] * (network["nb_layers"] - 1))


def describe(network):
    """A network's parameters as one short line, e.g. "512x2 relu adam"."""
    return (
        f"{network['nb_neurons']}x{network['nb_layers']} "
        f"{network['activation']} {network['optimizer']}"
    )


# --------------------------------------------------------------------------------------
# Training candidates in worker processes
# --------------------------------------------------------------------------------------


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
    import tensorflow as tf

    visible = kerasmgpu.visible_devices()
    shown = ", ".join(visible)
    if devices is None:
        return list(visible)
    if isinstance(devices, bool) or not isinstance(devices, (int, list, tuple)):
        raise ValueError(
            "devices must be None (all visible devices), an int >= 1 or a list of device "
            f"ids or names. Received: devices={devices!r}"
        )
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices must be at least 1. Received: devices={devices}")
        if devices > len(visible):
            raise ValueError(
                f"devices={devices} asks for more devices than are visible: {len(visible)} "
                f"({shown}). On a machine without GPUs, call "
                f"kerasmgpu.simulate_devices({devices}) first (or set "
                f"{_ENV_SIMULATED_DEVICES}={devices} before starting Python)."
            )
        return list(visible[:devices])
    if not devices:
        raise ValueError("devices must list at least one device. Received: devices=[]")
    resolved = []
    for entry in devices:
        if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
            match = visible[entry] if 0 <= entry < len(visible) else None
        elif isinstance(entry, str):
            wanted = tf.DeviceSpec.from_string(entry if entry.startswith("/") else "/" + entry)
            match = None
            for name in visible:
                spec = tf.DeviceSpec.from_string(name)
                if (spec.device_type or "").upper() == (wanted.device_type or "").upper() and (
                    spec.device_index == (wanted.device_index or 0)
                ):
                    match = name
        else:
            raise ValueError(
                "Each entry of devices must be a device id (int) or name (str). "
                f"Received: {entry!r} in devices={list(devices)}"
            )
        if match is None:
            raise ValueError(
                f"Device {entry!r} in devices={list(devices)} is not visible. Visible "
                f"devices: {shown}."
            )
        if match in resolved:
            raise ValueError(f"Device {entry!r} appears twice in devices={list(devices)}.")
        resolved.append(match)
    return resolved


def _check_dataset(dataset):
    if isinstance(dataset, str):
        from zoo import datasets

        if dataset not in datasets.names():
            raise ValueError(
                f"Unknown dataset {dataset!r}. Known datasets: {', '.join(datasets.names())}."
            )
        return dataset
    try:
        (x_train, y_train), (x_test, y_test) = dataset
        arrays = [np.asarray(array) for array in (x_train, y_train, x_test, y_test)]
    except (TypeError, ValueError):
        raise ValueError(
            "dataset must be a zoo dataset name such as 'digits' or arrays "
            "((x_train, y_train), (x_test, y_test)). Received an object of type "
            f"{type(dataset).__name__}"
        ) from None
    x_train, y_train, x_test, y_test = arrays
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(
            "dataset features and labels must have as many rows. Received: "
            f"x_train {x_train.shape}, y_train {y_train.shape}, x_test {x_test.shape}, "
            f"y_test {y_test.shape}"
        )
    if len(x_train) < 2 or len(x_test) < 1:
        raise ValueError(
            "dataset needs at least 2 training and 1 test example. Received: "
            f"{len(x_train)} and {len(x_test)}"
        )
    return ((x_train, y_train), (x_test, y_test))


def _prepare_data(dataset, validation_split):
    """Flat float32 features and int labels, with a validation set taken from training."""
    if isinstance(dataset, str):
        from zoo import datasets

        dataset = datasets.load(dataset, flatten=True)
    (x_train, y_train), (x_test, y_test) = dataset

    def features(x):
        x = np.asarray(x, dtype="float32")
        return x.reshape(len(x), -1)

    def labels(y):
        y = np.asarray(y)
        return (y.argmax(axis=-1) if y.ndim > 1 else y).astype("int32")

    x_train, x_test = features(x_train), features(x_test)
    y_train, y_test = labels(y_train), labels(y_test)
    # A fixed split, whatever the search seed: every search scores on the same examples.
    order = np.random.default_rng(0).permutation(len(x_train))
    held_out = min(len(x_train) - 1, max(1, round(len(x_train) * validation_split)))
    validation, fit = order[:held_out], order[held_out:]
    return {
        "fit": (x_train[fit], y_train[fit]),
        "validation": (x_train[validation], y_train[validation]),
        "test": (x_test, y_test),
        "input_dim": x_train.shape[1],
        "num_classes": int(max(y_train.max(), y_test.max())) + 1,
    }


def _train_candidate(network, seed, data, settings):
    """Train one network; its validation and test accuracy. Raises on a non-finite loss."""
    import keras

    from zoo import models

    keras.backend.clear_session()
    # Seeds the weights, dropout and the batch order, whatever ran in this process before.
    keras.utils.set_random_seed(seed)
    model = models.mlp(
        network["nb_neurons"], network["nb_layers"], network["activation"],
        network["optimizer"], input_dim=data["input_dim"], num_classes=data["num_classes"],
    )
    stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=settings["patience"], restore_best_weights=True
    )
    history = model.fit(
        *data["fit"], batch_size=settings["batch_size"], epochs=settings["epochs"],
        validation_data=data["validation"], shuffle=True, verbose=0,
        callbacks=[stopping, keras.callbacks.TerminateOnNaN()],
    )
    losses = history.history["loss"]
    for epoch, loss in enumerate(losses, start=1):
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} in epoch {epoch}")
    validation_loss, validation_accuracy = model.evaluate(
        *data["validation"], batch_size=settings["batch_size"], verbose=0
    )
    if not math.isfinite(validation_loss):
        raise FloatingPointError(f"the validation loss is {validation_loss}")
    _, test_accuracy = model.evaluate(*data["test"], batch_size=settings["batch_size"], verbose=0)
    return {
        "accuracy": float(validation_accuracy),
        "test_accuracy": float(test_accuracy),
        "epochs": len(losses),
    }


def _worker_main(index, dataset, settings, inbox, outbox):
    """A worker process: load the data once, then train the candidates it is sent."""
    try:
        try:
            import tensorflow as tf

            # The environment set these before TensorFlow started; say it again in case
            # TensorFlow ignores the variables, which it may only while uninitialised.
            with contextlib.suppress(RuntimeError):
                tf.config.threading.set_intra_op_parallelism_threads(settings["threads"])
                tf.config.threading.set_inter_op_parallelism_threads(settings["threads"])
            data = _prepare_data(dataset, settings["validation_split"])
        except Exception as error:  # reported to the parent, which raises it
            outbox.put(("startup_error", index, f"{type(error).__name__}: {error}"))
            return
        outbox.put(("ready", index, os.getpid()))
        while True:
            task = inbox.get()
            if task is None:
                return
            task_id, network, seed = task
            start = time.perf_counter()
            try:
                scores, error = _train_candidate(network, seed, data, settings), None
            except Exception as exc:  # a failing candidate gets fitness 0, not a crash
                scores = {"accuracy": 0.0, "test_accuracy": 0.0, "epochs": 0}
                error = f"{type(exc).__name__}: {exc}"
            scores.update(error=error, seconds=time.perf_counter() - start)
            outbox.put(("result", index, (task_id, scores)))
    except KeyboardInterrupt:
        return


@contextlib.contextmanager
def _environment(changes):
    """Set (value) or unset (None) environment variables for a child about to start."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CandidatePool:
    """Worker processes, one per device, that train candidate networks concurrently.

    Use it as a context manager (or call `start` and `close`). Starting a worker costs a
    few seconds (it imports TensorFlow and loads the data), so one pool serves a whole
    search. Each worker sees only its own GPU; on a machine without GPUs each stands for
    one (simulated) device and limits TensorFlow to its share of the cores. A worker
    that dies (e.g. out of memory) fails its candidate and is replaced.

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

    Example:

    ```python
    with CandidatePool("digits", devices=2) as pool:
        results = pool.train([(network, candidate_seed(0, network)) for network in networks])
    ```
    """

    def __init__(self, dataset="digits", devices=None, epochs=100, batch_size=128, patience=5,
                 validation_split=0.2):
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1. Received: {name}={value!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a whole number >= 0. Received: {patience!r}")
        if not 0 < validation_split < 1:
            raise ValueError(
                f"validation_split must be in (0, 1). Received: {validation_split!r}"
            )
        self.dataset = _check_dataset(dataset)
        self.devices = resolve_devices(devices)
        self.threads_per_worker = max(1, _available_cores() // len(self.devices))
        self.settings = {
            "epochs": epochs, "batch_size": batch_size, "patience": patience,
            "validation_split": validation_split, "threads": self.threads_per_worker,
        }
        self._context = multiprocessing.get_context("spawn")
        self._outbox = None
        self._workers = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def _child_environment(self, device):
        import tensorflow as tf

        threads = str(self.threads_per_worker)
        changes = {
            "TF_NUM_INTRAOP_THREADS": threads,
            "TF_NUM_INTEROP_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            # A worker is one device of one process: no simulated split, no cluster.
            _ENV_SIMULATED_DEVICES: None,
            "TF_CONFIG": None,
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        }
        spec = tf.DeviceSpec.from_string(device)
        if (spec.device_type or "").upper() == "GPU":
            index = spec.device_index or 0
            inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [part for part in (inherited or "").split(",") if part.strip()]
            changes["CUDA_VISIBLE_DEVICES"] = ids[index] if inherited else str(index)
        elif tf.config.list_physical_devices("GPU"):
            # A CPU worker on a machine with GPUs: keep it off the GPUs.
            changes["CUDA_VISIBLE_DEVICES"] = "-1"
        return changes

    def _spawn(self, index):
        inbox = self._context.Queue()
        process = self._context.Process(
            target=_worker_main,
            args=(index, self.dataset, self.settings, inbox, self._outbox),
            name=f"zoo.evolve worker {index} ({self.devices[index]})",
            daemon=True,
        )
        with _environment(self._child_environment(self.devices[index])):
            process.start()
        worker = {"process": process, "inbox": inbox, "ready": False, "task": None}
        if index < len(self._workers):
            self._workers[index] = worker
        else:
            self._workers.append(worker)

    def start(self):
        """Start the workers and wait until each has loaded the data. Returns the pool."""
        if self._workers:
            return self
        self._outbox = self._context.Queue()
        try:
            for index in range(len(self.devices)):
                self._spawn(index)
            deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
            while not all(worker["ready"] for worker in self._workers):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"zoo.evolve workers did not start within {_STARTUP_TIMEOUT_SECONDS} s"
                    )
                self._receive(results=None, timeout=0.5)
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Stop the workers (idempotent)."""
        for worker in self._workers:
            if worker["process"].is_alive():
                with contextlib.suppress(Exception):
                    worker["inbox"].put(None)
        for worker in self._workers:
            worker["process"].join(timeout=10)
            if worker["process"].is_alive():
                worker["process"].terminate()
                worker["process"].join(timeout=5)
        for worker in self._workers:
            worker["inbox"].close()
        if self._outbox is not None:
            self._outbox.close()
        self._workers = []
        self._outbox = None

    def _receive(self, results, timeout):
        """Handle one message from the workers, or notice workers that died."""
        try:
            kind, index, payload = self._outbox.get(timeout=timeout)
        except queue.Empty:
            self._replace_dead_workers(results)
            return
        worker = self._workers[index]
        if kind == "startup_error":
            raise RuntimeError(
                f"The zoo.evolve worker for {self.devices[index]} could not start: {payload}"
            )
        if kind == "ready":
            worker["ready"] = True
        elif kind == "result":
            task_id, scores = payload
            worker["task"] = None
            results[task_id] = scores

    def _replace_dead_workers(self, results):
        for index, worker in enumerate(self._workers):
            if worker["process"].is_alive():
                continue
            code = worker["process"].exitcode
            if not worker["ready"]:
                raise RuntimeError(
                    f"The zoo.evolve worker for {self.devices[index]} exited with code {code} "
                    "while starting (see its error above). A script that starts a search "
                    "must do so under `if __name__ == \"__main__\":`, because each worker "
                    "process imports the script first."
                )
            if worker["task"] is not None and results is not None:
                results[worker["task"]] = {
                    "accuracy": 0.0, "test_accuracy": 0.0, "epochs": 0, "seconds": 0.0,
                    "error": f"its worker process exited with code {code}",
                }
            worker["inbox"].close()
            self._spawn(index)

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
        self.start()
        for network, _ in candidates:
            missing = [name for name in PARAMETERS if name not in network]
            if missing:
                raise ValueError(f"A candidate lacks {missing}. Received: {network!r}")
        # Largest networks first: a big one started last would leave the other workers
        # idle at the end of the generation. The order changes no result.
        pending = collections.deque(sorted(
            range(len(candidates)), key=lambda task_id: -_estimated_cost(candidates[task_id][0])
        ))
        finished, device_of, results = {}, {}, [None] * len(candidates)
        done = 0
        while done < len(candidates):
            for index, worker in enumerate(self._workers):
                if pending and worker["ready"] and worker["task"] is None:
                    task_id = pending.popleft()
                    network, seed = candidates[task_id]
                    worker["task"] = task_id
                    device_of[task_id] = self.devices[index]
                    worker["inbox"].put((task_id, dict(network), int(seed)))
            self._receive(finished, timeout=0.2)
            for task_id in list(finished):
                network, seed = candidates[task_id]
                result = {
                    "params": {name: network[name] for name in PARAMETERS},
                    **finished.pop(task_id),
                    "device": device_of[task_id],
                    "seed": int(seed),
                }
                if result["error"] is not None:
                    warnings.warn(
                        f"Candidate {describe(network)} failed on {result['device']}: "
                        f"{result['error']}. Its fitness is 0.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                results[task_id] = result
                done += 1
                if progress is not None:
                    progress(result)
        return results


# --------------------------------------------------------------------------------------
# Searches
# --------------------------------------------------------------------------------------


def _check_rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1]. Received: {name}={value!r}")


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name} must be a whole number >= {minimum}. Received: {name}={value!r}"
        )


def _check_seed(seed):
    if seed is None:
        # Drawn and returned, so that any run can be repeated.
        return secrets.randbelow(2**31 - 1)
    _check_count("seed", seed, 0)
    return seed


def _printer(verbose, progress):
    """The per-candidate callback: `progress`, and a printed line when `verbose`."""

    def report(result):
        if verbose:
            print(format_result(result), flush=True)
        if progress is not None:
            progress(result)

    return report


def format_result(result):
    """One progress line for a trained candidate (parameters, accuracy, device, time)."""
    failed = f"  FAILED: {result['error']}" if result["error"] else ""
    generation = f"gen {result['generation']}  " if "generation" in result else ""
    return (
        f"{generation}{describe(result['params']):<28} accuracy {result['accuracy']:.4f}  "
        f"test {result['test_accuracy']:.4f}  {result['epochs']:>3} epochs  "
        f"{result['device']}  {result['seconds']:.1f} s{failed}"
    )


def format_ranking(ranking, top=None):
    """The ranking as a text table, best first."""
    rows = ranking if top is None else ranking[:top]
    lines = [
        f"{'rank':>4}  {'accuracy':>8}  {'test':>6}  {'neurons':>7}  {'layers':>6}  "
        f"{'activation':<10}  optimizer"
    ]
    for rank, entry in enumerate(rows, start=1):
        params = entry["params"]
        lines.append(
            f"{rank:>4}  {entry['accuracy']:>8.4f}  {entry['test_accuracy']:>6.4f}  "
            f"{params['nb_neurons']:>7}  {params['nb_layers']:>6}  "
            f"{params['activation']:<10}  {params['optimizer']}"
        )
    return "\n".join(lines)


def _rank(entries):
    # A stable sort: ties keep their order, which is itself fixed by the seed.
    return sorted(entries, key=lambda entry: -entry["accuracy"])


def evolve(dataset="digits", population=20, generations=10, devices=None, seed=None,
           epochs=100, batch_size=128, patience=5, validation_split=0.2, retain=0.4,
           random_select=0.1, mutate_chance=0.2, choices=None, verbose=0, progress=None):
    """Search MLP hyperparameters with a genetic algorithm, candidates trained concurrently.

    Each generation's networks train one per device (a worker process per device) and
    are scored by validation accuracy; the next generation is bred with
    `next_generation`. A network met again (a survivor, or a child equal to an earlier
    network) keeps its score instead of training again: its training would be the same,
    since it is seeded by `candidate_seed(seed, network)`. So with a fixed seed the
    ranking is the same whatever `devices` is.

    Args:
        dataset: a zoo dataset name ("digits", "mnist", "cifar10", ...) or arrays
            `((x_train, y_train), (x_test, y_test))`; images are flattened for the MLPs.
        population: networks per generation (>= 2).
        generations: number of generations (>= 1).
        devices: None (all visible devices), an int, or a list of device ids or names;
            1 trains the candidates one after the other.
        seed: seeds the search and every candidate's training; None draws one (returned).
        epochs: the most epochs a candidate trains; early stopping usually ends sooner.
        batch_size: training batch size.
        patience: early stopping's patience, in epochs without a lower validation loss.
        validation_split: fraction of the training set held out for the fitness.
        retain, random_select, mutate_chance: the algorithm's rates.
        choices: restrict the search space, e.g. `{"nb_layers": [1, 2]}`.
        verbose: 1 prints a line per candidate and per generation, 0 prints nothing.
        progress: optional callable, called with each candidate's result as it arrives.

    Returns:
        A dict of plain data:
        - "ranking": the final generation, best first: dicts with "params",
          "accuracy" (validation), "test_accuracy", "epochs", "device", "seconds",
          "seed", "generation" (when it was trained) and "error";
        - "history": per generation, "generation", "accuracies" (in population order),
          "best", "mean", "trained" (networks newly trained) and "seconds" (wall time);
        - "seed", "devices", "settings".

    Example:

    ```python
    result = zoo.evolve("digits", population=8, generations=3, devices=2, seed=0)
    result["ranking"][0]["params"]  # e.g. {'nb_neurons': 768, 'nb_layers': 2, ...}
    [generation["best"] for generation in result["history"]]
    ```
    """
    _check_count("population", population, 2)
    _check_count("generations", generations, 1)
    for name, value in (("retain", retain), ("random_select", random_select),
                        ("mutate_chance", mutate_chance)):
        _check_rate(name, value)
    seed = _check_seed(seed)
    space = search_space(choices)
    report = _printer(verbose, progress)
    rng = random.Random(seed)
    networks = [random_network(rng, space) for _ in range(population)]
    scores, history = {}, []
    pool = CandidatePool(dataset, devices, epochs=epochs, batch_size=batch_size,
                         patience=patience, validation_split=validation_split)
    with pool:
        for generation in range(1, generations + 1):
            start = time.perf_counter()
            new = []
            for network in networks:
                if _key(network) not in scores and all(_key(n) != _key(network) for n in new):
                    new.append(network)

            def tag(result, generation=generation):
                result["generation"] = generation
                report(result)

            trained = pool.train([(n, candidate_seed(seed, n)) for n in new], progress=tag)
            for result in trained:
                scores[_key(result["params"])] = result
            accuracies = [scores[_key(network)]["accuracy"] for network in networks]
            history.append({
                "generation": generation,
                "accuracies": accuracies,
                "best": max(accuracies),
                "mean": statistics.fmean(accuracies),
                "trained": len(new),
                "seconds": time.perf_counter() - start,
            })
            if verbose:
                entry = history[-1]
                print(
                    f"generation {generation}/{generations}: best {entry['best']:.4f}, "
                    f"mean {entry['mean']:.4f}, {entry['trained']} trained in "
                    f"{entry['seconds']:.1f} s",
                    flush=True,
                )
            if generation < generations:
                networks = next_generation(networks, accuracies, rng, retain, random_select,
                                           mutate_chance, space)
    ranking = _rank([dict(scores[_key(network)]) for network in networks])
    return {
        "ranking": ranking,
        "history": history,
        "seed": seed,
        "devices": list(pool.devices),
        "settings": {
            "dataset": dataset if isinstance(dataset, str) else "arrays",
            "population": population, "generations": generations, "epochs": epochs,
            "batch_size": batch_size, "patience": patience,
            "validation_split": validation_split, "retain": retain,
            "random_select": random_select, "mutate_chance": mutate_chance,
            "choices": {name: list(values) for name, values in space.items()},
        },
    }


def brute(dataset="digits", choices=None, devices=None, seed=None, epochs=100, batch_size=128,
          patience=5, validation_split=0.2, verbose=0, progress=None):
    """Train every network of the search space (the grid), concurrently; rank them.

    The full grid has 6 x 4 x 4 x 7 = 672 networks; `choices` narrows it.

    Args:
        dataset, devices, seed, epochs, batch_size, patience, validation_split, verbose,
            progress: as for `evolve`.
        choices: restrict the grid, e.g. `{"nb_neurons": [64, 128], "nb_layers": [1]}`.

    Returns:
        A dict with "ranking" (every network, best first, as in `evolve`), "seed",
        "devices", "seconds" and "settings".

    Example:

    ```python
    result = zoo.brute("digits", choices={"nb_neurons": [64, 128], "nb_layers": [1, 2]})
    ```
    """
    seed = _check_seed(seed)
    space = search_space(choices)
    grid = [dict(zip(PARAMETERS, values)) for values in itertools.product(*space.values())]
    report = _printer(verbose, progress)
    start = time.perf_counter()
    pool = CandidatePool(dataset, devices, epochs=epochs, batch_size=batch_size,
                         patience=patience, validation_split=validation_split)
    with pool:
        results = pool.train([(n, candidate_seed(seed, n)) for n in grid], progress=report)
    return {
        "ranking": _rank(results),
        "seed": seed,
        "devices": list(pool.devices),
        "seconds": time.perf_counter() - start,
        "settings": {
            "dataset": dataset if isinstance(dataset, str) else "arrays", "epochs": epochs,
            "batch_size": batch_size, "patience": patience,
            "validation_split": validation_split,
            "choices": {name: list(values) for name, values in space.items()},
        },
    }


def bench_generation(dataset="digits", population=8, devices=2, seed=0, repeats=3, epochs=100,
                     batch_size=128, patience=5, verbose=0):
    """Time one generation trained concurrently on `devices` against one device.

    Both pools are started (and their start-up timed) before any timing; then the same
    generation, a seeded random population, trains `repeats` times in each mode,
    alternating which mode goes first so that a change in the machine's load hits both.

    Args:
        dataset, epochs, batch_size, patience: as for `evolve`.
        population: networks in the generation.
        devices: the concurrent mode's devices (int >= 2, or a list).
        seed: fixes the generation and its training.
        repeats: timed runs per mode.
        verbose: 1 prints each run's time.

    Returns:
        A dict: "sequential_seconds" and "concurrent_seconds" (lists), their medians,
        "speedup" (median sequential / median concurrent), "speedups" (per repeat),
        "startup_seconds",
        "same_results" (every run gave the same accuracies), "load_average" before and
        after (1, 5, 15 minutes), "devices", "threads_per_worker" and "cores".

    Example:

    ```python
    figures = bench_generation("digits", population=8, devices=2)
    figures["speedup"]
    ```
    """
    _check_count("population", population, 1)
    _check_count("repeats", repeats, 1)
    seed = _check_seed(seed)
    rng = random.Random(seed)
    networks = [random_network(rng) for _ in range(population)]
    candidates = [(network, candidate_seed(seed, network)) for network in networks]
    concurrent_devices = resolve_devices(devices)
    if len(concurrent_devices) < 2:
        raise ValueError(f"bench_generation needs devices >= 2. Received: devices={devices!r}")
    load_before = os.getloadavg()
    pools = {
        "sequential": CandidatePool(dataset, concurrent_devices[:1], epochs=epochs,
                                    batch_size=batch_size, patience=patience),
        "concurrent": CandidatePool(dataset, concurrent_devices, epochs=epochs,
                                    batch_size=batch_size, patience=patience),
    }
    seconds = {"sequential": [], "concurrent": []}
    startup, accuracies = {}, set()
    try:
        for mode, pool in pools.items():
            start = time.perf_counter()
            pool.start()
            startup[mode] = time.perf_counter() - start
        for repeat in range(repeats):
            order = ("sequential", "concurrent") if repeat % 2 == 0 else ("concurrent",
                                                                           "sequential")
            for mode in order:
                start = time.perf_counter()
                results = pools[mode].train(candidates)
                seconds[mode].append(time.perf_counter() - start)
                accuracies.add(tuple(result["accuracy"] for result in results))
                if verbose:
                    print(f"repeat {repeat + 1}/{repeats} {mode:<10} {seconds[mode][-1]:.1f} s "
                          f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    sequential, concurrent = (statistics.median(seconds[m]) for m in ("sequential", "concurrent"))
    return {
        "sequential_seconds": seconds["sequential"],
        "concurrent_seconds": seconds["concurrent"],
        "sequential_median": sequential,
        "concurrent_median": concurrent,
        "speedup": sequential / concurrent,
        # Each repeat's two runs are adjacent in time: their ratio shrugs off slow drifts
        # in the machine's load better than the ratio of medians.
        "speedups": [s / c for s, c in zip(seconds["sequential"], seconds["concurrent"])],
        "startup_seconds": startup,
        "same_results": len(accuracies) == 1,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "devices": concurrent_devices,
        "threads_per_worker": {mode: pool.threads_per_worker for mode, pool in pools.items()},
        "cores": _available_cores(),
        "population": population,
        "epochs": epochs,
    }


def plot_history(history, ax=None):
    """Plot the best and mean fitness per generation (matplotlib).

    Args:
        history: `evolve(...)["history"]`.
        ax: a matplotlib Axes to draw on (default: a new figure's).

    Returns:
        The Axes.

    Example:

    ```python
    from zoo.evolve import plot_history
    plot_history(result["history"])
    ```
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    generations = [entry["generation"] for entry in history]
    for entry in history:
        ax.scatter([entry["generation"]] * len(entry["accuracies"]), entry["accuracies"],
                   color="0.7", s=12)
    ax.plot(generations, [entry["best"] for entry in history], marker="o", label="best")
    ax.plot(generations, [entry["mean"] for entry in history], marker="o", label="mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("validation accuracy")
    ax.set_xticks(generations)
    ax.legend()
    return ax


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _list_of(kind):
    def parse(text):
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def _ensure_devices(count):
    """On a machine without GPUs, simulate `count` devices unless the environment did."""
    if count is None or count < 2 or os.environ.get(_ENV_SIMULATED_DEVICES):
        return
    with contextlib.suppress(RuntimeError):  # TensorFlow already fixed its devices
        kerasmgpu.simulate_devices(count)


def main(argv=None):
    """Command-line entry point: `python -m zoo.evolve --help`."""
    parser = argparse.ArgumentParser(
        prog="python -m zoo.evolve",
        description="Genetic (or brute-force grid) search of MLP hyperparameters, "
        "candidates trained concurrently, one per device.",
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--mode", choices=("genetic", "brute"), default="genetic")
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--devices", type=int, default=None,
                        help="devices (worker processes); default all visible. On a machine "
                        "without GPUs, that many devices are simulated.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=100,
                        help="most epochs per candidate (early stopping, patience 5)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--nb-neurons", type=_list_of(int), default=None)
    parser.add_argument("--nb-layers", type=_list_of(int), default=None)
    parser.add_argument("--activation", type=_list_of(str), default=None)
    parser.add_argument("--optimizer", type=_list_of(str), default=None)
    parser.add_argument("--top", type=int, default=None, help="rows of the ranking shown")
    parser.add_argument("--json", default=None, help="write the result to this JSON file")
    parser.add_argument("--bench-generation", action="store_true",
                        help="time one generation of --population networks, concurrent on "
                        "--devices (default 2) against sequential")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (bench)")
    args = parser.parse_args(argv)

    choices = {name: getattr(args, name) for name in PARAMETERS if getattr(args, name)}
    if args.bench_generation and args.devices is None:
        args.devices = 2
    _ensure_devices(args.devices)
    try:
        if args.bench_generation:
            result = bench_generation(
                args.dataset, population=args.population, devices=args.devices,
                seed=0 if args.seed is None else args.seed, repeats=args.repeats,
                epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
                verbose=1,
            )
        elif args.mode == "brute":
            result = brute(
                args.dataset, choices=choices or None, devices=args.devices, seed=args.seed,
                epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
                verbose=1,
            )
        else:
            result = evolve(
                args.dataset, population=args.population, generations=args.generations,
                devices=args.devices, seed=args.seed, epochs=args.epochs,
                batch_size=args.batch_size, patience=args.patience, choices=choices or None,
                verbose=1,
            )
    except ValueError as error:
        parser.error(str(error))
    if args.bench_generation:
        print(
            f"one generation of {result['population']} networks, median of {args.repeats}: "
            f"sequential {result['sequential_median']:.1f} s, concurrent on "
            f"{len(result['devices'])} devices {result['concurrent_median']:.1f} s, "
            f"speedup {result['speedup']:.2f}x"
        )
        print(
            f"runs: sequential {[round(s, 1) for s in result['sequential_seconds']]}, "
            f"concurrent {[round(s, 1) for s in result['concurrent_seconds']]}, speedup per "
            f"repeat {[round(s, 2) for s in result['speedups']]}; start-up "
            f"{', '.join(f'{m} {s:.1f} s' for m, s in result['startup_seconds'].items())}; "
            f"same accuracies in every run: {result['same_results']}"
        )
        print(
            f"load average before {result['load_average']['before']}, after "
            f"{result['load_average']['after']}; {result['cores']} cores"
        )
    else:
        print(f"\nranking (seed {result['seed']}, devices {', '.join(result['devices'])}):")
        print(format_ranking(result["ranking"], top=args.top))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
