"""This machine, as the launchers see it, without starting TensorFlow.

Free ports, the GPUs workers may use, the cores this process may run on, and the checks of
a command and a process count. `kerasmgpu launch` (`launch.py`) and `kerasmgpu launch
--tuner` (`tuner.py`) both start processes from these.
"""

import os
import shutil
import socket
import subprocess

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


def check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1. Received: {name}={value!r}")


def check_command(command):
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
