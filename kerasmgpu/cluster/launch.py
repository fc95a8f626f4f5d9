"""Run a training script as several workers of a TF_CONFIG cluster on this machine.

`kerasmgpu launch --workers 2 -- python train.py ...` starts the command once per worker,
each with the TF_CONFIG that makes it worker i of a cluster on free 127.0.0.1 ports, its
share of the devices and of the CPU cores. It streams every worker's output line by line
prefixed `[worker i] `, and exits with status 0 only when every worker exits 0. When one
worker fails, the others get `--grace-seconds` to finish (their collectives normally time
out and fail on their own), then are stopped (SIGTERM, then SIGKILL), so the launcher
never hangs. Ctrl-C or SIGTERM to the launcher stops every worker.

Each worker's environment:

- `TF_CONFIG`: `{"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]},
  "task": {"type": "worker", "index": i}}`.
- `KERASMGPU_WORKER_INDEX=i`.
- Devices: on a machine with GPUs, `CUDA_VISIBLE_DEVICES` lists the worker's own GPUs
  (worker i gets GPUs i*d .. i*d+d-1 of the visible ones); on a machine without GPUs,
  `KERASMGPU_SIMULATED_DEVICES=d` splits the CPU into d logical devices per worker.
- `TF_NUM_INTRAOP_THREADS` and `TF_NUM_INTEROP_THREADS`: the worker's share of the cores
  (at least 1), unless already set.
- `PYTHONUNBUFFERED=1`, so Python workers' lines arrive as they are printed.

Workers read no standard input (it is /dev/null).

Network: a worker's TensorFlow server listens on every network interface and is
unauthenticated. So by default (`--network auto`) the workers run in a private network
of their own (a Linux network namespace with only loopback): they reach each other on
127.0.0.1, nothing outside reaches them, and they cannot reach anything outside either
(download data before launching). Where Linux refuses, the launcher warns and names the
open ports. `--network host` (or `KERASMGPU_LAUNCH_NETWORK=host`) runs the workers on
the machine's network, as a real cluster does; `--network private` refuses to run
without isolation.

Real clusters (one process per machine) need no launcher: every host runs the same
script unchanged, with the same cluster list and its own index. On host 0:

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' python train.py

and on host 1 the same with `"index": 1`. Worker 0 is the chief (it alone writes files).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

from kerasmgpu.cluster import network as network_lib
from kerasmgpu.cluster import supervise
from kerasmgpu.options import ENV_SIMULATED_DEVICES, UsageError

ENV_WORKER_INDEX = "KERASMGPU_WORKER_INDEX"
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
LOCALHOST = "127.0.0.1"


def free_ports(count, host=LOCALHOST):
    """Distinct TCP ports on `host` that nothing listens on at the moment.

    All sockets stay bound until every port is chosen, so the ports differ. Another
    program may still take one before the worker binds it; that is rare on a test box.

    Args:
        count: how many ports.
        host: the address to bind.

    Returns:
        A list of `count` port numbers.

    Example:

    ```python
    p0, p1 = free_ports(2)
    ```
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def visible_gpu_ids(env=None):
    """The ids of the GPUs workers may use, found without starting TensorFlow.

    `CUDA_VISIBLE_DEVICES` in `env`, when set, is the answer (empty or -1: no GPU);
    otherwise `nvidia-smi` lists the GPUs; without it the machine has none. Starting
    TensorFlow in the launcher would only load CUDA for nothing.

    Args:
        env: the environment the workers start from (default `os.environ`).

    Returns:
        A list of GPU ids as strings (indices or UUIDs), empty without GPUs.

    Example:

    ```python
    gpus = visible_gpu_ids()   # e.g. ["0", "1", "2", "3"], or [] on a CPU-only box
    ```
    """
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [part.strip() for part in listed.split(",") if part.strip()]
        # CUDA stops at the first invalid entry; -1 is the usual way to hide all GPUs.
        if "-1" in ids:
            ids = ids[: ids.index("-1")]
        return ids
    nvidia_smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if nvidia_smi is None:
        return []
    try:
        result = subprocess.run(
            [nvidia_smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def usable_cores():
    """The number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def tf_config(addresses, index):
    """The TF_CONFIG JSON text for worker `index` of a cluster of `addresses`.

    Args:
        addresses: the workers' "host:port" strings, in index order.
        index: this worker's position in `addresses`.

    Returns:
        A JSON string.

    Example:

    ```python
    tf_config(["127.0.0.1:2222", "127.0.0.1:2223"], 1)
    # '{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 1}}'
    ```
    """
    return json.dumps(
        {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}
    )


def worker_environments(workers, devices_per_worker=None, env=None, gpu_ids=None,
                        cores=None, ports=None):
    """The environment of each worker process of a local cluster.

    Args:
        workers: number of worker processes, at least 1.
        devices_per_worker: devices each worker trains on. Default: on a machine with
            GPUs, the visible GPUs split evenly; without GPUs, 1.
        env: the environment workers start from (default `os.environ`); it is copied.
        gpu_ids: the GPUs to share out (default `visible_gpu_ids(env)`).
        cores: CPU cores to share out for TensorFlow's thread pools (default: those
            this process may use).
        ports: one 127.0.0.1 port per worker (default: free ports).

    Returns:
        A list of `workers` dicts, worker i's environment at index i.

    Raises:
        ValueError: a count is not a whole number >= 1, or there are fewer GPUs than
            `workers * devices_per_worker`.

    Example:

    ```python
    envs = worker_environments(2, devices_per_worker=2)
    envs[1]["TF_CONFIG"]   # '{"cluster": {"worker": ["127.0.0.1:...", ...]}, ...}'
    ```
    """
    _check_count("workers", workers)
    if devices_per_worker is not None:
        _check_count("devices_per_worker", devices_per_worker)
    env = dict(os.environ if env is None else env)
    gpu_ids = visible_gpu_ids(env) if gpu_ids is None else list(gpu_ids)
    cores = usable_cores() if cores is None else cores
    ports = free_ports(workers) if ports is None else list(ports)
    if len(ports) != workers:
        raise ValueError(f"Expected one port per worker ({workers}). Received: ports={ports}")
    addresses = [f"{LOCALHOST}:{port}" for port in ports]
    if gpu_ids:
        devices_per_worker = _gpus_per_worker(workers, devices_per_worker, gpu_ids)
    elif devices_per_worker is None:
        devices_per_worker = 1
    threads = str(max(1, cores // workers))

    environments = []
    for index in range(workers):
        worker_env = dict(env)
        worker_env["TF_CONFIG"] = tf_config(addresses, index)
        worker_env[ENV_WORKER_INDEX] = str(index)
        worker_env["PYTHONUNBUFFERED"] = "1"
        if gpu_ids:
            own = gpu_ids[index * devices_per_worker:(index + 1) * devices_per_worker]
            worker_env["CUDA_VISIBLE_DEVICES"] = ",".join(own)
        else:
            worker_env[ENV_SIMULATED_DEVICES] = str(devices_per_worker)
        for name in THREAD_VARIABLES:
            worker_env.setdefault(name, threads)
        environments.append(worker_env)
    return environments


def _gpus_per_worker(workers, devices_per_worker, gpu_ids):
    """Check there are GPUs enough for every worker; the default splits them evenly."""
    if devices_per_worker is None:
        if len(gpu_ids) < workers:
            raise ValueError(
                f"{workers} workers need at least {workers} GPUs, one each; "
                f"{len(gpu_ids)} are visible ({','.join(gpu_ids)}). Received: workers={workers}"
            )
        return len(gpu_ids) // workers
    if workers * devices_per_worker > len(gpu_ids):
        raise ValueError(
            f"{workers} workers x {devices_per_worker} devices need "
            f"{workers * devices_per_worker} GPUs; {len(gpu_ids)} are visible "
            f"({','.join(gpu_ids)}). Received: workers={workers}, "
            f"devices_per_worker={devices_per_worker}"
        )
    return devices_per_worker


def oversubscription(workers, devices_per_worker, gpu_ids, cores):
    """A warning when the workers' devices outnumber this machine's cores, else None.

    Why: `--workers 1000` on a 2-core machine would start every worker without a word,
    each a TensorFlow process, and training would crawl or the machine run out of memory.
    The launch goes on (a test may mean it); the user is told. With GPUs, asking for more
    devices than there are GPUs is already an error (`worker_environments`).

    Args:
        workers: the number of workers.
        devices_per_worker: the simulated devices per worker (None: 1).
        gpu_ids: the GPUs workers use (a warning applies only without GPUs).
        cores: this machine's usable cores.

    Returns:
        The warning's text, or None.

    Example:

    ```python
    oversubscription(1000, None, [], cores=2)  # '1000 workers x 1 device(s) ...'
    ```
    """
    if gpu_ids:
        return None
    devices = workers * (devices_per_worker or 1)
    if devices <= cores:
        return None
    return (
        f"warning: {workers} workers x {devices_per_worker or 1} device(s) = {devices} "
        f"simulated devices on {cores} CPU core(s): they share the cores, so each runs at "
        f"a fraction of a core and the launch may exhaust memory. Use at most {cores} "
        "workers x devices on this machine (or a machine with more cores)."
    )


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1. Received: {name}={value!r}")


def _check_command(command):
    if isinstance(command, (str, bytes)):
        raise ValueError(
            "command must be a list of arguments such as ['python', 'train.py']. "
            f"Received: command={command!r}"
        )
    command = list(command or ())
    if not command:
        raise ValueError(
            "No command to launch: give one after '--', e.g. "
            "kerasmgpu launch --workers 2 -- python train.py. Received: command=[]"
        )
    if not all(isinstance(part, str) for part in command):
        raise ValueError(f"command must be a list of strings. Received: command={command!r}")
    return command


def launch(command, workers, devices_per_worker=None, grace_seconds=30.0, env=None,
           stream=None, error_stream=None, network=None):
    """Run `command` as `workers` worker processes of a cluster on this machine.

    The way to try multi-worker training on one machine, or to test a script before
    running it on a real cluster: the script is the same (see this module's docstring for
    the TF_CONFIG each host of a real cluster sets).

    Args:
        command: the program and its arguments, e.g. `["python", "train.py"]`.
        workers: number of worker processes, at least 1.
        devices_per_worker: devices each worker trains on: its own GPUs on a GPU machine
            (`CUDA_VISIBLE_DEVICES`), else simulated CPU devices
            (`KERASMGPU_SIMULATED_DEVICES`). Default: the GPUs split evenly, or 1.
        grace_seconds: after the first worker fails, how long the others may run on
            before they are stopped.
        env: the environment the workers start from (default `os.environ`).
        stream: where worker standard output goes, each line prefixed `[worker i] `
            (default `sys.stdout`).
        error_stream: where worker standard error and the launcher's own messages go
            (default `sys.stderr`).
        network: "auto" (default, or `KERASMGPU_LAUNCH_NETWORK`): the workers run in a
            private network with loopback only, where Linux allows it, else on this
            machine's network with a warning naming the open ports. "private": a private
            network or `PrivateNetworkError`. "host": this machine's network (a one-line
            note names the ports). In a private network the workers cannot reach other
            machines either (no downloads).

    Returns:
        0 when every worker exits 0; otherwise the exit status of the first worker that
        failed (128 + the signal number if a signal killed it). When the launcher itself
        is interrupted (Ctrl-C, SIGTERM), 128 + that signal's number.

    Raises:
        ValueError: bad counts, an empty command, a program not found, fewer GPUs
            than asked for, or an unknown network mode.
        PrivateNetworkError: `network="private"` on a machine that cannot isolate the
            workers.

    Example:

    ```python
    from kerasmgpu.cluster.launch import launch
    status = launch(["python", "train.py", "--epochs", "3"], workers=2, devices_per_worker=2)
    ```
    """
    command = _check_command(command)
    _check_count("workers", workers)
    if (isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float))
            or not grace_seconds >= 0):
        raise ValueError(
            f"grace_seconds must be a number >= 0. Received: grace_seconds={grace_seconds!r}"
        )
    env = dict(os.environ if env is None else env)
    program = command[0]
    if shutil.which(program, path=env.get("PATH")) is None:
        raise ValueError(
            f"Cannot find the program to launch: {program!r} is not an executable file "
            "or on the workers' PATH."
        )
    mode = network_lib.resolve_mode(network, env)
    ports = free_ports(workers)
    environments = worker_environments(workers, devices_per_worker, env=env, ports=ports)
    output = supervise.Output(sys.stdout if stream is None else stream,
                     sys.stderr if error_stream is None else error_stream)

    warning = oversubscription(workers, devices_per_worker, visible_gpu_ids(env), usable_cores())
    if warning:
        output.note(warning)
    private = network_lib.for_workers(mode, ports, output.note)
    hint = None
    if private is not None:
        command = private.command(command)
        hint = ("the workers ran in a private network (loopback only): if the script "
                "needs other machines (e.g. to download data), fetch what it needs before "
                "launching, or pass --network host")
    started = []
    previous_handlers = supervise.catch_termination()
    try:
        for index, worker_env in enumerate(environments):
            started.append(supervise.Worker.start(index, command, worker_env, output))
        return supervise.supervise(started, grace_seconds, output, hint)
    except (KeyboardInterrupt, supervise.Terminated) as interruption:
        signum = getattr(interruption, "signum", signal.SIGINT)
        output.note(f"received {signal.Signals(signum).name}: stopping all workers")
        return 128 + signum
    finally:
        # Stop whatever still runs, whether the launcher finished, was interrupted or
        # failed to start a worker; a second Ctrl-C must not leave workers behind.
        supervise.ignore_termination()
        try:
            supervise.stop([worker for worker in started if worker.running()])
            for worker in started:
                worker.join_readers()
        finally:
            if private is not None:
                private.close()
            supervise.restore_handlers(previous_handlers)


def _add_arguments(parser):
    parser.add_argument(
        "--workers", type=int, required=True, metavar="N",
        help="number of worker processes (at least 1)",
    )
    parser.add_argument(
        "--devices-per-worker", type=int, default=None, metavar="D",
        help="devices each worker trains on. With GPUs: worker i gets its own D GPUs through "
        "CUDA_VISIBLE_DEVICES (default: the visible GPUs split evenly). Without GPUs: "
        "KERASMGPU_SIMULATED_DEVICES=D splits the CPU into D logical devices per worker "
        "(default 1)",
    )
    parser.add_argument(
        "--grace-seconds", type=float, default=30.0, metavar="S",
        help="after a worker fails, how long the others may run before they are stopped "
        "(SIGTERM, then SIGKILL) (default: %(default)g)",
    )
    parser.add_argument(
        "--network", choices=network_lib.MODES, default=None,
        help="auto: the workers run in a private network with loopback only where Linux "
        "allows it, else on this machine's network with a warning; private: isolation or "
        "an error; host: this machine's network (default: $KERASMGPU_LAUNCH_NETWORK or auto)",
    )
    parser.add_argument(
        "command", nargs="*", metavar="COMMAND",
        help="the command each worker runs, after '--', e.g. -- python train.py --epochs 3",
    )


_DESCRIPTION = __doc__.split("\n\n")[0]
_EPILOG = "\n\n".join(__doc__.split("\n\n")[1:])


def add_parser(subparsers):
    """Add the `launch` subcommand to a `kerasmgpu` argument parser.

    Args:
        subparsers: what `argparse.ArgumentParser.add_subparsers()` returned.

    Returns:
        The `launch` parser; it sets `run` and `command_parser` as defaults.

    Example:

    ```python
    parser = argparse.ArgumentParser(prog="kerasmgpu")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["launch", "--workers", "2", "--", "python", "train.py"])
    status = args.run(args)
    ```
    """
    parser = subparsers.add_parser(
        "launch",
        help="run a training script as several TF_CONFIG workers on this machine",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(run=run_command, command_parser=parser)
    return parser


def run_command(args):
    """Run `kerasmgpu launch` from parsed arguments; returns the exit status.

    Raises:
        UsageError: a flag value or the command is unusable (reported with exit status 2).
    """
    for flag, value in (("--workers", args.workers),
                        ("--devices-per-worker", args.devices_per_worker)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a whole number >= 1. Received: {flag} {value}")
    if not args.grace_seconds >= 0:
        raise UsageError(
            f"--grace-seconds must be >= 0. Received: --grace-seconds {args.grace_seconds:g}"
        )
    if not args.command:
        raise UsageError(
            "no command to launch: give one after '--', e.g. "
            "kerasmgpu launch --workers 2 -- python train.py"
        )
    try:
        return launch(args.command, args.workers, devices_per_worker=args.devices_per_worker,
                      grace_seconds=args.grace_seconds,
                      network=getattr(args, "network", None))
    except ValueError as error:
        raise UsageError(str(error)) from None
    except network_lib.PrivateNetworkError as error:
        print(f"kerasmgpu launch: error: {error}", file=sys.stderr, flush=True)
        return 1


def main(argv=None):
    """`python -m kerasmgpu.cluster.launch --workers 2 -- python train.py`; returns the exit status.

    Example:

    ```python
    from kerasmgpu.cluster import launch
    launch.main(["--workers", "2", "--", "python", "-c", "import os; print(os.getpid())"])
    ```
    """
    parser = argparse.ArgumentParser(
        prog="python -m kerasmgpu.cluster.launch", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_command(args)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
