"""Run a training script as the workers of a cluster: on this machine, or on each of several nodes.

One machine: `kerasmgpu launch --workers 2 -- python train.py ...` starts the command
once per worker, each with the TF_CONFIG that makes it worker i of a cluster on free
127.0.0.1 ports, its share of the devices and of the CPU cores. It streams every worker's
output line by line prefixed `[worker i] `, and exits with status 0 only when every
worker exits 0. When one worker fails, the others get `--grace-seconds` to finish (their
collectives normally time out and fail on their own), then are stopped (SIGTERM, then
SIGKILL), so the launcher never hangs. Ctrl-C or SIGTERM to the launcher stops every worker.

Several nodes: run the launcher once on every node, with the same `--hosts` list and the
node's own `--node-rank`:

    kerasmgpu launch --hosts 10.0.0.1,10.0.0.2 --node-rank 0 --workers-per-node 4 -- python train.py
    kerasmgpu launch --hosts 10.0.0.1,10.0.0.2 --node-rank 1 --workers-per-node 4 -- python train.py

(the first on 10.0.0.1, the second on 10.0.0.2). The K workers of node r are workers
r*K .. r*K+K-1 of the cluster and listen on that node's HOST, ports PORT .. PORT+K-1
(`HOST:PORT` in the list; PORT defaults to 12345). Every node derives the same TF_CONFIG
from the list, so no rendezvous service is needed. Worker 0 is the chief.

Slurm: inside an allocation, `srun --ntasks-per-node=1 kerasmgpu launch
--workers-per-node K -- python train.py` (no --hosts) takes the nodes and this node's rank
from the job step, through TensorFlow's SlurmClusterResolver; ports start at
KERASMGPU_PORT_BASE, else at a port derived from the job id. With one task per GPU,
`srun python train.py` needs no launcher: `import kerasmgpu` joins the step's cluster.

Restarts: with `--max-restarts M`, when any worker fails every worker of the node stops
and all start again, up to M times. On several nodes the other nodes' workers fail within
the collective timeout (KERASMGPU_COLLECTIVE_TIMEOUT, 60 s) and their launchers restart
too; each launcher waits for the other nodes' old workers to stop, and the cluster meets
again on the same ports. Training resumes from the last keras.callbacks.BackupAndRestore
backup: the script's own, or the one `--backup-dir DIR` adds to ParallelModel.fit (on
several nodes, DIR must be on storage every node reads). Each restart is logged with its
cause; giving up exits with the last failure's status, naming it.

Each worker's environment:

- `TF_CONFIG`: `{"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]},
  "task": {"type": "worker", "index": i}}` (with --hosts: every node's workers).
- `KERASMGPU_WORKER_INDEX=i`, the worker's index in the whole cluster.
- Devices: on a machine with GPUs, `CUDA_VISIBLE_DEVICES` lists the worker's own GPUs
  (local worker j gets GPUs j*d .. j*d+d-1 of the visible ones); on a machine without
  GPUs, `KERASMGPU_SIMULATED_DEVICES=d` splits the CPU into d logical devices per worker.
- `TF_NUM_INTRAOP_THREADS` and `TF_NUM_INTEROP_THREADS`: the worker's share of the cores
  (at least 1), unless already set.
- `PYTHONUNBUFFERED=1`, so Python workers' lines arrive as they are printed.
- `KERASMGPU_RESTART`: 0, then 1, 2, ... after each restart; `KERASMGPU_BACKUP_DIR` with
  --backup-dir.

Workers read no standard input (it is /dev/null).

Network: a worker's TensorFlow server listens on every network interface and is
unauthenticated. So by default (`--network auto`) the workers of one machine run in a
private network of their own (a Linux network namespace with only loopback): they reach
each other on 127.0.0.1, nothing outside reaches them, and they cannot reach anything
outside either (download data before launching). Where Linux refuses, the launcher warns
and names the open ports. `--network host` (or `KERASMGPU_LAUNCH_NETWORK=host`) runs the
workers on the machine's network; `--network private` refuses to run without isolation.
The workers of several nodes must reach each other, so they always run on the machine's
network (`--network private` is refused) and the launcher says at start which interfaces
and ports are open, unauthenticated: keep the nodes on a private network (docs/security.md).

Clusters that start the processes themselves need no launcher: every host runs the same
script unchanged, with the same cluster list and its own index. On host 0:

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' python train.py

and on host 1 the same with `"index": 1`. Worker 0 is the chief (it alone writes files).
Kubernetes' TFJob (Kubeflow) writes such a TF_CONFIG in every pod, with a `chief` task:
the chief and the workers train as peers, the chief first, and the chief alone writes.

One module on purpose (about 800 lines, much of it the command's documentation and
flags): the layouts of one machine, several nodes and a Slurm step all end in the same
`launch()`; the processes are in `supervise`, this machine's facts in `machine`, the
KerasTuner mode in `tuner`.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
from typing import NamedTuple

from kerasmgpu.cluster import network as network_lib
from kerasmgpu.cluster import slurm, supervise
from kerasmgpu.cluster.backup import ENV_BACKUP_DIR
from kerasmgpu.cluster.machine import (
    LOCALHOST,
    check_command,
    check_count,
    free_ports,
    usable_cores,
    visible_gpu_ids,
)
from kerasmgpu.options import ENV_SIMULATED_DEVICES, UsageError

ENV_WORKER_INDEX = "KERASMGPU_WORKER_INDEX"
ENV_RESTART = "KERASMGPU_RESTART"
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
DEFAULT_PORT = 12345
# worker.ENV_TIMEOUT, named here because importing worker.py loads TensorFlow.
_COLLECTIVE_TIMEOUT_VARIABLE = "KERASMGPU_COLLECTIVE_TIMEOUT"
_PEER_PROBE_SECONDS = 0.5


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


class Layout(NamedTuple):
    """Where every worker of a cluster listens, and which of them this launcher starts.

    Attributes:
        addresses: every worker's "host:port", in the order of their indices.
        local: the indices of the workers this launcher starts.
        node_rank: this node's position among the nodes.
        num_nodes: how many nodes (launchers) the cluster has.
        loopback: whether the workers reach each other on 127.0.0.1 alone (a cluster on
            this machine that `launch` made up), so that a private network can hold them.
    """

    addresses: tuple
    local: tuple
    node_rank: int = 0
    num_nodes: int = 1
    loopback: bool = False

    @property
    def peers(self):
        """The addresses of the other nodes' workers."""
        return tuple(address for index, address in enumerate(self.addresses)
                     if index not in self.local)


def local_layout(workers, ports=None):
    """A cluster of `workers` workers on this machine's 127.0.0.1 (free ports by default)."""
    ports = free_ports(workers) if ports is None else list(ports)
    if len(ports) != workers:
        raise ValueError(f"Expected one port per worker ({workers}). Received: ports={ports}")
    return Layout(tuple(f"{LOCALHOST}:{port}" for port in ports), tuple(range(workers)),
                  loopback=True)


def parse_hosts(hosts):
    """The nodes of `--hosts`: a list of `(host, port or None)`.

    Args:
        hosts: "HOST[:PORT],HOST[:PORT],..." or a list of "HOST[:PORT]" (IPv6 addresses
            in brackets: "[fd00::1]:12345").

    Returns:
        A list of `(host, port)` pairs, port None where the entry names none.

    Raises:
        ValueError: an empty list or entry, or a port that is not a number in 1-65535.

    Example:

    ```python
    parse_hosts("10.0.0.1:2222,node2")   # [("10.0.0.1", 2222), ("node2", None)]
    ```
    """
    entries = hosts.split(",") if isinstance(hosts, str) else list(hosts or ())
    entries = [entry.strip() for entry in entries]
    if not entries or not all(entries):
        raise ValueError(
            "hosts must list every node as HOST[:PORT], separated by commas, e.g. "
            f"10.0.0.1:12345,10.0.0.2:12345. Received: hosts={hosts!r}"
        )
    nodes = []
    for entry in entries:
        host, port = entry, None
        if entry.startswith("["):  # [IPv6]:PORT
            host, _, rest = entry[1:].partition("]")
            host = f"[{host}]"
            port = rest[1:] if rest.startswith(":") else (rest or None)
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        elif ":" in entry:
            raise ValueError(
                f"An IPv6 address in hosts goes in brackets, [ADDRESS] or [ADDRESS]:PORT. "
                f"Received: {entry!r} in hosts={hosts!r}"
            )
        if port is not None:
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"A port in hosts must be a number in 1-65535. Received: {entry!r} "
                    f"in hosts={hosts!r}"
                )
            port = int(port)
        nodes.append((host, port))
    return nodes


def node_layout(hosts, node_rank, workers_per_node):
    """The cluster of `workers_per_node` workers on each node of `hosts`, seen from one node.

    Node r's workers are workers r*K .. r*K+K-1 and listen on its host, ports PORT ..
    PORT+K-1 (PORT from the entry, else `DEFAULT_PORT`): every node computes the same
    list, so no rendezvous service is needed.

    Args:
        hosts: the nodes, as `parse_hosts` reads them.
        node_rank: this node's position in `hosts`.
        workers_per_node: K, at least 1.

    Returns:
        A `Layout`.

    Raises:
        ValueError: `node_rank` is out of range, or two workers would share an address.

    Example:

    ```python
    node_layout("10.0.0.1,10.0.0.2", 1, 2).addresses
    # ("10.0.0.1:12345", "10.0.0.1:12346", "10.0.0.2:12345", "10.0.0.2:12346")
    ```
    """
    check_count("workers_per_node", workers_per_node)
    nodes = parse_hosts(hosts)
    if (isinstance(node_rank, bool) or not isinstance(node_rank, int)
            or not 0 <= node_rank < len(nodes)):
        raise ValueError(
            f"node_rank must be this node's position in hosts, 0..{len(nodes) - 1} for "
            f"{len(nodes)} node(s). Received: node_rank={node_rank!r}"
        )
    addresses = []
    for host, port in nodes:
        base = DEFAULT_PORT if port is None else port
        if base + workers_per_node - 1 > 65535:
            raise ValueError(
                f"{workers_per_node} workers on {host} need ports {base}.."
                f"{base + workers_per_node - 1}, beyond 65535. Received: port {base}"
            )
        addresses += [f"{host}:{base + j}" for j in range(workers_per_node)]
    for index, address in enumerate(addresses):
        first = addresses.index(address)
        if first != index:
            raise ValueError(
                f"Two workers would listen on {address} (of nodes {first // workers_per_node} "
                f"and {index // workers_per_node}): node r's {workers_per_node} workers use "
                "ports PORT..PORT+K-1 of its host; give each node its own host or ports "
                f"that far apart. Received: hosts={hosts!r}"
            )
    local = range(node_rank * workers_per_node, (node_rank + 1) * workers_per_node)
    return Layout(tuple(addresses), tuple(local), node_rank, len(nodes))


def slurm_layout(workers_per_node):
    """The cluster of a Slurm job step running one launcher per node, seen from this node.

    The nodes and this node's rank come from TensorFlow's `SlurmClusterResolver`
    (`kerasmgpu.cluster.slurm.node_hosts`); each node's workers listen on ports
    `port_base()` onwards, the resolver's ports for tasks of one node.
    """
    hosts, node_rank = slurm.node_hosts()
    base = slurm.port_base()
    return node_layout([f"{host}:{base}" for host in hosts], node_rank, workers_per_node)


def worker_environments(workers=None, devices_per_worker=None, env=None, gpu_ids=None,
                        cores=None, ports=None, layout=None):
    """The environment of each worker process this launcher starts.

    Args:
        workers: number of worker processes on this machine, at least 1 (default: those
            of `layout`).
        devices_per_worker: devices each worker trains on. Default: on a machine with
            GPUs, the visible GPUs split evenly; without GPUs, 1.
        env: the environment workers start from (default `os.environ`); it is copied.
        gpu_ids: the GPUs to share out (default `visible_gpu_ids(env)`).
        cores: CPU cores to share out for TensorFlow's thread pools (default: those
            this process may use).
        ports: one 127.0.0.1 port per worker (default: free ports), without `layout`.
        layout: the cluster (`Layout`: `node_layout`, `slurm_layout`); default a
            cluster of `workers` on this machine (`local_layout`).

    Returns:
        A list of dicts, the environment of this machine's j-th worker at index j.

    Raises:
        ValueError: a count is not a whole number >= 1, or there are fewer GPUs than
            `workers * devices_per_worker`.

    Example:

    ```python
    envs = worker_environments(2, devices_per_worker=2)
    envs[1]["TF_CONFIG"]   # '{"cluster": {"worker": ["127.0.0.1:...", ...]}, ...}'
    ```
    """
    if layout is None:
        check_count("workers", workers)
        layout = local_layout(workers, ports)
    workers = len(layout.local)
    if devices_per_worker is not None:
        check_count("devices_per_worker", devices_per_worker)
    env = dict(os.environ if env is None else env)
    gpu_ids = visible_gpu_ids(env) if gpu_ids is None else list(gpu_ids)
    cores = usable_cores() if cores is None else cores
    if gpu_ids:
        devices_per_worker = _gpus_per_worker(workers, devices_per_worker, gpu_ids)
    elif devices_per_worker is None:
        devices_per_worker = 1
    threads = str(max(1, cores // workers))

    environments = []
    for local, index in enumerate(layout.local):
        worker_env = dict(env)
        worker_env["TF_CONFIG"] = tf_config(layout.addresses, index)
        worker_env[ENV_WORKER_INDEX] = str(index)
        worker_env["PYTHONUNBUFFERED"] = "1"
        if gpu_ids:
            own = gpu_ids[local * devices_per_worker:(local + 1) * devices_per_worker]
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


def launch(command, workers=None, devices_per_worker=None, grace_seconds=30.0, env=None,
           stream=None, error_stream=None, network=None, *, workers_per_node=None,
           hosts=None, node_rank=None, max_restarts=0, backup_dir=None):
    """Run `command` as the workers of a cluster: all on this machine, or this node's share.

    The way to try multi-worker training on one machine (`workers`), and to run it on
    several machines (`workers_per_node` with `hosts` and `node_rank`, or inside a Slurm
    job step), with automatic restarts (`max_restarts`). The script is the same in every
    case (see this module's docstring).

    Args:
        command: the program and its arguments, e.g. `["python", "train.py"]`.
        workers: number of worker processes of a cluster on this machine alone.
        devices_per_worker: devices each worker trains on: its own GPUs on a GPU machine
            (`CUDA_VISIBLE_DEVICES`), else simulated CPU devices
            (`KERASMGPU_SIMULATED_DEVICES`). Default: the GPUs split evenly, or 1.
        grace_seconds: after the first worker fails (and no restart is left), how long
            the others may run on before they are stopped.
        env: the environment the workers start from (default `os.environ`).
        stream: where worker standard output goes, each line prefixed `[worker i] `
            (default `sys.stdout`).
        error_stream: where worker standard error and the launcher's own messages go
            (default `sys.stderr`).
        network: "auto" (default, or `KERASMGPU_LAUNCH_NETWORK`): the workers of one
            machine run in a private network with loopback only, where Linux allows it,
            else on this machine's network with a warning naming the open ports.
            "private": a private network or `PrivateNetworkError`. "host": this machine's
            network (a one-line note names the ports). In a private network the workers
            cannot reach other machines either (no downloads). A cluster of several
            nodes (`hosts`, Slurm) always runs on the machine's network ("private" is
            refused).
        workers_per_node: instead of `workers`: the workers this node starts, as one of
            the nodes of `hosts`, or of the Slurm job step this launcher runs in
            (`srun --ntasks-per-node=1`) when `hosts` is None.
        hosts: every node, "HOST[:PORT],..." or a list (see `node_layout`).
        node_rank: this node's position in `hosts`.
        max_restarts: how many times every worker is started again after a failure.
        backup_dir: a directory for the `keras.callbacks.BackupAndRestore` that
            `ParallelModel.fit` adds (`KERASMGPU_BACKUP_DIR`), for scripts without one.

    Returns:
        0 when every worker exits 0; otherwise the exit status of the first worker that
        failed last (128 + the signal number if a signal killed it). When the launcher
        itself is interrupted (Ctrl-C, SIGTERM), 128 + that signal's number.

    Raises:
        ValueError: bad counts, an empty command, a program not found, fewer GPUs
            than asked for, an unknown network mode, a cluster of several nodes in a
            private network, or `workers_per_node` outside a Slurm step without `hosts`.
        PrivateNetworkError: `network="private"` on a machine that cannot isolate the
            workers.

    Example:

    ```python
    from kerasmgpu.cluster.launch import launch
    status = launch(["python", "train.py", "--epochs", "3"], workers=2, devices_per_worker=2)
    # node 1 of two, 4 workers each, restarting up to 3 times:
    status = launch(["python", "train.py"], workers_per_node=4, hosts="node1,node2",
                    node_rank=1, max_restarts=3, backup_dir="/shared/run1/backup")
    ```
    """
    command = check_command(command)
    if (isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float))
            or not grace_seconds >= 0):
        raise ValueError(
            f"grace_seconds must be a number >= 0. Received: grace_seconds={grace_seconds!r}"
        )
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(
            f"max_restarts must be a whole number >= 0. Received: max_restarts={max_restarts!r}"
        )
    env = dict(os.environ if env is None else env)
    program = command[0]
    if shutil.which(program, path=env.get("PATH")) is None:
        raise ValueError(
            f"Cannot find the program to launch: {program!r} is not an executable file "
            "or on the workers' PATH."
        )
    layout = _layout(workers, workers_per_node, hosts, node_rank, env)
    mode = network_lib.resolve_mode(network, env)
    if not layout.loopback:
        # The addresses of --hosts or Slurm are the machines' own: a namespace with
        # loopback alone could not hold them, and the other nodes must reach them.
        if mode == "private":
            raise ValueError(
                "A cluster of nodes (--hosts, Slurm) cannot run in a private network: its "
                "workers listen on the machines' addresses and must reach the other nodes' "
                "(see docs/security.md). Received: network='private' with hosts "
                f"{sorted({a.rsplit(':', 1)[0] for a in layout.addresses})}"
            )
        mode = "host"
    if backup_dir:
        env[ENV_BACKUP_DIR] = os.path.abspath(backup_dir)
    environments = worker_environments(devices_per_worker=devices_per_worker, env=env,
                                       layout=layout)
    output = supervise.Output(sys.stdout if stream is None else stream,
                              sys.stderr if error_stream is None else error_stream)
    ports = [int(layout.addresses[index].rsplit(":", 1)[1]) for index in layout.local]
    warning = oversubscription(len(layout.local), devices_per_worker, visible_gpu_ids(env),
                               usable_cores())
    if warning:
        output.note(warning)
    if layout.loopback:
        private = network_lib.for_workers(mode, ports, output.note)
    else:
        output.note(_exposure_note(layout, ports))
        private = None
    if max_restarts and not backup_dir:
        output.note("--max-restarts: a restarted worker resumes training from a "
                    "keras.callbacks.BackupAndRestore backup: the script's own, or the one "
                    "--backup-dir DIR adds; without one, training starts over")
    hint = None
    if private is not None:
        command = private.command(command)
        hint = ("the workers ran in a private network (loopback only): if the script "
                "needs other machines (e.g. to download data), fetch what it needs before "
                "launching, or pass --network host")
    started = []

    def start(restart):
        started.clear()
        for index, worker_env in zip(layout.local, environments):
            worker_env = dict(worker_env, **{ENV_RESTART: str(restart)})
            started.append(supervise.Worker.start(index, command, worker_env, output))
        return list(started)

    def before_restart():
        if layout.peers:
            _wait_for_peers_to_stop(layout.peers, env, output)

    previous_handlers = supervise.catch_termination()
    try:
        return supervise.run_with_restarts(start, max_restarts, grace_seconds, output, hint,
                                           before_restart)
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


def _layout(workers, workers_per_node, hosts, node_rank, env):
    """The cluster `launch`'s arguments describe (see `launch`)."""
    if workers is not None and workers_per_node is not None:
        raise ValueError(
            "Give workers (a cluster on this machine) or workers_per_node (this node's "
            f"workers of several nodes), not both. Received: workers={workers!r}, "
            f"workers_per_node={workers_per_node!r}"
        )
    if workers is not None:
        check_count("workers", workers)
        if hosts is not None or node_rank is not None:
            raise ValueError(
                "hosts and node_rank describe a cluster of several nodes: give "
                "workers_per_node (--workers-per-node K), the workers of each node, instead "
                f"of workers. Received: workers={workers!r}, hosts={hosts!r}, "
                f"node_rank={node_rank!r}"
            )
        return local_layout(workers)
    if workers_per_node is None:
        raise ValueError(
            "Give the number of workers: workers=N (--workers N) for a cluster on this "
            "machine, or workers_per_node=K (--workers-per-node K) on each node of several. "
            "Received: neither"
        )
    check_count("workers_per_node", workers_per_node)
    if hosts is not None:
        if node_rank is None:
            raise ValueError(
                "hosts needs node_rank (--node-rank R), this node's position in the list. "
                f"Received: hosts={hosts!r}, node_rank=None"
            )
        return node_layout(hosts, node_rank, workers_per_node)
    if node_rank is not None:
        raise ValueError(
            f"node_rank needs hosts (--hosts HOST[:PORT],...). Received: node_rank={node_rank!r}"
        )
    if slurm.in_step(env):
        return slurm_layout(workers_per_node)
    raise ValueError(
        "workers_per_node without hosts takes the nodes from a Slurm job step (srun "
        "--ntasks-per-node=1 kerasmgpu launch ...), and this is none (no SLURM_PROCID, "
        "SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE). Give "
        "--hosts HOST[:PORT],... and --node-rank R, or --workers N for this machine alone."
    )


def _exposure_note(layout, ports):
    """What a node of several exposes: every interface, these ports, unauthenticated."""
    first, last = layout.local[0], layout.local[-1]
    which = f"worker {first}" if first == last else f"workers {first}..{last}"
    names = network_lib.interfaces()
    where = f" ({', '.join(names)})" if names else ""
    listed = ", ".join(str(port) for port in ports)
    return (
        f"node {layout.node_rank} of {layout.num_nodes}: {which} of "
        f"{len(layout.addresses)}. Their TensorFlow servers listen on EVERY network "
        f"interface of this machine{where}, ports {listed}, unauthenticated: anyone who "
        "reaches these ports can make the workers run TensorFlow operations. The other "
        "nodes must reach them, so keep the nodes on a private network, or let only "
        f"their addresses through a firewall (see {network_lib.SECURITY_DOC})."
    )


def _wait_for_peers_to_stop(peers, env, output):
    """Before a restart, wait until the other nodes' old workers no longer listen.

    Why: a worker of another node may still wait in a collective for the one that
    failed; only once it has given up (within the collective timeout) and its launcher
    has stopped it can the cluster meet again on the same ports. Waits at most the
    collective timeout plus 30 s; the restarted workers then wait up to
    KERASMGPU_REGISTER_TIMEOUT (120 s) for the others to start.
    """
    timeout = float(env.get(_COLLECTIVE_TIMEOUT_VARIABLE) or 60) + 30
    deadline = time.monotonic() + timeout
    listening = [address for address in peers if _listens(address)]
    if listening:
        output.note(f"waiting up to {timeout:g} s for the other nodes' workers to stop "
                    f"({', '.join(listening)} still listening)")
    while listening and time.monotonic() < deadline:
        time.sleep(_PEER_PROBE_SECONDS)
        listening = [address for address in listening if _listens(address)]
    if listening:
        output.note(f"{', '.join(listening)} still listening after {timeout:g} s; starting "
                    "again all the same")


def _listens(address):
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _add_arguments(parser):
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="number of worker processes of a cluster on this machine alone (at least 1); with "
        "--tuner, tuner workers (default: one per device)",
    )
    parser.add_argument(
        "--workers-per-node", type=int, default=None, metavar="K",
        help="instead of --workers, on each node of several: this node's workers (at least "
        "1), with --hosts and --node-rank, or, without them, inside a Slurm job step "
        "(srun --ntasks-per-node=1)",
    )
    parser.add_argument(
        "--hosts", default=None, metavar="HOST[:PORT],...",
        help="every node of the cluster, in the same order on every node; node r's K workers "
        f"listen on its HOST, ports PORT..PORT+K-1 (PORT default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--node-rank", type=int, default=None, metavar="R",
        help="this node's position in --hosts (0 for the first)",
    )
    parser.add_argument(
        "--max-restarts", type=int, default=None, metavar="M",
        help="when a worker fails, stop every worker and start them all again, up to M times "
        "(default: 0; with --tuner, a tuner worker killed by a signal is started again alone, "
        "up to M times, default 3); training resumes from a keras.callbacks.BackupAndRestore "
        "backup (the script's own, or --backup-dir)",
    )
    parser.add_argument(
        "--backup-dir", default=None, metavar="DIR",
        help="where ParallelModel.fit keeps a keras.callbacks.BackupAndRestore backup for "
        "scripts without one (KERASMGPU_BACKUP_DIR); on several nodes, storage every node reads",
    )
    parser.add_argument(
        "--tuner", action="store_true",
        help="run a KerasTuner script in its distributed mode: a chief holding the oracle "
        "and one tuner worker per device (see kerasmgpu.cluster.tuner)",
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
        help="after a worker fails (and no restart is left), how long the others may run "
        "before they are stopped (SIGTERM, then SIGKILL) (default: %(default)g)",
    )
    parser.add_argument(
        "--network", choices=network_lib.MODES, default=None,
        help="auto: the workers run in a private network with loopback only where Linux "
        "allows it, else on this machine's network with a warning; private: isolation or "
        "an error; host: this machine's network (default: $KERASMGPU_LAUNCH_NETWORK or auto; "
        "several nodes: always host)",
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
        help="run a training script as the workers of a cluster (this machine, or each node)",
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
    if getattr(args, "tuner", False):
        from kerasmgpu.cluster import tuner

        return tuner.run_command(args)
    for flag, value in (("--workers", args.workers),
                        ("--workers-per-node", args.workers_per_node),
                        ("--devices-per-worker", args.devices_per_worker)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a whole number >= 1. Received: {flag} {value}")
    if args.workers is None and args.workers_per_node is None:
        raise UsageError(
            "give --workers N (a cluster on this machine) or --workers-per-node K (with "
            "--hosts and --node-rank, or in a Slurm job step: each node of several)"
        )
    if args.max_restarts is None:
        args.max_restarts = 0
    if args.max_restarts < 0:
        raise UsageError(
            f"--max-restarts must be a whole number >= 0. Received: --max-restarts "
            f"{args.max_restarts}"
        )
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
                      network=getattr(args, "network", None),
                      workers_per_node=args.workers_per_node, hosts=args.hosts,
                      node_rank=args.node_rank, max_restarts=args.max_restarts,
                      backup_dir=args.backup_dir)
    except ValueError as error:
        raise UsageError(_flag_names(str(error))) from None
    except network_lib.PrivateNetworkError as error:
        print(f"kerasmgpu launch: error: {error}", file=sys.stderr, flush=True)
        return 1


def _flag_names(message):
    """A `launch` error in the command line's words (--workers-per-node, not workers_per_node)."""
    for name in ("workers_per_node", "node_rank", "max_restarts", "backup_dir", "hosts",
                 "devices_per_worker", "grace_seconds"):
        message = message.replace(f"{name}=", f"--{name.replace('_', '-')} ")
    return message


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
