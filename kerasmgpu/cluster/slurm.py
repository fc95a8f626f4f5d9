"""The cluster of a Slurm job step, read with TensorFlow's own `SlurmClusterResolver`.

Inside an allocation, `srun` starts every task of a step with Slurm's description of it in
the environment: `SLURM_PROCID` (the task's rank), `SLURM_STEP_NUM_TASKS`,
`SLURM_STEP_NODELIST` (compressed host ranges such as `node[01-02]`),
`SLURM_STEP_TASKS_PER_NODE` (such as `2(x2)`), `SLURM_LOCALID` (the task's rank on its
node) and `SLURMD_NODENAME` (the node it runs on). TensorFlow's
`tf.distribute.cluster_resolver.SlurmClusterResolver` turns them into a cluster: the
nodes in sorted order, tasks in blocks of consecutive ranks per node, the tasks of one
node on consecutive ports from a port base. kerasmgpu uses it as it is, in two ways:

- `srun python train.py` (one task per node or per GPU): `import kerasmgpu` joins the
  step's cluster as it joins a TF_CONFIG one (`task_cluster`).
- `srun --ntasks-per-node=1 kerasmgpu launch --workers-per-node K -- python train.py`:
  one launcher per node, which starts K workers there (`node_hosts`).

Why join on `import kerasmgpu` when a step has several tasks, rather than asking for an
opt-in: `srun -n 8 python train.py` is how a Slurm user starts distributed training, and
kerasmgpu already joins the cluster TF_CONFIG describes on import; a step of several
tasks that should each train alone is the exception, and says so with
`KERASMGPU_SLURM=off`. A TF_CONFIG in the environment always wins (`kerasmgpu launch`
gives each of its workers one), and the `kerasmgpu` command itself never joins.

The port base is `KERASMGPU_PORT_BASE`, else derived from `SLURM_JOB_ID`
(10000 + 10 x (job id mod 2000)): jobs sharing a node get different ports, as
PyTorch Lightning does for its Slurm jobs.

No TensorFlow at this module's top level: the launcher imports it and must start fast;
TensorFlow is loaded only when a resolver is built.
"""

import os

ENV_SLURM = "KERASMGPU_SLURM"
ENV_PORT_BASE = "KERASMGPU_PORT_BASE"
_STEP_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                   "SLURM_STEP_TASKS_PER_NODE")
_PORT_BASE_START = 10000
_PORTS_PER_JOB = 10
_JOB_SLOTS = 2000  # 10000 .. 29999: below Linux's ephemeral ports (32768 and up)


def in_step(env=None):
    """Whether this process is a task of a Slurm job step (and joining it is not turned off).

    Args:
        env: the environment (default `os.environ`).

    Returns:
        True when `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_STEP_NODELIST` and
        `SLURM_STEP_TASKS_PER_NODE` are set and `KERASMGPU_SLURM` is not "off" (or "0").
    """
    env = os.environ if env is None else env
    if env.get(ENV_SLURM, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return all(env.get(name) for name in _STEP_VARIABLES)


def step_tasks(env=None):
    """The number of tasks of the Slurm step (`SLURM_STEP_NUM_TASKS`), 0 outside one."""
    env = os.environ if env is None else env
    if not in_step(env):
        return 0
    value = env["SLURM_STEP_NUM_TASKS"]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"SLURM_STEP_NUM_TASKS must be a whole number. Received: {value!r}") from None


def port_base(env=None):
    """The first port of every node's tasks: `KERASMGPU_PORT_BASE`, else from the job id.

    Returns:
        An int.

    Raises:
        ValueError: `KERASMGPU_PORT_BASE` is not a port number.
    """
    env = os.environ if env is None else env
    value = env.get(ENV_PORT_BASE)
    if value:
        try:
            port = int(value)
        except ValueError:
            port = -1
        if not 1 <= port <= 65535:
            raise ValueError(f"{ENV_PORT_BASE} must be a port number (1-65535). "
                             f"Received: {ENV_PORT_BASE}={value!r}")
        return port
    try:
        job = int(env.get("SLURM_JOB_ID", "0"))
    except ValueError:
        job = 0
    return _PORT_BASE_START + _PORTS_PER_JOB * (job % _JOB_SLOTS)


def resolver(tasks_per_node=None):
    """TensorFlow's `SlurmClusterResolver` for this step, with `port_base()`.

    It reads `os.environ` itself. GPUs are left alone (`auto_set_gpu=False`): kerasmgpu
    shares them out itself (`task_gpus`, the launcher), because the resolver numbers GPUs
    0..n-1 whatever `CUDA_VISIBLE_DEVICES` lists, and on a machine without GPUs it calls
    `nvidia-smi` and fails. `gpus_per_node` and `gpus_per_task` are only given so that
    its GPU arithmetic, which is not used, holds one "GPU" per task.

    Args:
        tasks_per_node: as the resolver's argument (None: from `SLURM_STEP_TASKS_PER_NODE`).

    Returns:
        A `tf.distribute.cluster_resolver.SlurmClusterResolver`.
    """
    import tensorflow as tf

    tasks = step_tasks()
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base(), gpus_per_node=max(1, tasks), gpus_per_task=1,
        tasks_per_node=tasks_per_node, auto_set_gpu=False,
    )


def task_cluster():
    """The cluster of the step's tasks, and this task's place in it.

    Returns:
        `(addresses, index)`: every task's "host:port" in rank order, and this task's
        rank (`SLURM_PROCID`).

    Raises:
        ValueError: the resolver puts this task on another node than the one it runs on
            (`SLURMD_NODENAME`), which happens when tasks are not placed in blocks of
            consecutive ranks (`--distribution=cyclic`) or when node names sort
            differently as text than as Slurm sorts them (`node9` after `node10`).
    """
    found = resolver()
    addresses = list(found.cluster_spec().as_dict()["worker"])
    index = found.task_id
    _check_placement(addresses, index)
    return addresses, index


def node_hosts():
    """The nodes of a step that runs one `kerasmgpu launch` per node, and this node's rank.

    Returns:
        `(hosts, node_rank)`: the step's node names in the resolver's order and the
        position of this task's node among them.

    Raises:
        ValueError: a node runs more than one task of the step (the launcher starts the
            workers of its node itself: `srun --ntasks-per-node=1`), or the placement
            check of `task_cluster` fails.
    """
    found = resolver()
    addresses = list(found.cluster_spec().as_dict()["worker"])
    base = port_base()
    crowded = sorted({address.rsplit(":", 1)[0] for address in addresses
                      if int(address.rsplit(":", 1)[1]) != base})
    if crowded:
        raise ValueError(
            "kerasmgpu launch in a Slurm step starts the workers of its node itself: run "
            "one launcher per node (srun --ntasks-per-node=1 kerasmgpu launch "
            "--workers-per-node K ...). Received: SLURM_STEP_TASKS_PER_NODE="
            f"{os.environ.get('SLURM_STEP_TASKS_PER_NODE')!r} (several tasks on {crowded})"
        )
    _check_placement(addresses, found.task_id)
    return [address.rsplit(":", 1)[0] for address in addresses], found.task_id


def _check_placement(addresses, index):
    node = os.environ.get("SLURMD_NODENAME")
    host = addresses[index].rsplit(":", 1)[0]
    if node and node != host:
        raise ValueError(
            f"SlurmClusterResolver places task {index} on {host!r}, but it runs on "
            f"{node!r} (SLURMD_NODENAME). The resolver assumes tasks placed in blocks of "
            "consecutive ranks per node (srun's default, not --distribution=cyclic) and "
            "node names that sort as text as Slurm sorts them (zero-padded numbers). "
            f"Received: SLURM_STEP_NODELIST={os.environ.get('SLURM_STEP_NODELIST')!r}, "
            f"SLURM_PROCID={os.environ.get('SLURM_PROCID')!r}"
        )


def task_gpus(visible, addresses, index, env=None):
    """The GPUs task `index` trains on when the tasks of one node share its GPUs.

    When each task sees all of its node's GPUs (`srun --gres=gpu:4 --ntasks-per-node=4`),
    task l of the node (`SLURM_LOCALID`) gets its own contiguous share, as TensorFlow's
    resolver does with `auto_set_gpu` (but taken from the ids `CUDA_VISIBLE_DEVICES`
    lists). When Slurm binds GPUs to tasks itself (`--gpus-per-task`, `--gpu-bind`), or a
    node runs one task, the visible GPUs are the task's.

    Args:
        visible: the GPU ids this task sees (`launch.visible_gpu_ids()`).
        addresses: every task's "host:port" (`task_cluster()`).
        index: this task's rank.
        env: the environment (default `os.environ`).

    Returns:
        The GPU ids to keep visible (a list of strings), or None to leave
        `CUDA_VISIBLE_DEVICES` as it is.

    Raises:
        ValueError: the node's tasks see fewer GPUs than there are tasks.
    """
    env = os.environ if env is None else env
    host = addresses[index].rsplit(":", 1)[0]
    tasks_here = sum(1 for address in addresses if address.rsplit(":", 1)[0] == host)
    bound = env.get("SLURM_GPUS_PER_TASK") or env.get("SLURM_GPU_BIND")
    if not visible or tasks_here == 1 or bound:
        return None
    local = int(env.get("SLURM_LOCALID", "0"))
    if len(visible) < tasks_here:
        raise ValueError(
            f"{tasks_here} tasks of this Slurm step run on {host}, which shows each of them "
            f"{len(visible)} GPU(s) ({','.join(visible)}): give each task a GPU at least "
            "(e.g. srun --gpus-per-task=1). Received: CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES')!r}"
        )
    share = len(visible) // tasks_here
    return visible[local * share:(local + 1) * share]
