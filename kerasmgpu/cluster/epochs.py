"""Every worker runs the same number of steps per epoch, whatever its shard of the data.

Why a module of its own: the cluster (`worker.py`) calls this agreement at the start of
every `fit`/`evaluate`/`predict`, and `sharding.py` (which reads the cluster) re-exports
it; here it needs neither, so imports go one way: epochs <- worker <- sharding.

Uneven shards: every worker must run the same number of steps per epoch. At the start of
`fit`/`evaluate`/`predict` the workers exchange how many batches their dataset has (one
all-gather) and a worker with fewer appends empty batches up to the longest count; an
empty local batch adds no rows to the global batch, so the epoch ends at the same step
everywhere and no sample is dropped. (tf.distribute reaches the same result step by step:
its iterators call `get_next_as_optional`, all-reduce how many replicas still have data,
and feed empty dummy batches to those that have none until every worker is exhausted.)
"""

import warnings

import numpy as np
import tensorflow as tf
from keras import tree


def count_batches(dataset):
    """How many batches `dataset` yields: its cardinality, or one pass when unknown.

    Returns None for an infinite dataset (its epochs are `steps_per_epoch` long).
    """
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        return None
    if cardinality >= 0:
        return cardinality
    warnings.warn(
        "kerasmgpu counts this worker's batches with one extra pass over its dataset, "
        "since its length is unknown (the workers must agree on the steps per epoch). "
        "To skip the pass, declare it: dataset.apply(tf.data.experimental."
        "assert_cardinality(n)), or repeat() it and give steps_per_epoch.",
        stacklevel=4,
    )
    return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def pad_to(dataset, count, steps):
    """`dataset` (`count` batches) followed by empty batches up to `steps` batches.

    An empty batch has 0 rows and the dataset's structure (unknown inner dimensions are
    0), made from its element spec: nothing is read to make it.
    """
    if steps == count:
        return dataset
    if count == 0:
        raise ValueError(
            f"This worker's dataset is empty but its peers' have {steps} batches. Give every "
            "worker at least one batch (e.g. at least as many files as workers)."
        )
    specs = tree.flatten(dataset.element_spec)
    if all(isinstance(spec, tf.TensorSpec) and spec.shape.rank for spec in specs):
        empty = tree.pack_sequence_as(dataset.element_spec, [
            tf.zeros([0] + [d or 0 for d in spec.shape.as_list()[1:]], spec.dtype)
            for spec in specs
        ])
        empty = tf.data.Dataset.from_tensors(empty)
    else:  # ragged or sparse parts: cut the rows of a real batch
        empty = dataset.take(1).map(lambda *batch: tree.map_structure(
            lambda t: t[:0], batch[0] if len(batch) == 1 else batch))
    padded = dataset.concatenate(empty.repeat(steps - count))
    return padded.apply(tf.data.experimental.assert_cardinality(steps))


def agree_on_steps(cluster, dataset):
    """`dataset`, padded with empty batches to the longest worker's number of batches."""
    count = count_batches(dataset)
    counts = cluster.all_gather_counts(-1 if count is None else count)
    if count is None or min(counts) < 0:
        if not (count is None and max(counts) < 0):
            raise ValueError(
                "With sharded input all workers' datasets must be finite, or all infinite "
                f"(repeat() with steps_per_epoch). Received batch counts {counts} "
                "(-1: infinite) on workers 0..W-1."
            )
        return dataset
    return pad_to(dataset, count, max(counts))


def _check_equal_arrays(cluster, call, args, kwargs):
    """Arrays cannot be padded: workers must have as many batches, or it is an error."""
    x = args[0] if args else kwargs.get("x")
    leaves = [t for t in tree.flatten(x) if hasattr(t, "shape") and len(t.shape)]
    if not leaves:
        return  # a generator or PyDataset: its length is the user's to keep equal
    position = 1 if call == "predict" else 2  # fit(x, y, batch_size), predict(x, batch_size)
    batch_size = kwargs.get("batch_size") or (
        args[position] if len(args) > position else None) or 32
    count = -(-int(leaves[0].shape[0]) // int(batch_size))
    counts = cluster.all_gather_counts(count)
    if len(set(counts)) > 1:
        raise ValueError(
            "With sharded input every worker must run as many steps, but the workers' "
            f"arrays make {counts} batches of {batch_size} (workers 0..W-1). Give each worker "
            "a tf.data.Dataset (e.g. kerasmgpu.cluster.shard(...).batch(...)): kerasmgpu "
            "pads the shorter ones with empty batches."
        )


def agree_on_call(cluster, call, args, kwargs):
    """The arguments of `fit`/`evaluate`/`predict` with their datasets agreed on."""
    args, kwargs = list(args), dict(kwargs)
    if kwargs.get("_use_cached_eval_dataset"):
        return tuple(args), kwargs  # fit's validation data, agreed on when fit started
    if args and isinstance(args[0], tf.data.Dataset):
        args[0] = agree_on_steps(cluster, args[0])
    elif isinstance(kwargs.get("x"), tf.data.Dataset):
        kwargs["x"] = agree_on_steps(cluster, kwargs["x"])
    else:
        _check_equal_arrays(cluster, call, args, kwargs)
    if call == "fit" and isinstance(kwargs.get("validation_data"), tf.data.Dataset):
        kwargs["validation_data"] = agree_on_steps(cluster, kwargs["validation_data"])
    return tuple(args), kwargs
