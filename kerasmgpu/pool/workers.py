"""A pool of worker processes, one per device, that run many small tasks concurrently.

Many small models (cross-validation folds, search candidates, ensemble members) keep
several devices busy only if each device trains its own model: data parallelism would
split a batch of 8 over the devices and go slower. `DevicePool` is that: the standard
library's `concurrent.futures.ProcessPoolExecutor`, started with the "spawn" method and
one worker per device (or group of devices). Each worker's initializer pins the process
to its device (`kerasmgpu.pool.pinning`), limits TensorFlow to the worker's share of the
cores and loads the user's data once; every task then finds the data in the worker.

Processes, not threads: the Python training loop holds the interpreter lock, so threads
in one process barely overlap (measured on a 2-core machine, four small MLPs on digits:
1.04x faster than one after the other with two threads, 1.74x with two processes).

The data crosses to the workers once: arrays are written to `.npy` files in a temporary
directory when the pool starts, and each worker reads them when it starts (and again
only when it is replaced). Tasks carry only their own small arguments.

A worker that dies (killed, out of memory) breaks a `ProcessPoolExecutor`: its unfinished
tasks fail and its other workers are stopped. The pool then starts fresh workers and
submits the unfinished tasks again; a task whose own worker died under it is run again at
most `retries` times, then fails.

One module on purpose (about 640 lines): the pool's parent side (scheduling, retries,
restarts) and its workers' side (loading the data once, running tasks) speak one small
protocol that reads best in one place; pinning a process to a device is in `pinning`.
"""

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
import warnings

import keras
import numpy as np
import tensorflow as tf

from kerasmgpu import devices as devices_lib
from kerasmgpu.pool import pinning

STARTUP_TIMEOUT_SECONDS = 600
_CLOSE_TIMEOUT_SECONDS = 10


class TaskError(RuntimeError):
    """A task raised an exception in its worker (the worker's traceback is in the message)."""


class TaskFailure:
    """What `DevicePool.map(..., on_error="return")` returns for a task that failed.

    Attributes:
        error: what went wrong, one line ("ValueError: ..." or "its worker process
            exited with code -9").
        device: the device of the worker that ran it (None when unknown).
        details: the worker's traceback, or None.
    """

    def __init__(self, error, device=None, details=None):
        self.error = error
        self.device = device
        self.details = details

    def __repr__(self):
        return f"TaskFailure({self.error!r}, device={self.device!r})"


class WorkerInfo:
    """The worker a task runs in: see `current_worker()`.

    Attributes:
        device: the device name (a comma-separated list for a group of devices), as the
            pool's process names it.
        settings: the `settings` the pool was created with (as when the worker started).
        loads: how many times this worker loaded the data (1: the data stayed resident).
        pid: the worker's process id.
    """

    def __init__(self, device, settings, loads, pid):
        self.device, self.settings, self.loads, self.pid = device, settings, loads, pid

    def __repr__(self):
        return f"WorkerInfo(device={self.device!r}, pid={self.pid}, loads={self.loads})"


# ---- The data, written once by the pool and read once by each worker ----------------------


class _ArrayFile:
    """A placeholder for an array of the user's data, saved as `<directory>/<index>.npy`."""

    def __init__(self, index):
        self.index = index


def _save_data(data, directory):
    """Write the arrays of `data` (any nest of dicts, lists, tuples) as .npy files.

    Returns:
        The nest with each array replaced by an `_ArrayFile`, pickled to `structure.pkl`.
    """
    counter = iter(range(2**62))

    def save(leaf):
        if isinstance(leaf, np.ndarray) or hasattr(leaf, "__array__"):
            index = next(counter)
            np.save(os.path.join(directory, f"{index}.npy"), np.asarray(leaf),
                    allow_pickle=False)
            return _ArrayFile(index)
        return leaf

    structure = keras.tree.map_structure(save, data)
    with open(os.path.join(directory, "structure.pkl"), "wb") as file:
        pickle.dump(structure, file)


def _load_data(directory):
    with open(os.path.join(directory, "structure.pkl"), "rb") as file:
        structure = pickle.load(file)

    def load(leaf):
        if isinstance(leaf, _ArrayFile):
            return np.load(os.path.join(directory, f"{leaf.index}.npy"), allow_pickle=False)
        return leaf

    return keras.tree.map_structure(load, structure)


# ---- In each worker process --------------------------------------------------------------

_worker = {}  # this worker's device, data, settings, queue of events; set by the initializer


def current_worker():
    """The pool worker this code runs in, or None outside a pool's worker.

    Returns:
        A `WorkerInfo` (device, settings, loads, pid), or None.

    Example:

    ```python
    def task(data, index):
        return kerasmgpu.pool.current_worker().device
    ```
    """
    if "device" not in _worker:
        return None
    return WorkerInfo(_worker["device"], _worker["settings"], _worker.get("loads", 0),
                      os.getpid())


def _start_worker(indices, groups, environments, source, settings, events, everyone_ready):
    """The pool's initializer: pin this process to its devices, then load the data once."""
    # Ctrl-C reaches every process of the terminal; the parent alone stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    index = indices.get()
    _worker.update(device=",".join(groups[index]), settings=settings, events=events,
                   everyone_ready=everyone_ready)
    try:
        # TensorFlow is imported but has not started in this process yet: these take effect.
        pinning.set_environment(environments[index])
        threads = int(environments[index]["TF_NUM_INTRAOP_THREADS"])
        with contextlib.suppress(RuntimeError):  # the variables above already say it
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        simulated = environments[index].get(devices_lib.ENV_SIMULATED_DEVICES)
        if simulated:
            devices_lib.simulate_devices(int(simulated))
        _worker["data"] = _load(source)
        _worker["loads"] = _worker.get("loads", 0) + 1
    except Exception as error:  # reported by the probe, which the parent raises
        _worker["startup_error"] = f"{type(error).__name__}: {error}"


def _load(source):
    kind, value = source
    if kind == "files":
        return _load_data(value)
    if kind == "loader":
        return value()
    return None


def _report_ready():
    """The start-up probe: wait until every worker has loaded the data.

    Returns:
        This worker's process id, device, and start-up error (None when it started).
    """
    if "startup_error" in _worker:
        return os.getpid(), _worker["device"], _worker["startup_error"]
    # One probe per worker: a worker waiting here cannot take a second probe.
    _worker["everyone_ready"].wait()
    return os.getpid(), _worker["device"], None


def _run_task(task_number, function, args):
    """A pool task: `function(data, *args)` in this worker.

    Returns ("ok", value) or ("error", device, one-line error, traceback): an exception
    object may not survive pickling, its text does.
    """
    _worker["events"].put((task_number, os.getpid()))
    try:
        return "ok", function(_worker["data"], *args)
    except Exception as error:
        return ("error", _worker["device"], f"{type(error).__name__}: {error}",
                traceback.format_exc())


# ---- In the process that owns the pool ---------------------------------------------------


@contextlib.contextmanager
def _environment(changes):
    """Environment variables changed as `set_environment` says, while child processes start."""
    saved = pinning.set_environment(changes)
    try:
        yield
    finally:
        pinning.set_environment(saved)


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name} must be a whole number >= {minimum}. Received: {name}={value!r}"
        )


class _ByValue:
    """A function sent by value (cloudpickle): one a worker could not import by name."""

    def __init__(self, function):
        import cloudpickle

        self.payload = cloudpickle.dumps(function)
        self.__name__ = getattr(function, "__name__", type(function).__name__)

    def __call__(self, *args, **kwargs):
        function = _by_value_cache.get(self.payload)
        if function is None:
            import cloudpickle

            function = _by_value_cache[self.payload] = cloudpickle.loads(self.payload)
        return function(*args, **kwargs)

    def __repr__(self):
        return f"<{self.__name__}, sent by value>"


_by_value_cache = {}


def sendable(name, value):
    """`value` in a form a worker process can receive; a clear ValueError when impossible.

    Worker processes are started with "spawn": a function normally reaches them by its
    importable name. Functions a worker cannot import (lambdas, functions defined inside
    another function, functions of a notebook's `__main__`) are sent by value with
    cloudpickle when it is installed (`pip install kerasmgpu[pool]`).

    Args:
        name: the argument's name, for the message.
        value: what must reach the workers.

    Returns:
        `value`, or a wrapper that carries it by value.
    """
    try:
        payload = pickle.dumps(value)
        error = None
    except Exception as exc:
        payload, error = None, f"{type(exc).__name__}: {exc}"
    if payload is not None and (b"__main__" not in payload or _main_is_importable()):
        return value
    try:
        return _ByValue(value)
    except ImportError:
        pass
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    where = (f"it cannot be pickled ({error})" if error else
             "it is defined in this interactive session's __main__ (a notebook or the "
             "Python prompt), which worker processes cannot import")
    raise ValueError(
        f"{name} must reach the worker processes, but {where}. Define it at the top level "
        "of an importable module (e.g. models.py next to the notebook) and import it, or "
        f"install cloudpickle to send it by value. Received: {name}={value!r}"
    )


def _main_is_importable():
    """Whether spawned processes can import __main__ again (a script, not a notebook)."""
    import __main__

    path = getattr(__main__, "__file__", None)
    return bool(path) and os.path.exists(path) and path.endswith(".py")


class DevicePool:
    """Worker processes, one per device, that run many small tasks concurrently.

    Use it as a context manager (or call `start` and `close`). Starting a worker costs a
    few seconds (it imports TensorFlow and loads the data), so one pool serves many
    tasks: `map` runs a function over a list of arguments, each call as soon as a worker
    is free, and returns the results in order. Each worker sees only its own GPU(s); on a
    machine without GPUs each stands for one (simulated) device and limits TensorFlow to
    its share of the cores. The data is loaded once per worker and stays there.

    When a worker dies (killed, out of memory), the workers are started afresh and the
    unfinished tasks run again; the task whose worker died under it fails after `retries`
    retries. A task that raises fails at once (it would raise again).

    Args:
        devices: None (all of `kerasmgpu.visible_devices()`), an int, or a list of device
            ids or names.
        data: what every task receives first: a nest (dict, list, tuple) of numpy arrays
            and plain values, written once to files each worker reads when it starts; or
            a picklable function of no arguments that each worker calls once to load its
            data (e.g. `functools.partial(load_dataset, "digits")`); or None.
        settings: a picklable value each worker gets when it starts, read by tasks as
            `current_worker().settings`.
        devices_per_worker: devices each worker owns (a GPU worker sees all of its GPUs,
            a CPU worker simulates that many devices), e.g. for `multi_gpu_model` inside
            each task.
        retries: how many times a task whose worker died under it runs again.
        progress: show a progress bar over the tasks of each `map` (keras.utils.Progbar).

    Example:

    ```python
    def score(data, width):
        model = build(width)
        model.fit(data["x"], data["y"], epochs=5, verbose=0)
        return model.evaluate(data["x"], data["y"], verbose=0)

    if __name__ == "__main__":
        with kerasmgpu.DevicePool(devices=2, data={"x": x, "y": y}) as pool:
            scores = pool.map(score, [(16,), (32,), (64,), (128,)])
    ```
    """

    def __init__(self, devices=None, data=None, settings=None, devices_per_worker=1,
                 retries=2, progress=False):
        _check_count("devices_per_worker", devices_per_worker, 1)
        _check_count("retries", retries, 0)
        resolved = devices_lib.resolve_devices(devices, minimum=1, argument="devices")
        if len(resolved) % devices_per_worker:
            raise ValueError(
                f"devices_per_worker={devices_per_worker} must divide the number of devices "
                f"({len(resolved)}: {', '.join(resolved)}). Received: devices={devices!r}"
            )
        if callable(data):
            data = sendable("data", data)
        try:
            pickle.dumps(settings)
        except Exception as error:
            raise ValueError(
                "settings must be picklable (plain data) to reach the worker processes. "
                f"Received: settings={settings!r} ({type(error).__name__}: {error})"
            ) from None
        self.devices = resolved
        self.groups = [resolved[start:start + devices_per_worker]
                       for start in range(0, len(resolved), devices_per_worker)]
        self.threads_per_worker = max(1, pinning.available_cores() // len(self.groups))
        self.data = data
        self.settings = settings
        self.retries = retries
        self.progress = progress
        self._context = multiprocessing.get_context("spawn")
        self._directory = None
        self._executor = None
        self._events = None
        self._processes = {}  # pid -> multiprocessing.Process, this pool's workers
        self._device_of = {}  # pid -> device
        self._in_flight = []
        self._task_numbers = iter(range(2**62))

    @property
    def worker_pids(self):
        """The process ids of the running workers, in device order (empty when stopped)."""
        pid_of = {device: pid for pid, device in self._device_of.items()}
        names = [",".join(group) for group in self.groups]
        return [pid_of[name] for name in names if name in pid_of]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def _source(self):
        """How workers get the data: files written once, a loader, or nothing."""
        if self.data is None:
            return ("none", None)
        if callable(self.data):
            return ("loader", self.data)
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="kerasmgpu-pool-")
            _save_data(self.data, self._directory)
        return ("files", self._directory)

    def start(self):
        """Start the workers and wait until each has loaded the data. Returns the pool."""
        if self._executor is not None:
            return self
        count = len(self.groups)
        indices = self._context.Queue()
        for index in range(count):
            indices.put(index)
        self._events = self._context.Queue()
        common = pinning.worker_environment(self.threads_per_worker)
        environments = [{**common, **pinning.device_environment(group)}
                        for group in self.groups]
        before = {process.pid for process in multiprocessing.active_children()}
        try:
            source = self._source()
            # The children start with these variables: a script that imports kerasmgpu
            # (imported again by each child) must not simulate devices in a worker.
            with _environment(common):
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    count, mp_context=self._context, initializer=_start_worker,
                    initargs=(indices, self.groups, environments, source, self.settings,
                              self._events, self._context.Barrier(count)),
                )
                # Workers start as tasks arrive: one probe each starts them all, now.
                probes = [self._executor.submit(_report_ready) for _ in range(count)]
            self._in_flight = probes
            self._processes = {process.pid: process for process in
                               multiprocessing.active_children() if process.pid not in before}
            self._wait_until_ready(probes)
            self._in_flight = []
        except BaseException:
            self.close()
            raise
        return self

    def _wait_until_ready(self, probes):
        done, _ = concurrent.futures.wait(probes, timeout=STARTUP_TIMEOUT_SECONDS)
        if len(done) < len(probes):
            raise RuntimeError(
                f"kerasmgpu pool workers did not start within {STARTUP_TIMEOUT_SECONDS} s"
            )
        for probe in probes:
            try:
                pid, device, error = probe.result()
            except concurrent.futures.process.BrokenProcessPool:
                codes = {self._exit_code(pid) for pid in self._processes} - {None}
                # The executor stops the other workers with SIGTERM.
                codes = sorted(codes - {-signal.SIGTERM} or codes)
                exited = f" with code {', '.join(map(str, codes))}" if codes else ""
                raise RuntimeError(
                    f"A kerasmgpu pool worker exited{exited} while starting (see its error "
                    "above). A script that starts a pool must "
                    "do so under `if __name__ == \"__main__\":`, because each worker process "
                    "imports the script first."
                ) from None
            if error is not None:
                raise RuntimeError(f"The pool worker for {device} could not start: {error}")
            self._device_of[pid] = device

    def _exit_code(self, pid, timeout=_CLOSE_TIMEOUT_SECONDS):
        process = self._processes.get(pid)
        if process is None:
            return None
        process.join(timeout)
        return process.exitcode

    def _stop_workers(self):
        """Stop the workers; tasks still running are abandoned. The data files stay."""
        if self._executor is None:
            return
        busy = any(not future.done() for future in self._in_flight)
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + (0 if busy else _CLOSE_TIMEOUT_SECONDS)
        for process in self._processes.values():
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self._executor.shutdown(wait=True)
        self._events.close()
        self._executor = self._events = None
        self._processes, self._device_of, self._in_flight = {}, {}, []

    def close(self):
        """Stop the workers and remove the data files (idempotent)."""
        self._stop_workers()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def map(self, function, arguments, on_error="raise", callback=None):
        """Run `function(data, *args)` for each `args` of `arguments` on the workers.

        Each call runs in whichever worker is free first; results come back in the order
        of `arguments`.

        Args:
            function: a picklable function (top level of an importable module) taking the
                worker's data first, then the task's arguments.
            arguments: a list of tuples, one task each.
            on_error: "raise": a task that raises (or whose worker died more than
                `retries` times) raises `TaskError` naming it and its device, with the
                worker's traceback; "return": its result is a `TaskFailure` instead.
            callback: optional function called as `callback(index, result)` as each
                task's result arrives (in the order they finish).

        Returns:
            A list of the tasks' return values, in the order of `arguments`.

        Example:

        ```python
        squares = pool.map(power, [(2, 2), (3, 2)])   # power(data, base, exponent)
        ```
        """
        if on_error not in ("raise", "return"):
            raise ValueError(f'on_error must be "raise" or "return". Received: {on_error!r}')
        function = sendable("function", function)
        arguments = [tuple(args) for args in arguments]
        results = [None] * len(arguments)
        finished = [False] * len(arguments)
        deaths = collections.Counter()  # task -> times its worker died under it
        bar = keras.utils.Progbar(len(arguments), unit_name="task") if self.progress else None
        unfinished = list(range(len(arguments)))
        idle_deaths = 0

        def finish(index, value):
            if isinstance(value, TaskFailure) and on_error == "raise":
                self._stop_workers()
                raise TaskError(
                    f"Task {index} {_describe(function, arguments[index])} failed on "
                    f"{value.device}: {value.error}\n{value.details or ''}".rstrip()
                )
            results[index], finished[index] = value, True
            if bar is not None:
                bar.add(1)
            if callback is not None:
                callback(index, value)

        while unfinished:
            self.start()
            try:
                tasks = self._submit(function, arguments, unfinished)
            except concurrent.futures.process.BrokenProcessPool:
                # A worker died while the pool waited for work: start it afresh.
                self._stop_workers()
                idle_deaths += 1
                if idle_deaths > self.retries:
                    raise RuntimeError(
                        f"kerasmgpu pool workers died {idle_deaths} times while idle."
                    ) from None
                continue
            broken = False
            for future in concurrent.futures.as_completed(tasks):
                try:
                    outcome = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    broken = True
                    continue
                index = tasks[future][1]
                if outcome[0] == "ok":
                    finish(index, outcome[1])
                else:
                    _, device, error, details = outcome
                    finish(index, TaskFailure(error, device, details))
            self._in_flight = []
            if broken:
                for index, failure in self._recover(function, arguments, tasks, finished,
                                                    deaths):
                    finish(index, failure)
            unfinished = [index for index in unfinished if not finished[index]]
        return results

    def _submit(self, function, arguments, indices):
        """Submit tasks; {future: (task number, index)}."""
        tasks = {}
        for index in indices:
            number = next(self._task_numbers)
            future = self._executor.submit(_run_task, number, function, arguments[index])
            tasks[future] = (number, index)
        self._in_flight = list(tasks)
        return tasks

    def _recover(self, function, arguments, tasks, finished, deaths):
        """After a worker died: blame the task it ran, stop the rest of the pool.

        Returns:
            (index, TaskFailure) for the tasks out of retries.
        """
        worker_of = self._started_tasks()
        code_of = {pid: self._exit_code(pid) for pid in self._processes}
        device_of = dict(self._device_of)
        self._stop_workers()
        lost = [(number, index) for number, index in tasks.values() if not finished[index]]
        in_flight = [(number, index) for number, index in lost if number in worker_of]
        # The executor stops the other workers with SIGTERM; the worker that died first
        # exited otherwise. Without a clear culprit, every task in flight is blamed.
        culprits = [(number, index) for number, index in in_flight
                    if code_of.get(worker_of[number]) != -signal.SIGTERM] or in_flight or lost
        failures = []
        for number, index in culprits:
            deaths[index] += 1
            pid = worker_of.get(number)
            code, device = code_of.get(pid), device_of.get(pid, "an unknown device")
            if deaths[index] > self.retries:
                failures.append((index, TaskFailure(
                    f"its worker process exited with code {code}", device)))
            else:
                warnings.warn(
                    f"The worker running task {index} {_describe(function, arguments[index])}"
                    f" on {device} exited with code {code}; the workers start again and run "
                    f"it again (retry {deaths[index]} of {self.retries}).",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return failures

    def _started_tasks(self):
        """Which worker (pid) each task started on, from the workers' messages."""
        started = {}
        with contextlib.suppress(queue.Empty):
            while True:
                number, pid = self._events.get(timeout=0.5)
                started[number] = pid
        return started


def _describe(function, args):
    """`name(args)` of a task, shortened for messages."""
    name = getattr(function, "__name__", None) or type(function).__name__
    text = ", ".join(repr(arg) for arg in args)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{name}({text})"
