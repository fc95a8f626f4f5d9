"""Train a zoo model on a zoo dataset, on one device or several through kerasmgpu.

```
python -m zoo.train --model cifar10_convnet --dataset cifar10 --gpus 2 --epochs 10 \\
    --output runs/convnet
python -m zoo.train --model mnist_mlp --dataset digits --epochs 5 --output runs/digits
```

The run writes to `--output`:

- `model.keras`: the trained model (the template, which plain `keras.saving.load_model`
  reads; with the CIFAR-10 recipe it includes the optimizer's moving average);
- `history.json`: the run's settings, per-epoch metrics and the final test metrics;
- `curves.png`: loss and accuracy per epoch, training and test;
- `backup/`: `keras.callbacks.BackupAndRestore`'s state while the run is in progress.
  After an interruption, the same command with `--resume` continues from the last
  finished epoch and ends with the same weights as an uninterrupted run: the training
  batches form a stream fixed by the seed (`zoo.datasets.shuffled_batches`), and the
  backup holds the weights, the optimizer state and the dropout seeds.

With `--gpus N > 1` on a machine without GPUs, the CPU is split into N simulated devices
first (`kerasmgpu.simulate_devices`).

With `--records DIR` (TFRecord files written by `python -m zoo.records`), the training
split is read from those files, and on a cluster (`kerasmgpu launch`) the input is
sharded: each worker reads only its own files and the test split's 1/W, in local batches
of batch_size / W (`kerasmgpu.cluster.shard`). The order of the samples is then a seeded
shuffle of each worker's files, and a resumed run continues from the last backed-up epoch
with a freshly shuffled epoch (not the exact stream an uninterrupted run would have seen).

One module on purpose (about 600 lines): `python -m zoo.train` reads top to bottom as
the tutorial's training script does (arguments, data, model, wrap, fit, save), with its
checks of what must not be lost (a finished run, a missing --resume folder).
"""

import argparse
import json
import math
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import kerasmgpu
from zoo import cifar10_input, datasets, models, records
from zoo.checks import check_whole_number

DEFAULT_BATCH_SIZE = 128


class SetupError(ValueError):
    """A run's settings do not fit together (unknown name, model/dataset mismatch, ...)."""


def wrap(model, gpus=1):
    """The model to train: `model` itself on one device, else a compiled ParallelModel.

    The zoo's models come compiled with their recipe; the parallel model is compiled
    with the same optimizer object and loss (and accuracy), so training it trains
    `model` with its own recipe.

    Args:
        model: a built, compiled `keras.Model` (e.g. from `zoo.get`).
        gpus: 1 (no wrapping), or what `kerasmgpu.multi_gpu_model` accepts: an int >= 2,
            a list of device ids or names, or None for all visible devices.

    Returns:
        `model` when `gpus == 1`, else a compiled `kerasmgpu.ParallelModel`.

    Example:

    ```python
    model = zoo.cifar10_convnet()
    parallel = zoo.train.wrap(model, gpus=2)
    parallel.fit(train, epochs=1, steps_per_epoch=100)
    model.save("convnet.keras")
    ```
    """
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise ValueError(
            f"wrap expects a compiled model (with an optimizer and a loss), as zoo.get "
            f"returns. Received: the uncompiled model {getattr(model, 'name', model)!r}"
        )
    if gpus == 1 and kerasmgpu.cluster.current() is None:
        return model
    # On a cluster even one device per worker trains through a ParallelModel, which
    # all-reduces gradients across the workers.
    parallel = kerasmgpu.multi_gpu_model(model, gpus=gpus)
    parallel.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    return parallel


def ensure_devices(gpus):
    """Make `gpus` devices available: on a CPU-only machine, simulate them.

    Must run before TensorFlow initialises (before any tensor, dataset or model). When
    TensorFlow has already fixed its devices, enough of them is accepted.

    Args:
        gpus: the number of devices the run needs.

    Raises:
        SetupError: fewer devices are visible than requested.

    Example:

    ```python
    zoo.train.ensure_devices(2)  # first thing
    parallel = zoo.train.wrap(zoo.mnist_mlp(), gpus=2)
    ```
    """
    if gpus <= 1:
        return
    try:
        kerasmgpu.simulate_devices(gpus)
    except RuntimeError:
        # TensorFlow already fixed its devices (e.g. by KERASMGPU_SIMULATED_DEVICES);
        # enough of them is fine.
        pass
    visible = kerasmgpu.visible_devices()
    if len(visible) < gpus:
        raise SetupError(
            f"--gpus {gpus} needs {gpus} devices but only {len(visible)} are visible "
            f"({', '.join(visible)})."
        )


# ---------------------------------------------------------------------------------
# Callbacks of a run.

class _StreamPosition(keras.callbacks.Callback):
    """Points the training stream at the first batch of the epoch training starts with.

    `fit` creates the training iterator once, right after the first `on_epoch_begin`
    (which, after a restore, is the resumed epoch) and keeps it for all epochs.
    """

    def __init__(self, start_batch, steps_per_epoch):
        super().__init__()
        self.start_batch = start_batch
        self.steps_per_epoch = steps_per_epoch
        self._positioned = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._positioned:
            self.start_batch.assign(epoch * self.steps_per_epoch)
            self._positioned = True


class _RandomStateBackup(keras.callbacks.Callback):
    """Backs up the dropout (and other) random seed states alongside BackupAndRestore.

    `BackupAndRestore` saves the weights and the optimizer, but not the state of the
    layers' seed generators, so a resumed run would draw the dropout masks of epoch 1
    again. This saves them in the backup directory before each epoch's backup (one file
    per epoch, so that the file matching whichever epoch is restored always exists) and
    puts them back when training resumes.
    """

    def __init__(self, backup_dir, template, writes=True):
        super().__init__()
        self.backup_dir = backup_dir
        self.writes = writes
        self.states = [
            v for v in template.non_trainable_variables if "seed_generator" in v.path
        ]
        self._started = False

    def _path(self, epoch):
        return os.path.join(self.backup_dir, f"seed_states_before_epoch_{epoch}.npz")

    def on_epoch_begin(self, epoch, logs=None):
        if self._started:
            return
        self._started = True
        path = self._path(epoch)
        if epoch > 0 and os.path.exists(path):
            with np.load(path) as saved:
                for index, variable in enumerate(self.states):
                    variable.assign(saved[f"state_{index}"])

    def on_epoch_end(self, epoch, logs=None):
        if not self.writes:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        np.savez(
            self._path(epoch + 1),
            **{f"state_{i}": np.asarray(v) for i, v in enumerate(self.states)},
        )
        stale = self._path(epoch - 2)
        if os.path.exists(stale):
            os.remove(stale)


# Settings a resumed run may change: more epochs, or another number of devices (which
# changes the result by float rounding only).
_RESUMABLE_CHANGES = ("epochs", "gpus")


def _changed_settings(previous, current):
    return {
        key: (previous.get(key), value)
        for key, value in current.items()
        if key not in _RESUMABLE_CHANGES and previous.get(key) != value
    }


class _JsonHistory(keras.callbacks.Callback):
    """Keeps `history.json` up to date after every epoch, across interruptions."""

    def __init__(self, path, settings, resume, writes=True):
        super().__init__()
        self.path = path
        self.writes = writes
        self.record = {"settings": settings, "epoch": [], "history": {}}
        if resume and os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            if not _changed_settings(previous.get("settings", {}), settings):
                self.record = previous
                self.record["settings"] = settings
                self.record.pop("test", None)

    def on_epoch_end(self, epoch, logs=None):
        # Drop anything recorded for this epoch or later by an interrupted run.
        keep = [i for i, e in enumerate(self.record["epoch"]) if e < epoch + 1]
        self.record["epoch"] = [self.record["epoch"][i] for i in keep] + [epoch + 1]
        history = self.record["history"]
        for key in set(history) | set(logs or {}):
            values = [history.get(key, [None] * len(keep))[i] for i in keep]
            value = (logs or {}).get(key)
            history[key] = values + [None if value is None else float(value)]
        self.write()

    def write(self):
        if not self.writes:
            return
        temporary = self.path + ".tmp"
        with open(temporary, "w") as f:
            json.dump(self.record, f, indent=2)
        os.replace(temporary, self.path)


def plot_curves(record, path):
    """Save loss and accuracy per epoch (training and test) as a PNG.

    Uses matplotlib's object API with the Agg canvas, so no display is needed and the
    global pyplot backend is left alone.

    Args:
        record: the content of `history.json`.
        path: where to write the PNG.

    Example:

    ```python
    with open("runs/digits/history.json") as f:
        zoo.train.plot_curves(json.load(f), "curves.png")
    ```
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = record["epoch"]
    history = record["history"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        test_label = "test (moving average)" if record.get("test_uses_moving_average") else "test"
        for key, label in ((metric, "train"), (f"val_{metric}", test_label)):
            if key in history:
                axes.plot(epochs, history[key], marker="o", label=label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend()
    settings = record["settings"]
    figure.suptitle(
        f"{settings['model']} on {settings['dataset']}, {settings['gpus']} device(s), "
        f"batch {settings['batch_size']}"
    )
    figure.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------
# Data for a model.

def _input_plan(model_name, model, dataset_name, x_train):
    """How to feed this dataset to this model: "as_is", "flatten" or "crop" (CIFAR-10)."""
    model_shape = tuple(model.inputs[0].shape[1:])
    image_shape = tuple(x_train.shape[1:])
    if model_shape == image_shape:
        return "as_is"
    if len(model_shape) == 1 and model_shape[0] == int(np.prod(image_shape)):
        return "flatten"
    size = cifar10_input.IMAGE_SIZE
    if model_shape == (size, size, 3) and len(image_shape) == 3 and image_shape[2] == 3 and (
        min(image_shape[:2]) >= size
    ):
        return "crop"
    raise SetupError(
        f"Model {model_name!r} takes inputs of shape {model_shape}, but dataset "
        f"{dataset_name!r} has images of shape {image_shape}. Pick a model made for the "
        "dataset (e.g. mnist_mlp for mnist/digits/synthetic-mnist; cifar10_convnet or "
        "cifar10_mlp for cifar10/synthetic-cifar10)."
    )


def _records_input(directory, dataset_name, plan, batch_size, gpus, seed, steps_per_epoch,
                   x_test, y_test):
    """Training batches read from TFRecord files (sharded on a cluster) and test batches.

    Returns `(train, test, steps)`: `steps` is None (one pass over the files; the
    workers agree on its length) unless `steps_per_epoch` is given.
    """
    try:
        index = records.read_index(directory)
    except FileNotFoundError as error:
        raise SetupError(str(error)) from None
    if index["dataset"] != dataset_name:
        raise SetupError(
            f"--records {directory!r} holds dataset {index['dataset']!r}, not {dataset_name!r}."
        )
    if plan == "crop":
        raise SetupError("--records feeds images as they are or flattened; the CIFAR-10 "
                         "recipe's distortions read arrays: train it without --records.")
    cluster = kerasmgpu.cluster.current()
    workers = 1 if cluster is None else cluster.num_workers
    worker = 0 if cluster is None else cluster.worker_index
    if batch_size % workers or batch_size // workers < gpus:
        raise SetupError(
            f"With --records on {workers} workers each reads batches of batch_size / "
            f"{workers} samples, a whole number of at least --gpus ({gpus}). Received: "
            f"batch_size={batch_size}"
        )
    local_batch = batch_size // workers

    def prepare(image, label):
        return (tf.reshape(image, [-1]) if plan == "flatten" else image), label

    train = records.read(directory).shuffle(4096, seed=seed * 1009 + worker)
    test = kerasmgpu.cluster.shard(tf.data.Dataset.from_tensor_slices((x_test, y_test)))
    if steps_per_epoch:
        train = train.repeat()
    train = train.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch)
    test = test.map(prepare).batch(local_batch)
    return train.prefetch(tf.data.AUTOTUNE), test.prefetch(tf.data.AUTOTUNE), steps_per_epoch


def _build_model(model_name, model_kwargs, x_train, num_classes):
    kwargs = dict(model_kwargs or {})
    if model_name == "mlp":
        kwargs.setdefault("input_dim", int(np.prod(x_train.shape[1:])))
        kwargs.setdefault("num_classes", num_classes)
    try:
        return models.get(model_name, **kwargs)
    except TypeError as error:
        raise SetupError(
            f"Could not build model {model_name!r} with model_kwargs={kwargs}: {error}. "
            "For 'mlp', give nb_neurons, nb_layers, activation and optimizer, e.g. "
            """--model-kwargs '{"nb_neurons": 256, "nb_layers": 2, "activation": "relu", """
            """"optimizer": "adam"}'."""
        ) from None


def _check_positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    check_whole_number(name, value, error=SetupError)


def _check_output(output, backup_dir, resume):
    """Refuse to overwrite a finished run, or to "resume" a run that is not there.

    Why: re-running a finished run's command would silently replace its model.keras and
    history.json, and `--resume` with a misspelled `--output` would silently train from
    scratch and exit 0. Nothing is deleted here: the user chooses.
    """
    if resume and not os.path.isdir(backup_dir):
        where = (f"{output!r} does not exist" if not os.path.isdir(output)
                 else f"{output!r} has no backup ({backup_dir})")
        finished = os.path.exists(os.path.join(output, "model.keras"))
        raise SetupError(
            f"--resume (resume=True) continues an interrupted run from its backup, but {where}"
            + (": the run there finished (its model.keras is written). " if finished else ". ")
            + "Check --output, or drop --resume to start a new run. "
            f"Received: output={output!r}, resume=True"
        )
    if not resume and os.path.exists(os.path.join(output, "model.keras")):
        raise SetupError(
            f"{output!r} holds a finished run (model.keras, history.json); training again there "
            "would overwrite it. Choose another --output, or move or delete those files to "
            f"start afresh in it. Received: output={output!r}"
        )


def run(model="mnist_mlp", dataset="digits", gpus=1, epochs=1, batch_size=DEFAULT_BATCH_SIZE,
        output="runs/zoo", resume=False, steps_per_epoch=None, seed=0, model_kwargs=None,
        callbacks=(), verbose="auto", records=None):
    """Train `model` on `dataset` and write `model.keras`, `history.json`, `curves.png`.

    This is `python -m zoo.train` as a function (the flags are its arguments).

    Args:
        model: a zoo model name (`zoo.names()`).
        dataset: a dataset name (`zoo.datasets.names()`).
        gpus: number of devices; 1 trains the plain Keras model, N > 1 a
            `kerasmgpu.multi_gpu_model` (simulated devices on a CPU-only machine).
        epochs: number of epochs.
        batch_size: global batch size (split across devices).
        output: directory for the outputs and the backup.
        resume: continue an interrupted run from its backup in `output/backup`.
        steps_per_epoch: batches per epoch; default one pass, ceil(N / batch_size).
        seed: seeds the weights, the batch order, dropout and augmentation (it sets the
            process-wide seeds with `keras.utils.set_random_seed`).
        model_kwargs: keyword arguments for the model builder (needed for "mlp").
        callbacks: extra Keras callbacks, run after the run's own.
        verbose: Keras' `fit` verbosity ("auto" shows the progress bar).
        records: a directory of TFRecord files of `dataset` (`zoo.records.write`) to
            read the training split from; sharded input on a cluster (each worker reads
            its own files, local batches of batch_size / workers).

    Returns:
        The content of `history.json`: settings, per-epoch metrics and the final test
        metrics (`record["test"]`; with the CIFAR-10 recipe, measured with the moving
        average of the weights).

    Example:

    ```python
    record = zoo.train.run("mnist_mlp", "digits", epochs=5, output="runs/digits")
    record["test"]["accuracy"]
    ```
    """
    if model not in models.names():
        raise SetupError(f"Unknown model {model!r}. Known models: {', '.join(models.names())}.")
    if dataset not in datasets.names():
        raise SetupError(
            f"Unknown dataset {dataset!r}. Known datasets: {', '.join(datasets.names())}."
        )
    _check_positive("gpus", gpus)
    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    _check_positive("steps_per_epoch", steps_per_epoch, allow_none=True)
    if batch_size < gpus:
        raise SetupError(
            f"batch_size ({batch_size}) must be at least the number of devices ({gpus}) so "
            "that every device gets examples."
        )
    backup_dir = os.path.join(output, "backup")
    if os.path.exists(backup_dir) and not resume:
        raise SetupError(
            f"{output!r} holds the backup of an interrupted run ({backup_dir}). Pass "
            "--resume (resume=True) to continue it, or delete the backup or choose another "
            "--output to start afresh."
        )
    _check_output(output, backup_dir, resume)
    ensure_devices(gpus)  # before TensorFlow initialises
    os.makedirs(output, exist_ok=True)
    keras.utils.set_random_seed(seed)

    (x_train, y_train), (x_test, y_test) = datasets.load(dataset, seed=seed)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    template = _build_model(model, model_kwargs, x_train, num_classes)
    if template.outputs[0].shape[-1] < num_classes:
        raise SetupError(
            f"Model {model!r} has {template.outputs[0].shape[-1]} outputs but dataset "
            f"{dataset!r} has {num_classes} classes."
        )
    plan = _input_plan(model, template, dataset, x_train)
    if plan == "flatten":
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)

    steps = steps_per_epoch or math.ceil(len(x_train) / batch_size)
    start_batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="start_batch")
    if records is not None:
        train_data, test_data, steps = _records_input(
            records, dataset, plan, batch_size, gpus, seed, steps_per_epoch, x_test, y_test
        )
    elif plan == "crop":
        train_data = cifar10_input.train_dataset(
            x_train, y_train, batch_size, seed=seed, start_batch=start_batch
        )
        test_data = cifar10_input.eval_dataset(x_test, y_test, batch_size)
    else:
        train_data = datasets.shuffled_batches(
            x_train, y_train, batch_size, seed=seed, start_batch=start_batch
        )
        test_data = (
            tf.data.Dataset.from_tensor_slices((x_test, y_test))
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    settings = {
        "model": model, "dataset": dataset, "gpus": gpus, "epochs": epochs,
        "batch_size": batch_size, "steps_per_epoch": steps, "seed": seed,
        "model_kwargs": model_kwargs or {}, "records": records,
    }
    history_path = os.path.join(output, "history.json")
    if resume and os.path.exists(backup_dir) and os.path.exists(history_path):
        with open(history_path) as f:
            changed = _changed_settings(json.load(f).get("settings", {}), settings)
        if changed:
            described = ", ".join(
                f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items()
            )
            raise SetupError(
                f"--resume continues the run in {output!r} with its own settings, but these "
                f"differ ({described}). Use the same flags (only --epochs and --gpus may "
                "change), or another --output."
            )
    # On a cluster every worker runs this function; only the chief (worker 0) writes.
    cluster = kerasmgpu.cluster.current()
    writes = cluster is None or cluster.is_chief
    history = _JsonHistory(history_path, settings, resume, writes=writes)
    uses_ema = bool(getattr(template.optimizer, "use_ema", False))
    evaluation_callbacks = [keras.callbacks.SwapEMAWeights()] if uses_ema else []
    run_callbacks = [
        *([] if records is not None else [_StreamPosition(start_batch, steps)]),
        *evaluation_callbacks,
        history,
        _RandomStateBackup(backup_dir, template, writes=writes),  # before BackupAndRestore
        keras.callbacks.BackupAndRestore(backup_dir),
        *callbacks,
    ]

    trainer = wrap(template, gpus)
    history.record["devices"] = (
        trainer.devices if isinstance(trainer, kerasmgpu.ParallelModel)
        else kerasmgpu.visible_devices()[:1]
    )
    if verbose:
        source = f"records in {records}" if records is not None else f"{len(x_train)} examples"
        epoch = f"{steps} steps per epoch" if steps else "one pass per epoch"
        print(f"Training {model} on {dataset} ({source}, {epoch}) on "
              f"{', '.join(history.record['devices'])}")
    trainer.fit(
        train_data, epochs=epochs, steps_per_epoch=steps, validation_data=test_data,
        callbacks=run_callbacks, verbose=verbose, shuffle=False,  # the stream is shuffled
    )
    if writes:
        template.save(os.path.join(output, "model.keras"))
    test = trainer.evaluate(
        test_data, callbacks=[keras.callbacks.SwapEMAWeights()] if uses_ema else None,
        return_dict=True, verbose=0,
    )
    history.record["test"] = {key: float(value) for key, value in test.items()}
    history.record["test_uses_moving_average"] = uses_ema
    history.write()
    if writes:
        plot_curves(history.record, os.path.join(output, "curves.png"))
    return history.record


def main(argv=None):
    """Command-line entry point: `python -m zoo.train --help`."""
    parser = argparse.ArgumentParser(
        prog="python -m zoo.train",
        description="Train a zoo model through kerasmgpu.multi_gpu_model (or plain Keras "
        "with --gpus 1) and write model.keras, history.json and curves.png.",
    )
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(models.names())}")
    parser.add_argument(
        "--dataset", required=True, help=f"one of: {', '.join(datasets.names())}"
    )
    parser.add_argument("--gpus", type=int, default=1, help="devices to train on (default 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--output", required=True, help="directory for the run's files")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from OUTPUT/backup")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="batches per epoch (default: one pass over the data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records", default=None,
                        help="read the training split from TFRecord files written by "
                        "python -m zoo.records (sharded on a cluster)")
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help="JSON object of builder arguments, e.g. for --model mlp")
    args = parser.parse_args(argv)
    try:
        record = run(
            model=args.model, dataset=args.dataset, gpus=args.gpus, epochs=args.epochs,
            batch_size=args.batch_size, output=args.output, resume=args.resume,
            steps_per_epoch=args.steps_per_epoch, seed=args.seed,
            model_kwargs=args.model_kwargs, verbose=1, records=args.records,
        )
    except SetupError as error:
        parser.error(str(error))
    except datasets.DatasetUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    test = ", ".join(f"{key} {value:.4f}" for key, value in record["test"].items())
    weights = " (moving average of the weights)" if record["test_uses_moving_average"] else ""
    print(f"test{weights}: {test}")
    cluster = kerasmgpu.cluster.current()
    if cluster is None or cluster.is_chief:
        print(f"wrote {os.path.join(args.output, 'model.keras')}, history.json and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
