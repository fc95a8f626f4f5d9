"""Sharded input: each worker reads only its own part of the data.

With "global" input (the default) every worker iterates the whole dataset and keeps its
share of each global batch: W workers read and decode W times what is needed. With
sharded input each worker reads its part (`shard()`), batches it into *local* batches,
and the training step gathers what the loss and the metrics need from every worker
(`Cluster.global_batch`): global batch b is the concatenation of the workers' local
batches b, in worker order, and loss, metrics and update are those of that global batch,
the same on every worker.

Uneven shards (every worker must run the same number of steps per epoch) are
`kerasmgpu.cluster.epochs`' concern; its functions are re-exported here.
"""

import warnings

import tensorflow as tf

from kerasmgpu import _compat, options
from kerasmgpu.cluster import worker as worker_lib

# Re-exported: the agreement on steps per epoch that sharded input needs.
from kerasmgpu.cluster.epochs import (  # noqa: F401
    agree_on_call,
    agree_on_steps,
    count_batches,
    pad_to,
)

# Dataset ops that read files: with one of them in the pipeline, `shard` splits the files.
READER_OPS = (
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "TextLineDatasetV2",
    "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2",
)
POLICIES = ("auto", "file", "data")
# Dataset ops that batch: a pipeline holding one is batched already.
BATCH_OPS = (
    "BatchDataset", "BatchDatasetV2", "PaddedBatchDataset", "PaddedBatchDatasetV2",
    "ParallelBatchDataset", "MapAndBatchDataset", "ExperimentalMapAndBatchDataset",
)


def shard(dataset, policy="auto", num_workers=None, worker_index=None):
    """This worker's part of `dataset`, as tf.distribute's auto-shard splits it.

    Call it on the pipeline before batching; batch the result with the *local* batch
    size (the global batch divided by the number of workers). On a cluster it also puts
    the step in sharded input mode (`set_input("sharded")`), which is what a sharded
    dataset means. On one machine (one worker) the dataset is returned as it is.

    - By files ("file"), when the pipeline reads files (`TFRecordDataset`,
      `TextLineDataset`, `FixedLengthRecordDataset`, directly or through
      `interleave`/`flat_map` over a list of names): worker w reads the files whose index
      i in the list has i % W == w, so it reads only 1/W of the bytes. There must be at
      least W files; `list_files` must not shuffle differently on each worker (give it
      `shuffle=False` or a seed).
    - By elements ("data") otherwise: worker w keeps elements w, w + W, w + 2W, ...
      (`dataset.shard(W, w)`); the steps after `shard` (decoding, augmentation) run on
      1/W of the elements, the source is still walked in full.

    Global batch b is then the workers' local batches b in worker order: with "data" and
    local batch L, elements (b * L + j) * W + w for j < L, worker w by worker w.

    Args:
        dataset: a `tf.data.Dataset`, not yet batched.
        policy: "auto" (files if the pipeline reads files, else elements), "file" or
            "data".
        num_workers: the number of shards (default: the cluster's workers, 1 alone).
        worker_index: which shard (default: this worker's index).

    Returns:
        The sharded `tf.data.Dataset`.

    Example:

    ```python
    files = sorted(glob.glob("train-*.tfrecord"))
    dataset = tf.data.Dataset.from_tensor_slices(files).interleave(tf.data.TFRecordDataset)
    dataset = kerasmgpu.cluster.shard(dataset).map(parse).shuffle(10_000).batch(64)
    parallel.fit(dataset, epochs=10)  # global batch: 64 x number of workers
    ```
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"shard() expects a tf.data.Dataset. Received: dataset={dataset!r} of type "
            f"{type(dataset).__name__}"
        )
    options.one_of(policy, "policy", POLICIES)
    if _compat.dataset_op_types(dataset) & set(BATCH_OPS):
        # Sharding batches would give each worker whole global batches in turn: a global
        # batch W times the size asked for, and steps per epoch W times fewer.
        warnings.warn(
            "shard() received a dataset that is batched already. Shard first, then batch "
            "with the local batch size: kerasmgpu.cluster.shard(dataset).batch(local_batch). "
            f"Received: dataset with element_spec {dataset.element_spec}",
            stacklevel=2,
        )
    cluster = worker_lib.current()
    if num_workers is None:
        num_workers = 1 if cluster is None else cluster.num_workers
    if worker_index is None:
        worker_index = 0 if cluster is None else cluster.worker_index
    num_workers = options.whole_number(num_workers, "num_workers", minimum=1)
    worker_index = options.whole_number(
        worker_index, "worker_index", minimum=0, maximum=num_workers - 1
    )
    if cluster is not None:
        worker_lib.set_input("sharded")
    if num_workers == 1:
        return dataset
    if policy == "auto":
        policy = sharding_policy(dataset)
    if policy == "data":
        return dataset.shard(num_workers, worker_index)
    return _shard_files(dataset, num_workers, worker_index)


def sharding_policy(dataset):
    """"file" if `dataset`'s pipeline reads files (see `READER_OPS`), else "data"."""
    return "file" if _reads_files(dataset) else "data"


def _reads_files(dataset):
    return bool(_compat.dataset_op_types(dataset) & set(READER_OPS))


def _shard_files(dataset, num_workers, worker_index):
    return _compat.shard_by_files(dataset, num_workers, worker_index)
