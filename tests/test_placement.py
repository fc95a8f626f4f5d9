"""Each replica's forward *and backward* pass is placed on its own device.

Read from the traced training graph and the functions it calls (the run-time
replica-count switch, the replica program and its backward function, whose ops run on the
device of the call): backward ops are those of a gradient tape or of a backward function.
With one tape around all replicas, or a replica program called without its device, they
would all sit on a single device, and these tests would fail.
"""

import collections

import keras
import pytest
import tensorflow as tf

import kerasmgpu
from tests.helpers import placed_ops

BACKWARD_OPS = {"MatMul", "Conv2DBackpropFilter", "Conv2DBackpropInput", "BiasAddGrad"}


def _all_nodes(concrete_function):
    return placed_ops(concrete_function.graph.as_graph_def())


def _short(device):
    return device.split("device:")[-1] if device else "(unplaced)"


def _traced_train_step(template, gpus, batch, input_shape):
    parallel = kerasmgpu.multi_gpu_model(template, gpus=gpus)
    parallel.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    parallel.optimizer.build(parallel.trainable_variables)
    signature = (
        tf.TensorSpec((batch,) + input_shape, tf.float32),
        tf.TensorSpec((batch,), tf.int64),
    )
    return _all_nodes(tf.function(parallel.train_step).get_concrete_function(signature))


def _backward_devices(nodes, op_types):
    found = collections.defaultdict(set)
    for node in nodes:
        if node.backward and node.op in op_types:
            found[node.op].add(_short(node.device))
    return found


def _mlp():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


def _convnet():
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    hidden = keras.layers.Flatten()(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


@pytest.mark.parametrize("batch", [12, None], ids=["static-batch", "dynamic-batch"])
def test_each_replica_runs_its_backward_pass_on_its_own_device(batch):
    nodes = _traced_train_step(_mlp(), 4, batch, (8,))
    found = _backward_devices(nodes, {"MatMul", "BiasAddGrad"})
    for op_type in ("MatMul", "BiasAddGrad"):
        assert found[op_type] == {"CPU:0", "CPU:1", "CPU:2", "CPU:3"}, (op_type, found[op_type])


def test_convolution_gradients_run_on_every_replica_device():
    nodes = _traced_train_step(_convnet(), [1, 3], 6, (8, 8, 3))
    found = _backward_devices(nodes, {"Conv2DBackpropFilter"})
    assert found["Conv2DBackpropFilter"] == {"CPU:1", "CPU:3"}


def test_each_replica_runs_its_forward_pass_on_its_own_device():
    nodes = _traced_train_step(_convnet(), [1, 3], 6, (8, 8, 3))
    forward = {_short(n.device) for n in nodes
               if n.op == "Conv2D" and not n.backward}
    assert forward == {"CPU:1", "CPU:3"}


def test_outputs_are_merged_on_the_cpu():
    nodes = _traced_train_step(_mlp(), [2, 3], 6, (8,))
    concat = [n for n in nodes if n.op == "ConcatV2" and not n.backward]
    assert concat and all(_short(n.device) == "CPU:0" for n in concat)
