"""Argument checks shared by the zoo: clear errors at the boundary, in Keras' style."""

import numbers


def check_whole_number(name, value, minimum=1, error=ValueError):
    """Raise `error` unless `value` is a whole number >= `minimum` (numpy's too; not a bool).

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        minimum: the smallest value accepted.
        error: the exception class raised (a `ValueError` subclass).

    Example:

    ```python
    check_whole_number("epochs", 0)  # ValueError: epochs must be a whole number >= 1. ...
    ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise error(f"{name} must be a whole number >= {minimum}. Received: {name}={value!r}")
