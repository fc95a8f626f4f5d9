"""Checking every option a user gives kerasmgpu, at the boundary, with one kind of error.

Why: a wrong value that is silently accepted trains something the user did not ask for
(`sync_batchnorm="False"` is truthy and turned synchronized BatchNorm *on*). Every public
function and command checks its options here, before any work, and the error names the
parameter (or environment variable, or flag) the user wrote, the value received and what
is allowed. The module imports nothing heavy (no TensorFlow), so the command line can use
it before deciding whether to start TensorFlow at all.

- `boolean`: on/off options take `True`/`False` only (numpy's bools too), never strings
  or None.
- `whole_number`: ints (numpy's integers too), never bools or floats such as 2.5.
- `byte_size`: a whole number of bytes; a float that is whole (`25e6`, as the docs
  write sizes) is accepted.
- `one_of`: one of a fixed set of values.
- `finite_number`: a real number, not NaN or infinite, optionally bounded.
- `environment_whole_number`: the same for an environment variable, naming it.
- `only_with`: an option that does nothing in the layout chosen is an error.

`UsageError` is the command line's error (reported as `kerasmgpu <command>: error: ...`,
exit status 2); it lives here, at the bottom of the import order, so that library modules
that also serve a command (`cluster/launch.py`) need not reach up into `tools/`.
"""

import math
import numbers
import os

ENV_SIMULATED_DEVICES = "KERASMGPU_SIMULATED_DEVICES"
ENV_CORES_PER_DEVICE = "KERASMGPU_CORES_PER_DEVICE"


class UsageError(ValueError):
    """A command-line request that cannot be carried out (reported without a traceback)."""


def _is_bool(value):
    """A bool, numpy's too (without importing numpy: this module stays light)."""
    kind = type(value)
    return isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def is_whole_number(value):
    """Whether `value` is an int (numpy's integers too), not a bool."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def boolean(value, name):
    """`value` as a bool, or a ValueError naming the option `name`.

    Why: `bool("False")` is True; an on/off option given a string, None or a number would
    silently do the opposite of what was meant.

    Args:
        value: what the user passed.
        name: the parameter's name, as the user wrote it.

    Returns:
        `True` or `False`.

    Example:

    ```python
    options.boolean(sync_batchnorm, "sync_batchnorm")
    ```
    """
    if _is_bool(value):
        return bool(value)
    raise ValueError(f"{name} must be True or False. Received: {name}={value!r}")


def whole_number(value, name, minimum=None, maximum=None, allow_none=False):
    """`value` as an int (numpy integers accepted), or a ValueError naming `name`.

    Args:
        value: what the user passed.
        name: the parameter's name.
        minimum, maximum: inclusive bounds (None: unbounded).
        allow_none: whether None is a valid value (then returned as is).

    Returns:
        The int (or None).

    Example:

    ```python
    sync_period = options.whole_number(sync_period, "sync_period", minimum=1)
    ```
    """
    if value is None and allow_none:
        return None
    if is_whole_number(value) and (minimum is None or value >= minimum) and (
            maximum is None or value <= maximum):
        return int(value)
    raise ValueError(
        f"{name} must be {_whole_range(minimum, maximum)}{' or None' if allow_none else ''}. "
        f"Received: {name}={value!r}"
    )


def _whole_range(minimum, maximum):
    if minimum is not None and maximum is not None:
        return f"a whole number from {minimum} to {maximum}"
    if minimum is not None:
        return f"a whole number >= {minimum}"
    if maximum is not None:
        return f"a whole number <= {maximum}"
    return "a whole number"


def byte_size(value, name, minimum=1, allow_none=False):
    """A size in bytes: a whole number, or a float that is whole (`25e6`, `2**20 * 25.0`).

    Why: sizes are written `25e6` in the docs and in PyTorch's `bucket_cap_mb` habits;
    refusing the float form would refuse what the documentation itself writes. A float
    with a fraction (`1.5`) is still refused: bytes are whole.

    Args:
        value: what the user passed.
        name: the parameter's name.
        minimum: the smallest size accepted.
        allow_none: whether None (the default size) is valid.

    Returns:
        The size as an int (or None).

    Example:

    ```python
    options.byte_size(25e6, "bucket_bytes")  # 25000000
    ```
    """
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Real) and not _is_bool(value) and not is_whole_number(value):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            value = int(number)
    if is_whole_number(value) and value >= minimum:
        return int(value)
    raise ValueError(
        f"{name} must be a whole number of bytes >= {minimum} (e.g. 25_000_000 or 25e6)"
        f"{' or None' if allow_none else ''}. Received: {name}={value!r}"
    )


def one_of(value, name, allowed, explanation=""):
    """`value` if it is one of `allowed`, else a ValueError listing them.

    Args:
        value: what the user passed.
        name: the parameter's name.
        allowed: the accepted values (compared with `==`; bools are not taken for 0/1).
        explanation: a sentence saying what the values mean (optional).

    Returns:
        `value`.

    Example:

    ```python
    options.one_of(variables, "variables", ("auto", "central", "replicated"))
    ```
    """
    if not _is_bool(value) or any(_is_bool(a) for a in allowed):
        try:
            if value in allowed:
                return value
        except TypeError:  # unhashable or incomparable values are simply not allowed
            pass
    shown = ", ".join(repr(a) for a in allowed)
    explanation = f" {explanation.strip()}" if explanation else ""
    raise ValueError(f"{name} must be one of {shown}.{explanation} Received: {name}={value!r}")


def finite_number(value, name, minimum=None, maximum=None, above=None, error=ValueError):
    """A real number that is neither NaN nor infinite, within the bounds given.

    Args:
        value: what the user passed (a number; for flags, argparse's float).
        name: the parameter's or flag's name.
        minimum, maximum: inclusive bounds; `above`: an exclusive lower bound.
        error: the exception class (`UsageError` for command-line flags).

    Returns:
        The number as a float.

    Example:

    ```python
    options.finite_number(args.step_time, "--step-time", above=0, error=UsageError)
    ```
    """
    ok = isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and (above is None or value > above)
    if ok:
        return float(value)
    bounds = [f">= {minimum}" if minimum is not None else None,
              f"> {above}" if above is not None else None,
              f"<= {maximum}" if maximum is not None else None]
    bounds = " and ".join(b for b in bounds if b)
    # A flag is shown as the user typed it ("--step-time nan"), a parameter as name=value.
    received = f"{name} {value!r}" if name.startswith("-") else f"{name}={value!r}"
    raise error(
        f"{name} must be a finite number{' ' + bounds if bounds else ''}. Received: {received}"
    )


def environment_whole_number(variable, minimum=1, environ=None):
    """The whole number an environment variable holds, None when unset or empty.

    Args:
        variable: the variable's name (it is what the error names).
        minimum: the smallest value accepted.
        environ: the environment (default `os.environ`).

    Returns:
        The int, or None.

    Example:

    ```python
    n = options.environment_whole_number("KERASMGPU_SIMULATED_DEVICES")
    ```
    """
    text = (os.environ if environ is None else environ).get(variable)
    if text is None or not text.strip():
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(
            f"{variable} must be a whole number >= {minimum}. Received: {text!r}"
        )
    return value


def simulated_devices_environment(environ=None):
    """`KERASMGPU_SIMULATED_DEVICES` and `KERASMGPU_CORES_PER_DEVICE`, checked.

    Checked here, before TensorFlow is imported, so that a wrong value fails at once.
    Cores per device describe simulated devices: set alone, the variable would do
    nothing, so it is an error.

    Returns:
        `(devices, cores_per_device)`, each an int or None when unset.

    Example:

    ```python
    n, cores = options.simulated_devices_environment()
    ```
    """
    n = environment_whole_number(ENV_SIMULATED_DEVICES, environ=environ)
    cores = environment_whole_number(ENV_CORES_PER_DEVICE, environ=environ)
    if n is None and cores is not None:
        raise ValueError(
            f"{ENV_CORES_PER_DEVICE} has no effect without {ENV_SIMULATED_DEVICES}: set "
            f"both (e.g. {ENV_SIMULATED_DEVICES}=2 {ENV_CORES_PER_DEVICE}={cores}) or "
            f"neither. Received: {ENV_CORES_PER_DEVICE}={cores}, {ENV_SIMULATED_DEVICES} "
            "not set"
        )
    return n, cores


def only_with(name, value, default, needs, layout_name, layout):
    """An option set to other than its default where it does nothing is an error.

    Args:
        name: the option's name; `value` what the user passed; `default` its default.
        needs: a sentence naming the layout where the option applies.
        layout_name, layout: the option that chose the layout and its value.

    Example:

    ```python
    options.only_with("bucket_bytes", bucket_bytes, None, "variables='replicated'",
                      "variables", variables)
    ```
    """
    if value != default:
        raise ValueError(
            f"{name} has no effect with {layout_name}={layout!r}: it applies only with "
            f"{needs}. Received: {name}={value!r} with {layout_name}={layout!r}"
        )


def finite_float(text):
    """An argparse `type=` for a real number flag: refuses `nan` and `inf` as it parses.

    Why: `float("nan")` and `float("inf")` parse, and then every comparison with a bound
    is False (NaN) or a result is meaningless (a predicted speed-up from an infinite step
    time); the flag is refused before any work instead.

    Example:

    ```python
    parser.add_argument("--step-time", type=options.finite_float)
    ```
    """
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def writable_file(path, flag, error=UsageError):
    """Check, before any work, that a result can be written to `path`.

    Why: a benchmark that runs for minutes and then fails to write its JSON loses its
    results; the directory must exist and be writable, and `path` must not be a
    directory or a read-only file. Nothing is created here.

    Args:
        path: where the result will be written ("" or None: nothing to check).
        flag: the flag or parameter that named it.
        error: the exception class (`UsageError` for flags).

    Example:

    ```python
    options.writable_file(args.json, "--json")
    ```
    """
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        problem = "is a directory"
    elif not os.path.isdir(directory):
        problem = f"is in a directory that does not exist ({directory})"
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        problem = "is a file that cannot be written"
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"is in a directory that cannot be written ({directory})"
    else:
        return
    raise error(f"{flag} {path} {problem}; the results would be lost. Received: {flag} {path}")
