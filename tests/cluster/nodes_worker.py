"""The training script of the tests of several nodes, Slurm, TFJob and restarts.

    python tests/cluster/nodes_worker.py OUT_DIR [--epochs N] [--sharded] [--backup DIR]
        [--kill-worker I --kill-marker PATH] [--save]

The same script runs alone, under `kerasmgpu launch` (one node or several), as the tasks
of a Slurm step and as the pods of a TFJob: it only imports kerasmgpu first. It trains a
small MLP on 512 digits in global batches of 64, without shuffling (so that a run resumed
from a backup follows the uninterrupted one step for step), and writes
OUT_DIR/result_<worker>.npz (weights) and .json (epochs run, devices), <worker> being
the worker index or "single".

--sharded: each worker reads its own elements (`kerasmgpu.cluster.shard`) in local batches
of 64 / W; global batch b is then samples 64b .. 64b+63, as alone.
--kill-worker I: worker I kills itself with SIGKILL in the middle of epoch 2 (after its
4th batch), once: PATH records that it happened.
--save: `parallel.save(OUT_DIR/model_<task>.keras)` on every worker, <task> the
TF_CONFIG task ("chief0", "worker1") or "single": only the chief's call writes.
"""

import argparse
import json
import os
import signal

import keras  # noqa: I001
import numpy as np
import tensorflow as tf

import kerasmgpu  # joins the cluster the environment describes: import it first
import zoo

SAMPLES = 512
GLOBAL_BATCH = 64


class KillMidEpoch(keras.callbacks.Callback):
    """SIGKILL this worker after batch 4 of epoch 2, once (a marker file remembers)."""

    def __init__(self, marker):
        super().__init__()
        self.marker = marker
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 3 and not os.path.exists(self.marker):
            with open(self.marker, "w") as marker:
                marker.write(f"killed in epoch {self.epoch + 1}, after batch {batch + 1}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--backup")
    parser.add_argument("--kill-worker", type=int)
    parser.add_argument("--kill-marker")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)  # the same initial weights everywhere
    (x, y), _ = zoo.datasets.load("digits", flatten=True)
    x, y = x[:SAMPLES], y[:SAMPLES]
    model = zoo.mlp(32, 1, "relu", "sgd", input_dim=x.shape[1], num_classes=10, dropout=0.0)
    parallel = kerasmgpu.multi_gpu_model(model, gpus=len(kerasmgpu.visible_devices()))
    parallel.compile(keras.optimizers.SGD(0.05, momentum=0.9), model.loss)
    cluster = kerasmgpu.cluster.current()
    index = None if cluster is None else cluster.worker_index
    callbacks = []
    if args.backup:
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup))
    if args.kill_worker is not None and index == args.kill_worker:
        callbacks.append(KillMidEpoch(args.kill_marker))
    if args.sharded and cluster is not None:
        data = tf.data.Dataset.from_tensor_slices((x, y))
        local = kerasmgpu.cluster.shard(data).batch(GLOBAL_BATCH // cluster.num_workers)
        history = parallel.fit(local, epochs=args.epochs, shuffle=False, callbacks=callbacks,
                               verbose=0)
    else:
        history = parallel.fit(x, y, batch_size=GLOBAL_BATCH, epochs=args.epochs,
                               shuffle=False, callbacks=callbacks, verbose=0)
    if args.save:
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task")
        name = "single" if task is None else f"{task['type']}{task['index']}"
        parallel.save(os.path.join(args.out_dir, f"model_{name}.keras"))
    name = "single" if index is None else str(index)
    np.savez(os.path.join(args.out_dir, f"result_{name}.npz"), *model.get_weights())
    with open(os.path.join(args.out_dir, f"result_{name}.json"), "w") as f:
        json.dump({"epochs_run": len(history.epoch), "devices": parallel.devices,
                   "workers": None if cluster is None else cluster.workers,
                   "restart": os.environ.get("KERASMGPU_RESTART")}, f)
    print(f"finished: {len(history.epoch)} epochs", flush=True)


if __name__ == "__main__":
    main()
