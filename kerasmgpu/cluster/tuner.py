"""`kerasmgpu launch --tuner`: KerasTuner's distributed mode on this machine, one tuner per device.

KerasTuner searches in parallel when every process runs the same script with
`KERASTUNER_TUNER_ID` ("chief" for the process holding the oracle, "tuner0", "tuner1", ...
for the workers), `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT` set. The launcher
sets them: it starts the script once as the chief (no device, one thread: it only hands
out trials and records their results) and once per device as a tuner worker, each worker
seeing only its device and its share of the cores. An unchanged KerasTuner script then
runs N trials at once.

The search ends without hanging whatever happens to a worker:

- a worker killed by a signal (out of memory, SIGKILL) mid-trial is started again under
  the same tuner id, up to `--max-restarts` times; KerasTuner's oracle hands it the trial
  it was running, and the trials already finished are kept;
- a worker that exits with an error (e.g. its trials all failed: KerasTuner stops after
  `max_consecutive_failed_trials`, and the chief would wait for it forever) stops the
  search: the other processes are stopped and the launcher exits with that worker's
  status, naming it;
- once every worker has finished, the chief gets `--grace-seconds` to exit on its own
  (KerasTuner's chief checks every 20 s whether the search is over), then is stopped;
  the results are already in the tuner's directory, written by the chief.

The oracle listens on 127.0.0.1 only. KerasTuner 1.4 on TensorFlow imports TensorBoard in
every trial; `pip install kerasmgpu[tune]` brings both. A script with
`overwrite=True` must not be restarted: a restarted worker would delete the search
directory; KerasTuner's default (`overwrite=False`) is what restarts need.
"""

import importlib.util
import os
import shutil
import signal
import sys
import time

from kerasmgpu.cluster import machine, supervise
from kerasmgpu.devices import ENV_CORES_PER_DEVICE, ENV_SIMULATED_DEVICES

ENV_TUNER_ID = "KERASTUNER_TUNER_ID"
ENV_ORACLE_IP = "KERASTUNER_ORACLE_IP"
ENV_ORACLE_PORT = "KERASTUNER_ORACLE_PORT"
CHIEF = "chief"
ORACLE_IP = "127.0.0.1"
_POLL_SECONDS = 0.05


def default_workers(env, gpu_ids):
    """One tuner worker per device: the GPUs, or `KERASMGPU_SIMULATED_DEVICES`, or 1."""
    if gpu_ids:
        return len(gpu_ids)
    value = env.get(ENV_SIMULATED_DEVICES)
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(
                f"{ENV_SIMULATED_DEVICES} must be a whole number >= 1. Received: {value!r}"
            ) from None
    return 1


def tuner_environments(workers, port, env, gpu_ids, cores):
    """The environment of the chief and of each tuner worker.

    Args:
        workers: number of tuner workers (one per device).
        port: the oracle's port on 127.0.0.1.
        env: the environment they start from (copied).
        gpu_ids: the GPUs to share out, one per worker (empty on a machine without GPUs).
        cores: CPU cores to share out among the workers' TensorFlow thread pools.

    Returns:
        A dict: "chief" and "tuner0" ... "tuner{workers-1}" to environments, in start order.

    Example:

    ```python
    envs = tuner_environments(2, 8000, dict(os.environ), gpu_ids=[], cores=2)
    envs["tuner1"]["KERASTUNER_TUNER_ID"]   # "tuner1"
    ```
    """
    if gpu_ids and len(gpu_ids) < workers:
        raise ValueError(
            f"{workers} tuner workers need {workers} GPUs, one each; {len(gpu_ids)} are "
            f"visible ({','.join(gpu_ids)}). Received: workers={workers}"
        )
    threads = str(max(1, cores // workers))
    common = dict(env)
    common.update({ENV_ORACLE_IP: ORACLE_IP, ENV_ORACLE_PORT: str(port),
                   "PYTHONUNBUFFERED": "1"})
    # A tuner is one device of one process, not a TF_CONFIG cluster nor simulated devices.
    for name in ("TF_CONFIG", ENV_SIMULATED_DEVICES, ENV_CORES_PER_DEVICE):
        common.pop(name, None)
    environments = {CHIEF: {**common, ENV_TUNER_ID: CHIEF, "TF_NUM_INTRAOP_THREADS": "1",
                            "TF_NUM_INTEROP_THREADS": "1"}}
    if gpu_ids:
        environments[CHIEF]["CUDA_VISIBLE_DEVICES"] = "-1"
    for index in range(workers):
        worker = {**common, ENV_TUNER_ID: f"tuner{index}", "TF_NUM_INTRAOP_THREADS": threads,
                  "TF_NUM_INTEROP_THREADS": threads, "OMP_NUM_THREADS": threads}
        if gpu_ids:
            worker["CUDA_VISIBLE_DEVICES"] = gpu_ids[index]
        environments[f"tuner{index}"] = worker
    return environments


def check_keras_tuner(env):
    """Refuse early when this Python has KerasTuner but not TensorBoard, which trials need.

    Without TensorBoard every trial of KerasTuner 1.4 on TensorFlow fails on import. The
    check applies when the script runs with this Python (it cannot see another's).
    """
    if importlib.util.find_spec("keras_tuner") is None:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "KerasTuner is installed but TensorBoard is not: KerasTuner 1.4 on TensorFlow "
            "imports it in every trial, so every trial would fail. Install both with "
            "pip install 'kerasmgpu[tune]'."
        )


def launch_tuner(command, workers, gpu_ids, cores, port, max_restarts=3, grace_seconds=30.0,
                 env=None, stream=None, error_stream=None):
    """Run `command` as a KerasTuner chief and `workers` tuner workers; the exit status.

    Args:
        command: the script and its arguments, e.g. `["python", "tune.py"]`.
        workers: tuner workers, one per device.
        gpu_ids: GPUs, one per worker (empty on a machine without GPUs).
        cores: CPU cores shared among the workers.
        port: the oracle's port on 127.0.0.1.
        max_restarts: times each worker killed by a signal is started again.
        grace_seconds: after the last worker finished, how long the chief may take to
            exit on its own.
        env: the environment they start from (default `os.environ`).
        stream, error_stream: where their output goes, each line prefixed
            `[worker chief] ` or `[worker tuner<i>] ` (default stdout and stderr).

    Returns:
        0 when every tuner worker finished and the chief exited (or was stopped after the
        grace period); otherwise the status of the process that failed (128 + the signal
        number when a signal killed it, or stopped the launcher).

    Example:

    ```python
    status = launch_tuner(["python", "tune.py"], workers=2, gpu_ids=[], cores=2, port=8000)
    ```
    """
    env = dict(os.environ if env is None else env)
    check_keras_tuner(env)
    environments = tuner_environments(workers, port, env, gpu_ids, cores)
    output = supervise.Output(sys.stdout if stream is None else stream,
                              sys.stderr if error_stream is None else error_stream)
    processes = {}
    previous_handlers = supervise.catch_termination()
    try:
        for name, process_env in environments.items():
            processes[name] = supervise.Worker.start(name, command, process_env, output)
        return _supervise(processes, command, environments, output, max_restarts,
                          grace_seconds)
    except (KeyboardInterrupt, supervise.Terminated) as interruption:
        signum = getattr(interruption, "signum", signal.SIGINT)
        output.note(f"received {signal.Signals(signum).name}: stopping the search")
        return 128 + signum
    finally:
        supervise.ignore_termination()
        try:
            supervise.stop([process for process in processes.values() if process.running()])
            for process in processes.values():
                process.join_readers()
        finally:
            supervise.restore_handlers(previous_handlers)


def _status(code):
    return 128 - code if code < 0 else code


def _supervise(processes, command, environments, output, max_restarts, grace_seconds):
    """Restart killed workers, stop on a failed one, let the chief finish last."""
    restarts = dict.fromkeys(processes, 0)
    finished = set()
    while True:
        chief = processes[CHIEF]
        code = chief.process.poll()
        if code is not None and code != 0:
            output.note(f"failed: the chief {supervise.describe_exit(code)}; stopping the "
                        "tuner workers")
            return _status(code)
        for name, worker in list(processes.items()):
            if name == CHIEF or name in finished:
                continue
            code = worker.process.poll()
            if code is None:
                continue
            if code == 0:
                finished.add(name)
            elif code < 0 and restarts[name] < max_restarts:
                restarts[name] += 1
                worker.join_readers()
                output.note(
                    f"{name} {supervise.describe_exit(code)}; starting it again (restart "
                    f"{restarts[name]} of {max_restarts}): it resumes its trial, the "
                    "finished trials are kept"
                )
                processes[name] = supervise.Worker.start(name, command, environments[name],
                                                         output)
            else:
                why = (f"and was restarted {max_restarts} times already" if code < 0 else
                       "(its trials failed or its script did: see its error above)")
                output.note(f"failed: {name} {supervise.describe_exit(code)} {why}; "
                            "stopping the search")
                return _status(code)
        if len(finished) == len(processes) - 1:
            return _wait_for_chief(processes[CHIEF], output, grace_seconds)
        time.sleep(_POLL_SECONDS)


def _wait_for_chief(chief, output, grace_seconds):
    deadline = time.monotonic() + grace_seconds
    while chief.running() and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    code = chief.process.poll()
    if code is None:
        output.note(f"every tuner worker finished; stopping the chief, still running "
                    f"{grace_seconds:g} s later (the results are in its directory)")
        supervise.stop([chief])
        return 0
    if code != 0:
        output.note(f"failed: the chief {supervise.describe_exit(code)}")
    return _status(code)


def run_command(args):
    """Run `kerasmgpu launch --tuner` from parsed arguments; returns the exit status.

    `--workers` is the number of tuner workers (default: one per device); `--devices-per-
    worker` does not apply (a trial trains on one device); `--grace-seconds` is the
    chief's time to exit after the last worker; `--max-restarts` bounds the restarts of
    each killed worker (default 3).

    Raises:
        UsageError: a flag value or the command is unusable (reported with exit status 2).
    """
    from kerasmgpu.options import UsageError

    if getattr(args, "devices_per_worker", None) not in (None, 1):
        raise UsageError(
            "--tuner runs one trial per device: --devices-per-worker does not apply. "
            f"Received: --devices-per-worker {args.devices_per_worker}"
        )
    if not args.command:
        raise UsageError("no command to launch: give one after '--', e.g. "
                         "kerasmgpu launch --tuner -- python tune.py")
    max_restarts = getattr(args, "max_restarts", None)
    max_restarts = 3 if max_restarts is None else max_restarts
    try:
        command = machine.check_command(args.command)
        env = dict(os.environ)
        gpu_ids = machine.visible_gpu_ids(env)
        workers = args.workers if args.workers is not None else default_workers(env, gpu_ids)
        machine.check_count("--workers", workers)
        if not args.grace_seconds >= 0:
            raise ValueError(f"--grace-seconds must be >= 0. Received: {args.grace_seconds:g}")
        if shutil.which(command[0], path=env.get("PATH")) is None:
            raise ValueError(f"Cannot find the program to launch: {command[0]!r} is not an "
                             "executable file or on the PATH.")
        return launch_tuner(command, workers, gpu_ids, machine.usable_cores(),
                            machine.free_ports(1)[0], max_restarts=max_restarts,
                            grace_seconds=args.grace_seconds, env=env)
    except ValueError as error:
        raise UsageError(str(error)) from None
