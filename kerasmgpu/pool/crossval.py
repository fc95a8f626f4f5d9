"""k-fold cross-validation with the folds (and candidates) trained concurrently, one per device.

`cross_validate` cuts the rows into k folds with a seeded shuffle, then trains one model
per (candidate, fold) pair on a `DevicePool`: each device's worker trains a fold's model
on the other k - 1 folds and scores it on the held-out fold. The data reaches each worker
once; a task carries only which candidate and which fold. Each fold's training is seeded
by the cross-validation seed and the fold alone, so the scores are the same whichever
worker trains it, and the same as the plain Keras loop one fold after another
(`train_fold` is that loop's body).

Small batches are where many small models spend their time in Python: a batch of 8
through a small MLP is a fraction of a millisecond of arithmetic and most of a
millisecond of per-call overhead. Keras' `steps_per_execution` runs several batches per
call (a `tf.while_loop` over the same train step: the same batches in the same order, so
the same result); `steps_per_execution="auto"` chooses it for small models.
"""

import math
import time

import keras
import numpy as np

from kerasmgpu.pool.workers import DevicePool, current_worker, sendable

# "auto" runs about this many samples per call for a small model: one or two calls per
# epoch of a small dataset. On a 2-core CPU, batch-8 MLP epochs on digits ran 2.4x (256
# hidden units) to 5x (32) faster at 128 batches per call than at one
# (benchmarks/many_models.py, docs/many_models.md).
AUTO_SAMPLES_PER_CALL = 1024
# Larger models spend their time in arithmetic, not in per-call overhead: "auto" leaves
# them at one batch per call.
AUTO_MAX_PARAMETERS = 1_000_000
_FORBIDDEN_FIT_ARGUMENTS = ("x", "y", "batch_size", "epochs", "validation_data",
                            "validation_split", "sample_weight")


def fold_indices(num_rows, folds, seed):
    """The (train, test) row indices of each fold: a seeded shuffle cut into k parts.

    Fold sizes differ by at most one row. The same `num_rows`, `folds` and `seed` give the
    same folds on any machine (numpy's PCG64 generator).

    Args:
        num_rows: rows of the data.
        folds: number of folds k, 2 <= k <= num_rows.
        seed: seeds the shuffle.

    Returns:
        A list of k `(train_index, test_index)` pairs of sorted int arrays.

    Example:

    ```python
    [(len(train), len(test)) for train, test in fold_indices(10, 3, seed=0)]
    # [(6, 4), (7, 3), (7, 3)]
    ```
    """
    order = np.random.default_rng(seed).permutation(num_rows)
    parts = np.array_split(order, folds)
    return [(np.sort(np.concatenate(parts[:fold] + parts[fold + 1:])), np.sort(part))
            for fold, part in enumerate(parts)]


def fold_seed(seed, fold):
    """The training seed of fold `fold`: the same for every candidate (common random numbers).

    Returns:
        An int in [0, 2**31 - 1).
    """
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0]) % (2**31 - 1)


def auto_steps_per_execution(model, batch_size, train_rows):
    """Batches per call for `steps_per_execution="auto"`.

    A small model (at most `AUTO_MAX_PARAMETERS` parameters) runs about
    `AUTO_SAMPLES_PER_CALL` samples per call, at most an epoch; a larger one, or a model
    compiled with its own `steps_per_execution`, keeps what it has.

    Args:
        model: a compiled Keras model.
        batch_size: the training batch size.
        train_rows: rows of the training data.

    Returns:
        An int >= 1.
    """
    if getattr(model, "steps_per_execution", 1) != 1:
        return model.steps_per_execution
    if model.count_params() > AUTO_MAX_PARAMETERS:
        return 1
    steps_per_epoch = max(1, math.ceil(train_rows / batch_size))
    return max(1, min(steps_per_epoch, AUTO_SAMPLES_PER_CALL // batch_size))


def _rows(structure, index):
    return keras.tree.map_structure(lambda array: array[index], structure)


def _num_rows(structure):
    lengths = {len(array) for array in keras.tree.flatten(structure)}
    if len(lengths) != 1:
        raise ValueError(
            "x and y must have the same number of rows in every array. Received lengths "
            f"{sorted(lengths)}"
        )
    return lengths.pop()


def train_fold(build_model, x, y, train_index, test_index, seed, batch_size, epochs,
               steps_per_execution="auto", validate=False, **fit_kwargs):
    """Train one fold's model and score it on the held-out rows: one cross-validation task.

    This is the plain Keras loop body: clear the session, seed, build, fit, evaluate.
    `cross_validate` runs it in the pool's workers; running it in a loop in one process
    gives the same scores.

    Args:
        build_model: returns a compiled Keras model.
        x, y: all rows (arrays, or dicts/lists of arrays).
        train_index, test_index: the fold's rows.
        seed: seeds the weights, dropout and batch order (`keras.utils.set_random_seed`).
        batch_size, epochs: as for `fit`.
        steps_per_execution: "auto", or batches per call (int >= 1).
        validate: also evaluate the held-out rows after every epoch (`val_` entries in
            the history).
        **fit_kwargs: more `fit` arguments (callbacks, class_weight, shuffle, ...).

    Returns:
        A dict: "scores" (`evaluate` on the held-out rows, by metric name), "history"
        (`fit`'s history), "steps_per_execution" and "train_rows".
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_model()
    if not isinstance(model, keras.Model) or not getattr(model, "compiled", False):
        raise ValueError(
            "build_model must return a compiled keras.Model (call model.compile(...) "
            f"inside it). Received: {model!r}"
        )
    if steps_per_execution == "auto":
        steps_per_execution = auto_steps_per_execution(model, batch_size, len(train_index))
    # A compile argument Keras reads when it builds the train and test functions, on the
    # first fit: setting it before keeps the user's compiled loss, optimizer and metrics.
    model.steps_per_execution = steps_per_execution
    x_train, y_train = _rows(x, train_index), _rows(y, train_index)
    x_test, y_test = _rows(x, test_index), _rows(y, test_index)
    fit_kwargs.setdefault("verbose", 0)
    if validate:
        fit_kwargs["validation_data"] = (x_test, y_test)
    history = model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, **fit_kwargs)
    scores = model.evaluate(x_test, y_test, batch_size=batch_size, verbose=0, return_dict=True)
    return {
        "scores": {name: float(value) for name, value in scores.items()},
        "history": {name: [float(v) for v in values]
                    for name, values in history.history.items()},
        "steps_per_execution": int(steps_per_execution),
        "train_rows": int(len(train_index)),
    }


def _fold_task(data, build_model, fold, folds, seed, batch_size, epochs, steps_per_execution,
               validate, fit_kwargs):
    """A pool task: one (candidate, fold) pair, on the worker's resident data."""
    start = time.perf_counter()
    train_index, test_index = fold_indices(_num_rows(data["x"]), folds, seed)[fold]
    result = train_fold(build_model, data["x"], data["y"], train_index, test_index,
                        fold_seed(seed, fold), batch_size, epochs, steps_per_execution,
                        validate, **fit_kwargs)
    worker = current_worker()
    result.update(seconds=time.perf_counter() - start, device=worker.device)
    return result


def _check_arguments(builders, x, y, folds, seed, batch_size, epochs, steps_per_execution,
                     fit_kwargs):
    for builder in builders:
        if not callable(builder):
            raise ValueError(
                "build_model must be a function returning a compiled keras.Model, or a list "
                f"of such functions. Received: {builder!r}"
            )
    for name, value, minimum in (("folds", folds, 2), ("batch_size", batch_size, 1),
                                 ("epochs", epochs, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"{name} must be a whole number >= {minimum}. Received: {name}={value!r}"
            )
    if steps_per_execution != "auto" and (
            isinstance(steps_per_execution, bool) or not isinstance(steps_per_execution, int)
            or steps_per_execution < 1):
        raise ValueError(
            'steps_per_execution must be "auto" or a whole number >= 1. Received: '
            f"steps_per_execution={steps_per_execution!r}"
        )
    forbidden = sorted(set(fit_kwargs) & set(_FORBIDDEN_FIT_ARGUMENTS))
    if forbidden:
        raise ValueError(
            f"cross_validate sets {', '.join(forbidden)} itself (the held-out fold is the "
            "validation data; pass validate=True to score it every epoch). Received: "
            f"{', '.join(f'{name}=...' for name in forbidden)}"
        )
    rows = _num_rows({"x": x, "y": y})
    if folds > rows:
        raise ValueError(f"folds must be at most the number of rows ({rows}). Received: "
                         f"folds={folds}")


def _summary(fold_results, folds, seed):
    names = list(fold_results[0]["scores"])
    matrix = {name: np.array([result["scores"][name] for result in fold_results])
              for name in names}
    return {
        "scores": [result["scores"] for result in fold_results],
        "mean": {name: float(values.mean()) for name, values in matrix.items()},
        "std": {name: float(values.std()) for name, values in matrix.items()},
        "histories": [result["history"] for result in fold_results],
        "devices": [result["device"] for result in fold_results],
        "seconds": [result["seconds"] for result in fold_results],
        "steps_per_execution": fold_results[0]["steps_per_execution"],
        "folds": folds,
        "seed": seed,
    }


def cross_validate(build_model, x, y, folds=5, devices=None, seed=0, batch_size=32, epochs=1,
                   steps_per_execution="auto", validate=False, retries=2, progress=False,
                   **fit_kwargs):
    """k-fold cross-validation, the folds (of every candidate) trained concurrently.

    One worker process per device (`DevicePool`) receives `x` and `y` once; each
    (candidate, fold) pair is one task, run by whichever worker is free. Fold f of every
    candidate trains on the same rows with the same seed, so candidates differ by their
    architecture alone, and each fold gives the same scores as the plain Keras loop one
    fold after another (`train_fold`).

    `build_model` is sent to the worker processes: a function defined at the top level of
    an importable module, or a `functools.partial` of one. A function a worker cannot
    import (a lambda, a notebook's function) is sent by value when cloudpickle is
    installed (`pip install kerasmgpu[pool]`); otherwise a ValueError says so. Scripts
    that call `cross_validate` must do so under `if __name__ == "__main__":` (workers are
    started with "spawn" and import the script).

    Args:
        build_model: a function of no arguments returning a compiled keras.Model, or a
            list of them (candidates).
        x, y: numpy arrays (or dicts/lists of arrays) with the same number of rows.
        folds: number of folds k (>= 2).
        devices: None (all of `kerasmgpu.visible_devices()`), an int, or a list of device
            ids or names: one worker each.
        seed: seeds the fold split and each fold's training.
        batch_size, epochs: as for `fit`.
        steps_per_execution: batches per call, or "auto" (small models run about
            `AUTO_SAMPLES_PER_CALL` samples per call; others keep their compiled value).
        validate: evaluate the held-out fold after every epoch too (`val_` in histories).
        retries: times a task runs again when its worker process dies under it.
        progress: show a progress bar over the tasks.
        **fit_kwargs: more `fit` arguments (callbacks, class_weight, shuffle, ...).

    Returns:
        For one `build_model`, a dict: "scores" (per fold, `evaluate`'s dict), "mean" and
        "std" (over folds, by metric; std with ddof=0), "histories" (per fold),
        "devices" and "seconds" (per fold), "steps_per_execution", "folds", "seed". For a
        list, a list of such dicts in the same order.

    Example:

    ```python
    def build_mlp():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, "relu"),
                                  keras.layers.Dense(10, "softmax")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    result = kerasmgpu.cross_validate(build_mlp, x, y, folds=3, devices=2, epochs=20,
                                      batch_size=8, seed=0)
    result["mean"]["accuracy"], result["std"]["accuracy"]
    ```
    """
    single = not isinstance(build_model, (list, tuple))
    builders = [build_model] if single else list(build_model)
    if not builders:
        raise ValueError("build_model must not be an empty list. Received: []")
    _check_arguments(builders, x, y, folds, seed, batch_size, epochs, steps_per_execution,
                     fit_kwargs)
    sent = [sendable("build_model", builder) for builder in builders]
    fit_kwargs = {name: sendable(f"the fit argument {name}", value) if callable(value)
                  else value for name, value in fit_kwargs.items()}
    tasks = [(builder, fold, folds, seed, batch_size, epochs, steps_per_execution, validate,
              fit_kwargs)
             for builder in sent for fold in range(folds)]
    with DevicePool(devices, data={"x": x, "y": y}, retries=retries,
                    progress=progress) as pool:
        results = pool.map(_fold_task, tasks)
    summaries = [_summary(results[index * folds:(index + 1) * folds], folds, seed)
                 for index in range(len(builders))]
    return summaries[0] if single else summaries
