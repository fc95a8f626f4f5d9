"""Training across machines: TensorFlow's collectives, described by TF_CONFIG.

Each worker (one process per machine, or several on one machine for testing) runs the
same script. Inside a worker, `ParallelModel` runs its towers on the local devices as on
one machine; across workers:

- With "global" input (the default), every worker iterates the same *global* batches
  (same data, same order: seed the shuffle the same way everywhere, e.g.
  `keras.utils.set_random_seed(0)`), and computes its contiguous share of each batch:
  worker w of W takes rows slice_bounds(B, W)[w]. The global batch is the sum of the
  workers' shares. With "sharded" input (`set_input`, `shard()`), each worker's dataset
  yields its own local batches; global batch b is every worker's batch b, in worker
  order, and the targets and sample weights are gathered (`Cluster.global_batch`).
- The replicas' outputs are gathered from all workers (a collective all-gather), so the
  loss and the metrics are computed on the whole global batch, identically on every
  worker: reported losses and metrics are global, exactly as on one machine.
- Gradients are summed inside the machine first, then all-reduced across workers
  (a collective all-reduce, ring or NCCL), and every worker applies the same update:
  weights stay identical.
- Only the chief (worker 0) writes files through `save`, `save_weights` and callbacks
  such as `ModelCheckpoint`; `keras.callbacks.BackupAndRestore` resumes a restarted
  cluster (its directory must be readable by every worker).

The cluster is joined on `import kerasmgpu` when TF_CONFIG names more than one task, or,
without TF_CONFIG, when the process is a task of a Slurm job step of several tasks
(`srun python train.py`; see `kerasmgpu.cluster.slurm`), because collectives must be set
up before TensorFlow starts; or by calling `connect()` first thing in the script.
"""

import contextlib
import json
import os
import subprocess
import sys

import tensorflow as tf
from keras import tree

from kerasmgpu import _compat, options, slicing
from kerasmgpu import devices as devices_lib
from kerasmgpu.cluster import epochs, network, slurm
from kerasmgpu.cluster.local import SingleMachine

ENV_TIMEOUT = "KERASMGPU_COLLECTIVE_TIMEOUT"
ENV_REGISTER_TIMEOUT = "KERASMGPU_REGISTER_TIMEOUT"
ENV_INPUT = "KERASMGPU_INPUT"
INPUT_MODES = ("global", "sharded")
_GROUP_KEY = 170_000_001  # apart from the keys tf.distribute allocates (small integers)
_BATCH_KEYS = 1 << 16  # instance keys per collective: one per batch size (mod 65536)
_current = None


class ClusterError(RuntimeError):
    """A worker lost the cluster: a peer failed, is unreachable, or timed out."""


def parse_tf_config(value=None):
    """Read and check a TF_CONFIG value (the environment's when `value` is None).

    Returns:
        `(workers, index)`: the list of "host:port" worker addresses and this task's
        index, or None when TF_CONFIG is not set.
    """
    if value is None:
        value = os.environ.get("TF_CONFIG")
    if not value:
        return None
    try:
        config = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: {value!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object. Received: {value!r}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(
            'TF_CONFIG must have a "cluster" entry such as {"worker": ["host1:port", '
            f'"host2:port"]}}. Received: {value!r}'
        )
    unsupported = sorted(set(cluster) - {"worker", "chief"})
    if unsupported:
        raise ValueError(
            f"TF_CONFIG's cluster may list 'chief' and 'worker' tasks; kerasmgpu trains "
            f"with all of them as peers. Received task types {unsupported} in {value!r}"
        )
    workers = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
    if not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise ValueError(
            f'TF_CONFIG\'s cluster must list addresses as "host:port". Received: {value!r}'
        )
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(
            'TF_CONFIG must have a "task" entry such as {"type": "worker", "index": 0}. '
            f"Received: {value!r}"
        )
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG's task type {task_type!r} is not in its cluster "
            f"({sorted(cluster)}). Received: {value!r}"
        )
    if isinstance(index, bool) or not isinstance(index, int) or not (
        0 <= index < len(cluster[task_type])
    ):
        raise ValueError(
            f"TF_CONFIG's task index must be 0..{len(cluster[task_type]) - 1} for "
            f"{len(cluster[task_type])} {task_type!r} task(s). Received: index={index!r}"
        )
    if task_type == "worker":
        index += len(cluster.get("chief", []))
    return workers, index


def current():
    """The cluster this process has joined, or None on a single machine."""
    return _current


def workers():
    """The workers a training step runs on: the joined cluster, or this machine alone.

    Both offer the same interface (see `kerasmgpu.cluster.local.SingleMachine`).
    """
    return _current if _current is not None else SingleMachine()


def connect_from_environment():
    """Join the cluster the environment describes, if it has more than one task.

    TF_CONFIG first; without it, a Slurm job step of several tasks (`srun python
    train.py`). The `kerasmgpu` command itself never joins: it starts workers that do.
    Called on `import kerasmgpu`.

    Returns:
        The `Cluster` joined, or None.
    """
    if _current is not None or _is_the_kerasmgpu_command():
        return _current
    found = cluster_from_environment()
    if found is not None and len(found[0]) > 1:
        connect()
    return _current


def cluster_from_environment():
    """The cluster the environment describes, without joining it.

    TF_CONFIG when it is set (Kubernetes' TFJob writes one, with a `chief` task; so does
    `kerasmgpu launch`); otherwise the tasks of the Slurm job step this process belongs to,
    read with TensorFlow's `SlurmClusterResolver` (`kerasmgpu.cluster.slurm`), unless
    KERASMGPU_SLURM=off.

    Returns:
        `(workers, index, source)`: every task's "host:port" (chief first), this task's
        index and "TF_CONFIG" or "Slurm"; or None when neither describes a cluster.
    """
    parsed = parse_tf_config()
    if parsed is not None:
        return parsed[0], parsed[1], "TF_CONFIG"
    if slurm.step_tasks() > 1:
        addresses, index = slurm.task_cluster()
        return addresses, index, "Slurm"
    return None


def _is_the_kerasmgpu_command(argv=None):
    """Whether this process is the `kerasmgpu` command (console script or `python -m`).

    Its `launch` runs inside the cluster's environment (a Slurm step, a TFJob pod) and
    starts the workers itself: joining there would take a worker's port.
    """
    args = list(sys.orig_argv if argv is None else argv)[1:]
    while args and args[0].startswith("-") and not args[0].startswith(("-m", "-c")):
        args = args[2:] if args[0] in ("-W", "-X", "-Q") else args[1:]
    if not args or args[0].startswith("-c"):
        return False
    if args[0].startswith("-m"):
        module = args[0][2:] or (args[1] if len(args) > 1 else "")
        return module in ("kerasmgpu", "kerasmgpu.__main__", "kerasmgpu.cluster.launch") or (
            module.startswith("kerasmgpu.tools"))
    return os.path.basename(args[0]) in ("kerasmgpu", "kerasmgpu.exe")


def connect(timeout_seconds=None, register_timeout_seconds=None):
    """Join the cluster described by TF_CONFIG or by a Slurm job step (idempotent).

    Must run before TensorFlow initialises (before any tensor, layer or model is made);
    `import kerasmgpu` calls it when TF_CONFIG names several tasks, or a Slurm step has
    several (see `cluster_from_environment`). Joining from Slurm gives each task of a
    node its share of the node's GPUs when they all see all of them
    (`kerasmgpu.cluster.slurm.task_gpus`), and sets KERASMGPU_SLURM=off for the
    processes this one starts: they are not tasks of the step.

    Args:
        timeout_seconds: how long a collective waits for its peers before this worker
            gives up (default 60, or KERASMGPU_COLLECTIVE_TIMEOUT).
        register_timeout_seconds: how long to wait for every worker to start (default
            120, or KERASMGPU_REGISTER_TIMEOUT).

    Returns:
        The `Cluster`, in the input mode KERASMGPU_INPUT names (default "global"; see
        `set_input`).
    """
    global _current
    if _current is not None:
        return _current
    found = cluster_from_environment()
    if found is None:
        raise ValueError(
            "connect() needs TF_CONFIG, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}, or a Slurm job step of several '
            "tasks (srun). Neither is there."
        )
    workers, index, source = found
    if source == "Slurm":
        _share_slurm_gpus(workers, index)
        os.environ[slurm.ENV_SLURM] = "off"  # children of this task are not tasks
    timeout = _seconds(timeout_seconds, "timeout_seconds", ENV_TIMEOUT, 60.0)
    register = _seconds(register_timeout_seconds, "register_timeout_seconds",
                        ENV_REGISTER_TIMEOUT, 120.0)
    mode = check_input_mode(os.environ.get(ENV_INPUT, "global"))
    _current = Cluster(workers, index, timeout, register, input_mode=mode)
    return _current


def _share_slurm_gpus(workers, index):
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return  # Slurm assigned no GPUs (it lists those it assigns)
    visible = [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    own = slurm.task_gpus(visible, workers, index)
    if own is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(own)


def _seconds(value, name, variable, default):
    """A timeout from the argument, else its environment variable, else `default`."""
    if value is not None:
        return options.finite_number(value, name, above=0)
    text = os.environ.get(variable)
    if text is None or not text.strip():
        return default
    try:
        return options.finite_number(float(text), variable, above=0)
    except ValueError:
        raise ValueError(
            f"{variable} must be a finite number of seconds > 0. Received: {variable}={text!r}"
        ) from None


def set_input(mode):
    """Say what each worker's dataset yields: "global" or "sharded" batches.

    "global" (the default): every worker iterates the same global batches (same data,
    same order) and keeps its share of each; simple, but every worker reads everything.
    "sharded": each worker's dataset yields only its own *local* batches (read through
    `shard()`, which selects this mode itself, or sharded by hand as with
    `dataset.shard(num_workers, worker_index)`); the step gathers the targets, sample
    weights and outputs of all workers, so the loss, the metrics and the update are
    those of the global batch, equal on every worker. Global batch b is the
    concatenation of every worker's local batch b, in worker order.

    Call it before the first `fit`/`evaluate`/`predict` (steps already traced keep
    their mode). On one machine it changes nothing: the one worker's batches are global.
    The environment variable KERASMGPU_INPUT sets the mode a cluster starts in.

    Args:
        mode: "global" or "sharded".

    Example:

    ```python
    kerasmgpu.cluster.set_input("sharded")
    parallel.fit(my_own_part_of_the_data.batch(64), epochs=10)  # global batch 64 x W
    ```
    """
    mode = check_input_mode(mode)
    if _current is not None:
        _current.input_mode = mode
    return mode


def check_input_mode(mode):
    """The input mode `mode` names ("global" or "sharded"), or a ValueError."""
    if mode not in INPUT_MODES:
        raise ValueError(
            f"The input mode must be one of {INPUT_MODES} (from connect(input=...) or "
            f"{ENV_INPUT}). Received: input={mode!r}"
        )
    return mode


class Cluster:
    """The workers of a training cluster and the collectives between them."""

    def __init__(self, workers, index, timeout_seconds, register_timeout_seconds,
                 input_mode="global"):
        self.workers = list(workers)
        self.worker_index = index
        self.num_workers = len(workers)
        self.timeout_seconds = timeout_seconds
        self.input_mode = check_input_mode(input_mode)
        self._step_sizes = None  # (global size, every worker's rows) of the step traced
        if _compat.tensorflow_started():
            raise RuntimeError(
                "kerasmgpu joins a TF_CONFIG cluster before TensorFlow initialises, but it "
                "already has. Import kerasmgpu (or call kerasmgpu.cluster.connect()) at the "
                "top of the script, before creating any tensor, layer or model."
            )
        # Our own coordination service settings: a peer that never registers or stops
        # sending heartbeats becomes an error within bounded time instead of a hang.
        _compat.configure_coordination(
            self.num_workers, register_timeout_seconds, max(10.0, timeout_seconds / 2)
        )
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": self.workers}),
            task_type="worker",
            task_id=index,
            rpc_layer="grpc",
        )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING,
            timeout_seconds=timeout_seconds,
        )
        # TensorFlow may wait for ever for a worker that never starts: a watchdog process
        # ends this one with a clear message instead (see watchdog.py).
        watchdog = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "watchdog.py"),
             str(os.getpid()), str(register_timeout_seconds), str(index), *self.workers],
            stdin=subprocess.PIPE,
        )
        try:
            # The strategy starts this worker's server and enables TensorFlow's
            # collective ops; kerasmgpu then issues its collectives itself.
            self._strategy = tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=resolver, communication_options=options
            )
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as error:
            raise ClusterError(
                f"Worker {index} could not reach all {self.num_workers} workers "
                f"{self.workers}: {error.message.splitlines()[0]}"
            ) from None
        finally:
            watchdog.stdin.close()
            watchdog.wait()
        # Once per process: where this worker's unauthenticated server can be reached.
        network.announce_server(self.workers[index], index, self.num_workers)
        self.device = f"/job:worker/replica:0/task:{index}/device:CPU:0"
        devices_lib.set_local_task("worker", index)
        self._instance_key = 0

    @property
    def is_chief(self):
        return self.worker_index == 0

    def __repr__(self):
        return (
            f"Cluster(worker {self.worker_index} of {self.num_workers}, "
            f"workers={self.workers}, input={self.input_mode!r})"
        )

    @contextlib.contextmanager
    def translate_errors(self, what):
        """Turn a collective failing (a peer died or hung) into a ClusterError."""
        try:
            yield
        except (
            tf.errors.UnavailableError,
            tf.errors.DeadlineExceededError,
            tf.errors.CancelledError,
            tf.errors.AbortedError,
            tf.errors.InternalError,
        ) as error:
            first_line = (error.message or str(error)).strip().splitlines()[0][:300]
            raise ClusterError(
                f"Worker {self.worker_index} of {self.num_workers} stopped during {what}(): "
                "another worker failed or stopped answering "
                f"(TensorFlow: {type(error).__name__}: {first_line}). Restart all workers; "
                "with keras.callbacks.BackupAndRestore, training resumes from the last backup."
            ) from None

    # ------------------------------------------------------------ batch rows
    @property
    def sharded(self):
        return self.input_mode == "sharded"

    def _bounds(self, global_size):
        """(start, stop) of every worker's rows of a global batch."""
        if self.sharded:
            size, rows = self._step_sizes
            if size is not global_size:
                raise RuntimeError("kerasmgpu: a sharded step must start with global_batch()")
            stops = tf.cumsum(rows)
            return [(stops[w] - rows[w], stops[w]) for w in range(self.num_workers)]
        return slicing.slice_bounds(tf.cast(global_size, tf.int32), self.num_workers)

    def global_batch(self, x, y, sample_weight, needs_x=False):
        """What a step reads of a batch: this worker's x rows and the global batch.

        In "global" input mode the batch is global: this worker computes its contiguous
        share of x (worker w of W takes rows slice_bounds(B, W)[w]). In "sharded" mode
        the batch is this worker's own: the rows every worker has are exchanged first (one
        small all-gather), then the targets and sample weights of all workers (and x, when
        `needs_x`: a `compute_loss` override may read it) are gathered in worker order.

        Returns:
            `(x_local, x, y, sample_weight, global_size)`: the rows this worker's replicas
            run, and the global batch's x (or this worker's rows, when not `needs_x` in
            sharded mode: the compiled loss and metrics never read x), y, sample weights
            and size.
        """
        if not self.sharded:
            global_size = slicing.batch_size_of(x)
            return self.local_rows(x, global_size), x, y, sample_weight, global_size
        local_size = tf.reshape(slicing.batch_size_of(x), [1])
        rows = self._all_gather(local_size, key_extra=0)
        global_size = tf.reduce_sum(rows)
        self._step_sizes = (global_size, rows)
        def gather(structure):
            return tree.map_structure(
                lambda t: None if t is None else self._gather(t, global_size), structure
            )
        x_global = gather(x) if needs_x else x
        return x, x_global, gather(y), gather(sample_weight), global_size

    def local_rows(self, structure, global_size=None):
        """This worker's contiguous share of every tensor of a global batch."""
        if self.sharded:
            return structure  # the batch is this worker's already
        if global_size is None:
            global_size = slicing.batch_size_of(structure)
        start, stop = self._bounds(global_size)[self.worker_index]
        return tree.map_structure(lambda t: None if t is None else t[start:stop], structure)

    def local_rows_of_gathered(self, tensor, global_size):
        """This worker's rows of a tensor shaped like a gathered global batch."""
        start, stop = self._bounds(global_size)[self.worker_index]
        return tensor[start:stop]

    def agree_on_input(self, call, args, kwargs):
        """`fit`/`evaluate`/`predict` arguments whose datasets run as many steps everywhere.

        In sharded mode every worker must run the same number of steps per epoch, or the
        workers with fewer batches would leave the others waiting in a collective. The
        workers agree on the longest epoch (one all-gather) and the others append empty
        batches, which add no rows to the global batch: no data is dropped, nothing
        hangs. See `kerasmgpu.cluster.epochs.agree_on_steps`.
        """
        if not self.sharded:
            return args, kwargs
        return epochs.agree_on_call(self, call, args, kwargs)

    # ------------------------------------------------------------ collectives
    def _next_key(self):
        # Every worker traces the same functions in the same order, so the n-th
        # collective of each worker gets the same key.
        self._instance_key += 1
        return self._instance_key

    def same_keys_per_branch(self, branches):
        """Wrap the branches of a switch so that each issues the same collective keys.

        Workers may take different branches in one step (their shares of a batch can
        differ by one sample, and so their replica counts); a collective is matched
        across workers by its key, so the n-th collective of every branch shares one.
        """
        start = self._instance_key
        ends = []

        def wrap(branch):
            def run():
                self._instance_key = start
                result = branch()
                ends.append(self._instance_key)
                self._instance_key = max(ends)
                return result

            return run

        return [wrap(branch) for branch in branches]

    def _all_gather(self, tensor, key_extra):
        """Every worker's `tensor` (all of one shape), concatenated in worker order."""
        with tf.device(self.device):
            return tf.raw_ops.CollectiveGatherV2(
                input=tensor,
                group_size=self.num_workers,
                group_key=_GROUP_KEY,
                # TensorFlow fixes a collective's shape on first use of its key, and the
                # shape follows the batch size (the last batch of an epoch is shorter):
                # each padded size gets its own key.
                instance_key=self._next_key() * _BATCH_KEYS + key_extra % _BATCH_KEYS,
                ordering_token=[],
                communication_hint="ring",
                timeout_seconds=self.timeout_seconds,
            )

    def _gather(self, tensor, global_size, bounds=None):
        """Concatenate every worker's rows, in worker order (their counts may differ)."""
        bounds = self._bounds(global_size) if bounds is None else bounds
        sizes = tf.stack([stop - start for start, stop in bounds])
        longest = tf.reduce_max(sizes)
        padding = [[0, longest - tf.shape(tensor)[0]]] + [[0, 0]] * (len(tensor.shape) - 1)
        gathered = self._all_gather(tf.pad(tensor, padding), key_extra=longest)
        keep = tf.reshape(tf.sequence_mask(sizes, longest), [-1])
        return tf.boolean_mask(gathered, keep)

    def call_rows(self, size):
        """(start, stop) of this worker's rows of a model call's batch of `size` rows.

        A custom step's sliced calls split every call evenly over the workers (worker w
        of W: slice_bounds(size, W)[w]), whatever the input mode: a call's batch need
        not be the step's (a GAN's discriminator sees real and generated images).
        """
        return slicing.slice_bounds(tf.cast(size, tf.int32), self.num_workers)[
            self.worker_index]

    def gather_call(self, tensor, size):
        """Every worker's `call_rows` of a call's output, concatenated in worker order."""
        bounds = slicing.slice_bounds(tf.cast(size, tf.int32), self.num_workers)
        return self._gather(tensor, size, bounds=bounds)

    def all_gather_counts(self, count):
        """Every worker's integer `count`, in worker order (eagerly, outside a step)."""
        with self.translate_errors("agree_on_input"):
            gathered = self._all_gather(tf.constant([count], tf.int64), key_extra=0)
        return [int(c) for c in gathered.numpy()]

    def gather_structure(self, structure, global_size):
        """Gather every leaf (with its Keras logits and mask) from all workers."""
        def join(parts):
            return self._gather(parts[0], global_size)

        return tree.map_structure(lambda leaf: slicing.join_leaf([leaf], join), structure)

    def all_reduce_sum(self, tensors):
        """Sum each tensor over the workers (None stays None), one collective per dtype."""
        dense = [
            None if t is None else tf.convert_to_tensor(t) for t in tensors
        ]
        result = list(dense)
        by_dtype = {}
        for position, tensor in enumerate(dense):
            if tensor is not None:
                by_dtype.setdefault(tensor.dtype, []).append(position)
        for positions in by_dtype.values():
            flat = tf.concat([tf.reshape(dense[p], [-1]) for p in positions], axis=0)
            with tf.device(self.device):
                total = tf.raw_ops.CollectiveReduceV2(
                    input=flat,
                    group_size=self.num_workers,
                    group_key=_GROUP_KEY,
                    instance_key=self._next_key() * _BATCH_KEYS,
                    ordering_token=[],
                    merge_op="Add",
                    final_op="Id",
                    communication_hint="ring",
                    timeout_seconds=self.timeout_seconds,
                )
            sizes = [tf.size(dense[p]) for p in positions]
            for p, piece in zip(positions, tf.split(total, sizes)):
                result[p] = tf.reshape(piece, tf.shape(dense[p]))
        return result

    def total_over_workers(self, local):
        """A scalar summed over workers; its gradient flows to this worker's terms only."""
        total = self.all_reduce_sum([local])[0]
        return local + tf.stop_gradient(total - local)

    def combine_state(self, variables, values):
        """Sum the workers' (already batch-weighted) float state updates."""
        floats = [
            v if (v is not None and var.dtype.startswith(("float", "bfloat"))) else None
            for var, v in zip(variables, values)
        ]
        summed = self.all_reduce_sum(floats)
        return [s if s is not None else v for s, v in zip(summed, values)]
