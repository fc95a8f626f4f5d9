"""A training script for the cluster tests, unchanged on one machine or a cluster.

    python tests/cluster/cluster_worker.py OUT_DIR [--epochs N] [--backup DIR] [--slow]
        [--variables central|replicated] [--sync-period H]
        [--optimizer-state full|sharded] [--gradient-dtype float32|bfloat16|float16]
        [--cluster-all-reduce hierarchical|flat]
        [--records DIR [--local-batch L] [--x-loss]]
        [--batchnorm] [--save PATH] [--gans] [--dropout RATE]

Trains the digits MLP through multi_gpu_model on the local devices and writes
OUT_DIR/result_<worker>.npz (weights) and OUT_DIR/result_<worker>.json (history).

With --records (TFRecord files written by zoo.records), the input is sharded: each worker
reads its own files (kerasmgpu.cluster.shard) in local batches of L. Alone, the script
feeds the same global batches: every worker's local batch b, in worker order. With
--x-loss the model's own compute_loss reads the inputs x (which sharded input gathers).
With --save, `parallel.save(PATH)` after training (every worker calls it, the chief
writes). With --batchnorm, an MLP with a synchronized BatchNormalization on 131 samples instead.
With --gans, four models with their own train_step instead (the keras.io DCGAN on the
digits as 8x8 images, WGAN-GP, whose gradient penalty is a gradient of a gradient, the
basic step on a model whose layers add losses, and a GAN with synchronized
BatchNormalization), written as result_<worker>.npz (dcgan_i, wgan_i, losses_i,
batchnorm_i) and .json (their histories).
"""

import argparse
import json
import os
import time

import keras  # noqa: I001
import numpy as np
import tensorflow as tf

import kerasmgpu  # joins the cluster when TF_CONFIG is set: import it first
import zoo
import zoo.records
from kerasmgpu.cluster import sharding


class XLoss(keras.Model):
    """A model whose loss reads its inputs: with sharded input every worker's x is needed."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + 0.1 * keras.ops.mean(x) * keras.ops.mean(keras.ops.square(y_pred))


class Pace(keras.callbacks.Callback):
    """Slows training down and reports progress, so a test can interrupt it mid-way."""

    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {epoch + 1} done", flush=True)

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backup")
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--variables", default="central")
    parser.add_argument("--sync-period", type=int, default=1)
    parser.add_argument("--optimizer-state", default="full")
    parser.add_argument("--gradient-dtype", default="float32")
    parser.add_argument("--save")
    parser.add_argument("--cluster-all-reduce", default="hierarchical")
    parser.add_argument("--records")
    parser.add_argument("--local-batch", type=int, default=32)
    parser.add_argument("--x-loss", action="store_true")
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--gans", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    if args.gans:
        return train_gans(args.out_dir)

    kerasmgpu.comm.CLUSTER_ALL_REDUCE = args.cluster_all_reduce
    keras.utils.set_random_seed(0)  # every worker shuffles the same way
    (x, y), _ = zoo.datasets.load("digits", flatten=True)
    model = zoo.mlp(64, 2, "relu", "sgd", input_dim=x.shape[1], num_classes=10,
                      dropout=args.dropout)
    if args.batchnorm:
        x, y, model = x[:131], y[:131], batchnorm_mlp(x.shape[1])
    if args.x_loss:
        model = XLoss(inputs=model.inputs, outputs=model.outputs)
        model.compile("sgd", "sparse_categorical_crossentropy")
    parallel = kerasmgpu.multi_gpu_model(model, gpus=len(kerasmgpu.visible_devices()),
                                         variables=args.variables,
                                         sync_period=args.sync_period,
                                         optimizer_state=args.optimizer_state,
                                         gradient_dtype=args.gradient_dtype)
    parallel.compile(keras.optimizers.SGD(0.05, momentum=0.9), model.loss, metrics=["accuracy"])
    callbacks = []
    if args.backup:
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup))
    if args.slow:
        callbacks.append(Pace())
    cluster = kerasmgpu.cluster.current()
    record = {}
    if args.records:
        train, test, read = sharded_input(args.records, args.local_batch, x.shape[1])
        history = parallel.fit(train, epochs=args.epochs, callbacks=callbacks, verbose=0)
        record["elements_read"] = int(read.numpy())
        record["evaluate"] = parallel.evaluate(test, return_dict=True, verbose=0)
        record["predict"] = parallel.predict(test, verbose=0).tolist()
    else:
        history = parallel.fit(x, y, batch_size=64, epochs=args.epochs, callbacks=callbacks,
                               verbose=0)
    if args.save:
        parallel.save(args.save)  # every worker calls it; the chief writes
    name = "single" if cluster is None else str(cluster.worker_index)
    np.savez(os.path.join(args.out_dir, f"result_{name}.npz"), *model.get_weights())
    with open(os.path.join(args.out_dir, f"result_{name}.json"), "w") as f:
        json.dump({"history": history.history, "epochs_run": len(history.epoch),
                   "devices": parallel.devices, **record}, f)
    print("finished", flush=True)


def train_gans(out_dir):
    """The DCGAN and WGAN-GP, 1 epoch each in global batches of 32, on every device there
    is (with sharded input, each worker feeds its 16 rows of every global batch)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from tests import custom_step_models as models

    (x, _), _ = zoo.datasets.load("digits", flatten=True)
    images = (x[:96] / max(1.0, float(x.max()))).reshape(-1, 8, 8, 1).astype("float32")
    features = np.random.default_rng(0).normal(size=(96, 6)).astype("float32")
    targets = features[:, :1] * 0.5 + 0.1

    def compile_wgan(model):
        model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))

    def added_losses():
        model = models.AddedLosses()
        model(features[:2])
        return model

    def compile_regression(model):
        model.compile(keras.optimizers.SGD(0.05), loss="mse")

    cluster = kerasmgpu.cluster.current()
    batch = 32
    if cluster is not None and cluster.sharded:
        # Sharded input: each worker's batches are its half of every global batch.
        batch, index = 16, cluster.worker_index

        def shard(array):
            return np.concatenate([array[start + index * batch: start + (index + 1) * batch]
                                   for start in range(0, len(array), 2 * batch)])

        images, features, targets = shard(images), shard(features), shard(targets)
    weights, histories = {}, {}
    for name, make, compile_model, data in (
        ("dcgan", lambda: models.dcgan(blocks=1), models.compile_gan, images),
        ("wgan", models.wgan_gp, compile_wgan, features),
        ("losses", added_losses, compile_regression, (features, targets)),
        ("batchnorm", lambda: models.gan_with_batchnorm(True), models.compile_gan_sgd,
         features),
    ):
        keras.utils.set_random_seed(11)
        model = make()
        parallel = kerasmgpu.multi_gpu_model(model, gpus=len(kerasmgpu.visible_devices()))
        compile_model(parallel)
        data = data if isinstance(data, tuple) else (data,)
        history = parallel.fit(*data, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        histories[name] = history.history
        weights.update({f"{name}_{i}": w for i, w in enumerate(model.get_weights())})
    name = "single" if cluster is None else str(cluster.worker_index)
    np.savez(os.path.join(out_dir, f"result_{name}.npz"), **weights)
    with open(os.path.join(out_dir, f"result_{name}.json"), "w") as f:
        json.dump({"history": histories}, f)
    print("finished", flush=True)


def sharded_input(records, local_batch, features):
    """This worker's training and test batches, and a counter of the samples it reads.

    Alone (no cluster) the global batches of a 2-worker cluster are built from both
    workers' shards, in worker order.
    """
    read = tf.Variable(0, dtype=tf.int64, trainable=False)

    def count(image, label):
        with tf.control_dependencies([read.assign_add(1)]):
            return tf.reshape(image, [features]), tf.identity(label)

    (_, _), (x_test, y_test) = zoo.datasets.load("digits", flatten=True)
    test = tf.data.Dataset.from_tensor_slices((x_test[:101], y_test[:101]))
    if kerasmgpu.cluster.current() is not None:
        train = zoo.records.read(records).map(count).batch(local_batch)
        return train, kerasmgpu.cluster.shard(test).batch(local_batch), read

    def global_batches(shards):
        shards = [s.batch(local_batch) for s in shards]
        steps = max(int(s.cardinality()) for s in shards)
        shards = [sharding.pad_to(s, int(s.cardinality()), steps) for s in shards]
        return tf.data.Dataset.zip(tuple(shards)).map(
            lambda a, b: tuple(tf.concat([p, q], 0) for p, q in zip(a, b))
        )

    train = global_batches([zoo.records.read(records, num_workers=2, worker_index=w)
                            for w in range(2)]).map(
        lambda image, label: (tf.reshape(image, [-1, features]), label)
    )
    test = global_batches([kerasmgpu.cluster.shard(test, num_workers=2, worker_index=w)
                           for w in range(2)])
    return train, test, read


def batchnorm_mlp(features):
    """Dense, synchronized BatchNormalization, softmax.

    In batches of 64 (64, 64, 3), the last batch's shares are 2 and 1 rows: on 2 workers
    of 2 devices, worker 0 runs two replicas and worker 1 one.
    """
    inputs = keras.Input((features,))
    hidden = keras.layers.Dense(16)(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5, synchronized=True)(hidden)
    hidden = keras.layers.Activation("relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    model.compile("sgd", "sparse_categorical_crossentropy")
    return model


if __name__ == "__main__":
    main()
