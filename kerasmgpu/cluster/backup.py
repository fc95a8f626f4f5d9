"""A backup for `fit` that the environment asks for: resuming scripts that have none.

`kerasmgpu launch --max-restarts M` starts every worker again after a failure; training
resumes where it was only from a `keras.callbacks.BackupAndRestore` backup. A script that
passes one to `fit` needs nothing more. For the others, `kerasmgpu launch --backup-dir DIR`
sets `KERASMGPU_BACKUP_DIR=DIR` in the workers' environment, and `ParallelModel.fit` adds
`keras.callbacks.BackupAndRestore(DIR/fit-N)` to its callbacks, N counting the `fit`
calls of the process (0 for the first). Why one directory per call: a script that calls
`fit` twice (say, a warm-up and then the real run) must not restore the second call's
backup into the first one when it starts again; the calls happen in the same order in
every run, so call N always finds its own backup. As with any `BackupAndRestore`, the
chief alone writes it, every worker reads it on a restart (on several machines the
directory must be on storage every worker reads), and a `fit` that finishes deletes it.

No TensorFlow or Keras at this module's top level: the launcher imports the variable's
name.
"""

import os

ENV_BACKUP_DIR = "KERASMGPU_BACKUP_DIR"
_fit_calls = 0


def with_backup(callbacks, env=None):
    """`callbacks` with a `BackupAndRestore` added when `KERASMGPU_BACKUP_DIR` asks for one.

    Nothing is added when the variable is unset or empty, or when `callbacks` already
    holds a `BackupAndRestore` (the script's own wins).

    Args:
        callbacks: the `callbacks` argument of `fit` (None or a list of callbacks).
        env: the environment (default `os.environ`).

    Returns:
        A new list of callbacks, or `callbacks` unchanged.

    Example:

    ```python
    os.environ["KERASMGPU_BACKUP_DIR"] = "/shared/run1/backup"
    callbacks = with_backup([keras.callbacks.CSVLogger("log.csv")])
    # [CSVLogger, BackupAndRestore("/shared/run1/backup/fit-0")]
    ```
    """
    global _fit_calls
    env = os.environ if env is None else env
    directory = env.get(ENV_BACKUP_DIR)
    if not directory:
        return callbacks
    import keras

    call = _fit_calls
    _fit_calls += 1
    callbacks = list(callbacks or [])
    if any(isinstance(callback, keras.callbacks.BackupAndRestore) for callback in callbacks):
        return callbacks
    return callbacks + [
        keras.callbacks.BackupAndRestore(os.path.join(directory, f"fit-{call}"))
    ]
