"""Running the benchmark: one worker process per contender, taking turns; the ceiling.

Each contender (a method on a device count) runs in its own process
(`kerasmgpu.tools.bench.worker`), started with the devices and threads it is measured on.
With `cores_per_device=k`, plain Keras and kerasmgpu on 1 device get one device of k
cores (k threads per op, one op at a time), N devices get N x k. Separate processes make
that exact: TensorFlow fixes its thread pools once per process, and a 1-device baseline
sharing a process with N-device contenders would get N inter-op threads, i.e. more than
one device's cores. Only one contender computes at a time; the others wait on their
standard input, idle.

The ceiling is measured in the same run: N independent plain-Keras processes on 1 device
of k cores each, started at once; their combined throughput over one such process is the
speed-up this machine allows N devices at that moment (cores shared with other users,
memory bandwidth, turbo limits).
"""

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from kerasmgpu.options import UsageError

# Every answer of a worker is one stdout line starting with this (libraries may print too).
ANSWER_PREFIX = "@kerasmgpu-bench "
DISTINCT_BATCHES = 2
# "-xla": the same method with every step (kerasmgpu: every replica's program) compiled by
# XLA, beside the one without, in the same run.
TF_METHODS = ("keras", "keras-xla", "kerasmgpu", "kerasmgpu-xla", "mirrored")
METHODS = (*TF_METHODS, "keras-jax")
PHASES = ("train", "predict")
JAX_MISSING = "jax is not installed (pip install 'kerasmgpu[bench]' or pip install jax)"


def jax_available():
    """Whether the keras-jax method can run (jax importable)."""
    import importlib.util

    return importlib.util.find_spec("jax") is not None


@dataclasses.dataclass
class Worker:
    """A running contender process."""

    method: str
    devices: int
    process: subprocess.Popen
    log: object = None
    ready: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self):
        return f"{self.method} x{self.devices}"

    def send(self, command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self):
        for line in self.process.stdout:
            if line.startswith(ANSWER_PREFIX):
                return json.loads(line[len(ANSWER_PREFIX):])
        self.process.wait()
        error = ""
        if self.log is not None:
            self.log.seek(0)
            error = self.log.read()[-3000:]
        raise RuntimeError(f"The benchmark worker for {self.label} stopped:\n{error}")

    def ask(self, command):
        self.send(command)
        return self.receive()

    def close(self):
        if self.process.poll() is None:
            try:
                self.send({"exit": True})
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()


def worker_environment(method, devices, cores_per_device):
    """The environment of a worker: the parent's, with the devices and threads of `method`."""
    env = dict(os.environ)
    # The worker sets up its own devices; a cluster configuration is not for it.
    for name in ("KERASMGPU_SIMULATED_DEVICES", "KERASMGPU_CORES_PER_DEVICE", "TF_CONFIG"):
        env.pop(name, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if method == "keras-jax":
        env["KERAS_BACKEND"] = "jax"
        flags = [f"--xla_force_host_platform_device_count={devices}"]
        if cores_per_device == 1:
            # One thread per device computation: XLA's CPU ops otherwise use a pool of all cores.
            flags.append("--xla_cpu_multi_thread_eigen=false")
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
    else:
        env["KERAS_BACKEND"] = "tensorflow"
    return env


def start_worker(method, devices, spec):
    """Start a worker process for `method` on `devices` (returns without waiting)."""
    spec = dict(spec, method=method, devices=devices)
    # Its log goes to a file, read if it fails: a pipe nobody reads could fill and block it.
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "kerasmgpu.tools.bench.worker", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        env=worker_environment(method, devices, spec["cores_per_device"]),
    )
    return Worker(method, devices, process, log)


def plan_contenders(device_counts, methods):
    """(method, devices) pairs in the order they are timed."""
    plan = []
    for one_device in ("keras", "keras-xla"):
        if one_device in methods:
            plan.append((one_device, 1))
    for wrapper in ("kerasmgpu", "kerasmgpu-xla"):
        if wrapper in methods:
            plan += [(wrapper, n) for n in device_counts]
    if "mirrored" in methods:
        plan += [("mirrored", n) for n in device_counts if n >= 2]
    if "keras-jax" in methods:
        plan += [("keras-jax", n) for n in device_counts]
    return plan


def ceiling_speedup(combined_samples_per_sec, one_process_samples_per_sec):
    """The ceiling: N concurrent 1-device processes' throughput over one process's.

    Example:

    >>> ceiling_speedup([500.0, 560.0, 540.0], 300.0)
    1.8
    """
    return statistics.median(combined_samples_per_sec) / one_process_samples_per_sec


def machine_info(visible=None, simulated=True, cores_per_device=None):
    """What the figures were measured on (processor, cores, versions, load average)."""
    import keras
    import tensorflow as tf

    import kerasmgpu

    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    processor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append(details.get("device_name", device.name))
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "simulated_devices": simulated,
        "cores_per_device": cores_per_device,
        "visible_devices": list(visible or []),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "kerasmgpu": kerasmgpu.__version__,
        "load_average_start": list(os.getloadavg()),
    }


class Session:
    """The worker processes of one benchmark run (closed on exit)."""

    def __init__(self, spec, progress=None):
        self.spec = spec
        self.progress = progress
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for worker in self.workers:
            worker.close()

    def start(self, plan):
        started = [start_worker(method, n, self.spec) for method, n in plan]
        self.workers += started
        for worker in started:
            worker.ready = worker.receive()
        return started

    def tick(self):
        if self.progress:
            self.progress.add(1)


def time_contenders(session, workers, phase, steps, warmup_steps, repeats, after_round=None):
    """Warm every worker up, then let them take turns `repeats` times.

    Returns:
        {label: {"step_times": [...], "first_step_seconds": s, "loss": last loss}}
    """
    records = {}
    if not workers:
        return records
    for worker in workers:
        warm = worker.ask({"run": phase, "steps": warmup_steps})
        records[worker.label] = {
            "step_times": [], "first_step_seconds": warm["first_step_seconds"], "loss": None,
        }
        session.tick()
    for repeat in range(repeats):
        shift = repeat % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            result = worker.ask({"run": phase, "steps": steps})
            records[worker.label]["step_times"].append(result["seconds"] / steps)
            records[worker.label]["loss"] = result["loss"]
            session.tick()
        if after_round:
            after_round()
    return records


def measure_together(workers, steps, batch_size):
    """Run `workers` at once (train phase); their combined samples/s."""
    for worker in workers:
        worker.send({"run": "train", "steps": steps})
    return sum(batch_size * steps / worker.receive()["seconds"] for worker in workers)


def measure(model, device_counts, spec, methods, phases, steps, warmup_steps, repeats,
            ceiling, progress=None):
    """Start the workers and time them.

    Returns:
        `(records, peaks, ceiling_rounds, ready, loads, traffic)`: `ready` maps each
        contender's label to what its worker reported on start (devices, threads, whether
        XLA is on); `traffic` is the entries of every kerasmgpu worker on 2 or more devices
        (one step's bytes per layout, measured after the timed runs).
    """
    plan = plan_contenders(device_counts, methods)
    want_ceiling = ceiling and "train" in phases and max(device_counts) >= 2 and (
        "keras", 1) in plan
    with Session(spec, progress) as session:
        workers = session.start(plan)
        peak_workers = {}
        for worker in workers:
            if worker.method in TF_METHODS and (
                worker.devices not in peak_workers or worker.method == "kerasmgpu"
            ):
                peak_workers[worker.devices] = worker
        peaks = {}

        def measure_peaks(repeats_each=1):
            for n, worker in peak_workers.items():
                peaks[n] = worker.ask({"peak": repeats_each})

        loads = []

        def after_round():
            measure_peaks()
            loads.append(os.getloadavg()[0])

        measure_peaks(3)
        extra = []
        if want_ceiling:
            # Processes of their own: the keras contender's weights and loss stay its own.
            extra = session.start([("keras", 1)] * max(device_counts))
            for worker in extra:
                worker.ask({"run": "train", "steps": warmup_steps})
        records, ceiling_rounds = {}, []
        for phase in phases:

            def round_done(phase=phase):
                after_round()
                if phase == "train" and extra:
                    ceiling_rounds.append(measure_together(extra, steps, spec["batch_size"]))

            phase_records = time_contenders(
                session, workers, phase, steps, warmup_steps, repeats, round_done
            )
            for label, record in phase_records.items():
                records[(label, phase)] = record
        ready = {worker.label: worker.ready for worker in workers}
        traffic = []
        for worker in workers:
            if worker.method == "kerasmgpu" and worker.devices >= 2:  # not twice with -xla
                traffic += worker.ask({"traffic": [worker.devices]})["traffic"]
    return records, peaks, ceiling_rounds, ready, loads, traffic


def measure_traffic_only(model, device_counts, batch_size, seed=0):
    """The traffic entries of `model` on each count (>= 2), from one worker process.

    For the predictor when no benchmark report is given: one kerasmgpu worker with
    max(device_counts) simulated devices (sharing the cores: nothing is timed) measures
    every count on its first N devices.
    """
    counts = sorted({n for n in device_counts if n >= 2})
    if not counts:
        return []
    with new_workdir() as directory:
        info, weights = reference_of(model, seed, directory)
        spec = {
            "model": model, "weights": weights, "batch_size": batch_size, "seed": seed,
            "jit_compile": False, "steps_per_execution": 1,
            "compile_config": info["compile_config"], "phases": [], "cores_per_device": None,
        }
        with Session(spec) as session:
            (worker,) = session.start([("kerasmgpu", max(counts))])
            return worker.ask({"traffic": counts})["traffic"]


def reference_of(model, seed, directory):
    """Build the model once here: its weights file (shared by every worker), FLOPs, config."""
    import keras
    import numpy as np

    from kerasmgpu.tools import flops as flops_lib
    from kerasmgpu.tools import models, scaling

    name, builder = models.load_model_builder(model)
    keras.utils.set_random_seed(seed)
    reference = models.build_model(builder, name)
    weights = os.path.join(directory, "initial.weights.h5")
    reference.save_weights(weights)
    compile_config = models.compile_config_of(reference)
    flops_method = flops_lib.FLOPS_METHOD
    own_step = models.has_own_train_step(reference)
    if own_step:
        forward, by_op = _sub_model_flops(reference, flops_lib)
        flops_method = (
            "a model with its own train_step: the sum of its sub-models' forward FLOPs per "
            "sample (" + ", ".join(by_op.pop("_models")) + "), each counted as below; a "
            "step that calls a model several times does more (a lower bound). " + flops_method
        )
    else:
        forward, by_op = flops_lib.forward_flops_per_sample(reference)
    info = {
        "name": name,
        "own_train_step": own_step,
        "parameters": int(sum(int(np.prod(v.shape)) for v in reference.weights)),
        "trainable_parameters": int(
            sum(int(np.prod(v.shape)) for v in reference.trainable_weights)
        ),
        "gradient_bytes": int(scaling.gradient_bytes_of(reference)),
        "forward_flops_per_sample": forward,
        "train_flops_per_sample": forward * flops_lib.TRAINING_FLOPS_FACTOR,
        "flops_by_op": by_op,
        "flops_method": flops_method,
        "compile_config": compile_config,
    }
    return info, weights


def _sub_model_flops(model, flops_lib):
    """Forward FLOPs per sample summed over a model's outermost sub-models with inputs."""
    from kerasmgpu import _compat

    total, by_op, names = 0.0, {}, []
    for layer in _compat.flatten_layers(model)[1:]:
        if not hasattr(layer, "inputs") or not getattr(layer, "inputs", None):
            continue
        if any(layer in _compat.flatten_layers(other)[1:] for other in
               _compat.flatten_layers(model)[1:] if other is not layer):
            continue  # nested in another sub-model: counted with it
        forward, ops = flops_lib.forward_flops_per_sample(layer)
        total += forward
        names.append(layer.name)
        for op, flops in ops.items():
            by_op[op] = by_op.get(op, 0.0) + flops
    by_op["_models"] = names
    return total, by_op


def check_methods(methods):
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(
            f"Unknown method(s) {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(METHODS)}. Received: methods={list(methods)}"
        )


def new_workdir():
    return tempfile.TemporaryDirectory(prefix="kerasmgpu_bench_")
