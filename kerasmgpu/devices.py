"""Finding the devices replicas run on, and simulating them on a CPU-only machine.

On a machine with GPUs, `gpus=` means GPUs. On a machine without any, the CPU can be
split into several *logical* CPU devices (`simulate_devices`); `gpus=k` then maps onto
those, so the multi-device code paths (slicing, per-device towers, merging) run and can
be tested anywhere.
"""

import numbers
import os
import warnings

import tensorflow as tf

from kerasmgpu import _compat, options
from kerasmgpu.options import ENV_CORES_PER_DEVICE, ENV_SIMULATED_DEVICES

# On a cluster TensorFlow also lists the other workers' devices; replicas use this
# worker's own, "/job:worker/replica:0/task:<index>".
_local_task = None


def set_local_task(job, index):
    """Restrict the devices replicas use to one task of a cluster (see kerasmgpu.cluster)."""
    global _local_task
    _local_task = (job, index)


def _is_local(name):
    if _local_task is None:
        return True
    spec = tf.DeviceSpec.from_string(name)
    return (spec.job, spec.task) == _local_task


def _accelerator_type():
    """"GPU" when the machine has GPUs, else "CPU"."""
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def simulate_devices(n, cores_per_device=None):
    """Split the CPU into `n` logical devices when the machine has no GPU.

    Call this first thing, before TensorFlow creates any tensor or model: TensorFlow
    fixes its devices and thread pools on first use. Setting the environment variables
    `KERASMGPU_SIMULATED_DEVICES=n` (and `KERASMGPU_CORES_PER_DEVICE=k`) before starting
    Python does the same on `import kerasmgpu`.

    By default the logical devices share all the CPU's cores: they show what the
    multi-device machinery costs, not a speed-up. With `cores_per_device=k` each device
    stands for a GPU with k cores of its own: every op runs on k threads
    (TensorFlow's intra-op threads = k) and the n devices' ops run side by side (inter-op
    threads = n), so n devices can do up to n times the work of one device of k cores,
    on a machine with n * k free cores.

    Args:
        n: number of logical CPU devices, at least 1.
        cores_per_device: cores each device computes with (`None`: share all cores).

    Returns:
        The names of the devices replicas can use: the `n` logical CPUs, or the GPUs
        when the machine has GPUs (then nothing is simulated).

    Example:

    ```python
    import kerasmgpu
    kerasmgpu.simulate_devices(4)
    parallel = kerasmgpu.multi_gpu_model(model, gpus=4)
    ```
    """
    if cores_per_device is not None:
        cores_per_device = _check_cores(cores_per_device)
    _configure_logical_cpus(n)
    if cores_per_device is not None:
        _configure_threads(n, cores_per_device)
    return visible_devices()


def _check_cores(k):
    return options.whole_number(k, "cores_per_device", minimum=1)


def _configure_threads(n, cores_per_device):
    """k threads per op, n ops at once: n devices of k cores (before TensorFlow initialises)."""
    k = cores_per_device
    _check_cores(k)
    if _accelerator_type() == "GPU":
        return
    # Each logical CPU gets an intra-op pool of its own (TensorFlow's LocalDevice reads this
    # once, when it creates the devices); by default all CPU devices share one pool, so one
    # device's ops could take the threads meant for another's.
    os.environ.setdefault("TF_OVERRIDE_GLOBAL_THREADPOOL", "1")
    threading = tf.config.threading
    if (threading.get_intra_op_parallelism_threads(),
            threading.get_inter_op_parallelism_threads()) == (k, n):
        return
    try:
        threading.set_intra_op_parallelism_threads(k)
        threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:
        raise RuntimeError(
            f"simulate_devices({n}, cores_per_device={k}) was called after TensorFlow "
            "initialised its thread pools. Call it before creating any tensor, layer or model, "
            f"or set {ENV_SIMULATED_DEVICES}={n} and {ENV_CORES_PER_DEVICE}={k} in the "
            "environment before starting Python."
        ) from None


def _configure_logical_cpus(n):
    """Ask TensorFlow for n logical CPUs (without initialising it) on a machine without GPUs."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"simulate_devices expects a whole number n >= 1. Received: n={n!r}")
    n = int(n)
    if _accelerator_type() == "GPU":
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    config = [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    try:
        tf.config.set_logical_device_configuration(cpu, config)
    except RuntimeError:
        # TensorFlow already fixed its devices. Asking again for what it already has is fine.
        current = tf.config.list_logical_devices("CPU")
        if len(current) != n:
            raise RuntimeError(
                f"simulate_devices({n}) was called after TensorFlow initialised its devices "
                f"(it now has {len(current)} logical CPU device(s)). Call "
                "kerasmgpu.simulate_devices() before creating any tensor, layer or model, or "
                f"set {ENV_SIMULATED_DEVICES}={n} in the environment before starting Python."
            ) from None


def simulate_devices_from_env():
    """Apply `KERASMGPU_SIMULATED_DEVICES` (and `KERASMGPU_CORES_PER_DEVICE`) if set.

    Called on `import kerasmgpu`.

    Returns:
        Whether the variable was set.
    """
    n, cores = options.simulated_devices_environment()
    if n is None:
        return False
    try:
        # Configure only: TensorFlow must stay uninitialised here so that a cluster
        # (TF_CONFIG) can still be joined.
        _configure_logical_cpus(n)
        if cores is not None:
            _configure_threads(n, cores)
    except RuntimeError as error:
        warnings.warn(str(error), RuntimeWarning, stacklevel=3)
    return True


def visible_devices():
    """Names of the devices replicas can run on: the GPUs, or else the logical CPUs."""
    return [
        device.name
        for device in tf.config.list_logical_devices(_accelerator_type())
        if _is_local(device.name)
    ]


def host_device():
    """The CPU device that merges outputs when `cpu_merge=True`."""
    return next(d.name for d in tf.config.list_logical_devices("CPU") if _is_local(d.name))


def canonical_device(name):
    """A device name in full form, e.g. "/job:localhost/replica:0/task:0/device:CPU:1"."""
    spec = tf.DeviceSpec.from_string(name)
    full = tf.DeviceSpec(job="localhost", replica=0, task=0)
    return full.make_merged_spec(spec).to_string()


def _same_device(a, b):
    spec_a, spec_b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return (spec_a.device_type or "").upper() == (spec_b.device_type or "").upper() and (
        spec_a.device_index or 0
    ) == (spec_b.device_index or 0)


def resolve_devices(gpus, minimum=2, argument="gpus"):
    """Turn a `gpus=` argument into a list of device names.

    Args:
        gpus: `None` (all visible devices), an int (that many devices, from the first),
            a list of device ids (ints) or a list of device names ("/gpu:1", "CPU:0", ...).
        minimum: the smallest number of devices accepted.
        argument: the argument's name in error messages (for callers whose argument is
            not called `gpus`, such as `zoo.evolve(devices=...)`).

    Returns:
        A list of device names, in replica order.

    Example:

    ```python
    kerasmgpu.resolve_devices([0, "CPU:2"], minimum=1)  # ['/device:CPU:0', '/device:CPU:2']
    ```
    """
    visible = visible_devices()
    kind = _accelerator_type()
    shown = ", ".join(visible) or "none"
    if gpus is None:
        if len(visible) < minimum:
            raise ValueError(
                f"{argument}=None uses all visible devices, but only {len(visible)} are "
                f"visible ({shown}); at least {minimum} are needed. On a machine without "
                "GPUs, call kerasmgpu.simulate_devices(n) first."
            )
        return list(visible)
    if not _is_int(gpus) and not isinstance(gpus, (list, tuple)):
        raise ValueError(
            f"{argument} must be an int >= {minimum}, a list of device ids or device names, "
            f"or None. Received: {argument}={gpus!r}"
        )
    if _is_int(gpus):
        if gpus < minimum:
            raise ValueError(
                f"{argument} must be at least {minimum}, or a list of at least {minimum} "
                f"device ids. Received: {argument}={gpus}"
            )
        if gpus > len(visible):
            raise ValueError(
                f"{argument}={gpus} asks for more devices than are visible: {len(visible)} "
                f"({shown}). On a machine without GPUs, call kerasmgpu.simulate_devices({gpus}) "
                f"(or set {ENV_SIMULATED_DEVICES}={gpus}) before building any model."
            )
        return list(visible[:gpus])
    listed = list(gpus)
    if len(listed) < minimum:
        raise ValueError(
            f"{argument} must list at least {minimum} devices. Received: {argument}={listed}"
        )
    devices = []
    for entry in listed:
        if _is_int(entry):
            name = f"/device:{kind}:{int(entry)}"
        elif isinstance(entry, str):
            name = _local_device_name(entry, argument, listed, shown)
        else:
            raise ValueError(
                "Each entry of {0} must be a device id (int) or a device name (str). "
                "Received: {1!r} in {0}={2}".format(argument, entry, listed)
            )
        match = next((v for v in visible if _same_device(v, name)), None)
        if match is None:
            cpus = [d.name for d in tf.config.list_logical_devices("CPU") if _is_local(d.name)]
            cpu_match = next((cpu for cpu in cpus if _same_device(cpu, name)), None)
            if cpu_match is None:
                raise ValueError(
                    f"Device {entry!r} in {argument}={listed} is not visible. "
                    f"Visible devices: {shown}."
                )
            match = cpu_match
        if match in devices:
            raise ValueError(f"Device {entry!r} appears twice in {argument}={listed}.")
        devices.append(match)
    return devices


def _local_device_name(entry, argument, listed, shown):
    """A device name the user wrote, checked: well formed, and a device of this process.

    Why: TensorFlow's parser error ("Unknown attribute: 'banana'") does not say which
    argument was wrong or which devices exist, and a name on another job or task
    ("/job:ghost/device:CPU:0") would otherwise match the local CPU:0 by type and index.
    """
    name = entry if entry.startswith("/") else "/device:" + entry
    try:
        spec = tf.DeviceSpec.from_string(name)
    except ValueError:
        spec = None
    if spec is None or not spec.device_type:
        raise ValueError(
            f"Device {entry!r} in {argument}={listed} is not a device name such as "
            f"'/gpu:1' or 'CPU:0'. Visible devices: {shown}. Received: {argument}={listed}"
        )
    own_job, own_task = _local_task or ("localhost", 0)
    if (spec.job not in (None, own_job) or spec.task not in (None, own_task)
            or spec.replica not in (None, 0)):
        raise ValueError(
            f"Device {entry!r} in {argument}={listed} is not a device of this process "
            f"(job {own_job!r}, task {own_task}): replicas run on this process's devices; "
            f"other workers of a cluster train their own. Visible devices: {shown}. "
            f"Received: {argument}={listed}"
        )
    return name


def _is_int(value):
    """A whole number (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def move_variables(variables, device):
    """Move each Keras variable's storage to `device`, in place (values and objects kept).

    The model that owns the variables keeps training the same variable objects, so the
    user's model is the one that trains (not a copy).
    """
    for variable in variables:
        current = variable.value
        if canonical_device(current.device) == canonical_device(device):
            continue
        with tf.device(device):
            moved = tf.Variable(
                current.read_value(),
                trainable=current.trainable,
                name=current.name.split(":")[0],
            )
        _compat.move_variable_storage(variable, moved)
