"""One replica program: traced once whatever the number of devices, XLA per device.

The program's Python traces are counted (no timing); the XLA tests compare N devices
with one device compiled by XLA, and read where each replica's XLA program runs from the
partition graphs TensorFlow executes.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from kerasmgpu import _compat

STEPS = 5


def _convnet(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(8, activation="tanh")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


def _data(samples=40, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 6, 6, 2)).astype("float32")
    return x, rng.integers(0, 3, samples).astype("int32")


@pytest.mark.parametrize("devices", [2, 4])
def test_the_replica_program_is_traced_once_whatever_the_number_of_devices(devices):
    parallel = kerasmgpu.multi_gpu_model(_convnet(), gpus=devices)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                     jit_compile=False)
    x, y = _data(samples=11)  # batches of 8 and 3: both replica counts when 3 < devices
    parallel.fit(x, y, batch_size=8, epochs=2, verbose=0)
    parallel.evaluate(x, y, batch_size=8, verbose=0)
    # fit and evaluate trace their step once, for any batch size: one trace of the
    # program for training (every replica, both replica counts) and one for inference,
    # whatever N. (Keras' predict traces its step per batch shape; the program follows
    # the step's shapes, so there it is traced per slice size: two at most per shape.)
    assert parallel.replica_program(training=True).traces == 1
    assert parallel.replica_program(training=False).traces == 1



@pytest.mark.parametrize("data", ["arrays", "dataset"])
def test_fit_traces_its_step_once_with_optimizer_state_and_metrics(data):
    """Adam's slots and the compiled metrics are built before the step is traced: built
    during the trace, their variables would make TensorFlow trace the whole step (every
    replica) a second time. The metrics still equal one device's."""
    x, y = _data(samples=11)
    inputs = (x, y) if data == "arrays" else (
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8),)
    batching = {"batch_size": 8} if data == "arrays" else {}
    expected = _convnet()
    expected.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    expected_history = expected.fit(*inputs, epochs=1, shuffle=False, verbose=0, **batching)

    parallel = kerasmgpu.multi_gpu_model(_convnet(), gpus=2)
    parallel.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                     jit_compile=False)
    traced = []
    step = parallel.train_step
    parallel.train_step = lambda data: traced.append(1) or step(data)
    history = parallel.fit(*inputs, epochs=1, shuffle=False, verbose=0, **batching)
    assert len(traced) == 1
    assert parallel.replica_program(training=True).traces == 1
    assert len(parallel.optimizer.variables) > 2  # slots for every weight, as Keras builds
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(history.history[name], expected_history.history[name],
                                   rtol=1e-5)

def test_synchronized_batchnorm_traces_each_replica():
    """The one case that cannot share a program (see kerasmgpu.tower)."""
    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization(synchronized=True)(keras.layers.Dense(4)(inputs))
    parallel = kerasmgpu.multi_gpu_model(
        keras.Model(inputs, keras.layers.Dense(2)(hidden)), gpus=2
    )
    parallel.compile("sgd", "mse", jit_compile=False)
    # A batch of known size: one branch, both replicas (each traced into the step).
    parallel.train_on_batch(np.ones((8, 4), "float32"), np.ones((8, 2), "float32"))
    assert parallel.replica_program(training=True).traces == 2
    with pytest.raises(ValueError, match="synchronized BatchNormalization"):
        parallel.compile("sgd", "mse", jit_compile=True)


@pytest.fixture(scope="module")
def one_device_with_xla():
    """Weights after STEPS steps of plain Keras compiled with XLA, and the data."""
    model = _convnet()
    initial = model.get_weights()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                  jit_compile=True)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return initial, model.get_weights(), model.predict(x, batch_size=8, verbose=0), (x, y)


@pytest.mark.parametrize("devices", [2, 4])
def test_xla_on_every_replica_equals_one_device_with_xla(one_device_with_xla, devices):
    initial, expected, expected_predictions, (x, y) = one_device_with_xla
    template = _convnet(seed=7)
    template.set_weights(initial)
    parallel = kerasmgpu.multi_gpu_model(template, gpus=devices)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                     jit_compile=True)
    assert parallel.replica_jit_compile is True
    assert parallel.jit_compile is False  # the step itself is never one XLA program
    parallel.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert len(x) // 8 == STEPS
    for got, want in zip(template.get_weights(), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(
        parallel.predict(x, batch_size=8, verbose=0), expected_predictions, atol=1e-5
    )


def test_each_replica_xla_program_runs_on_its_device():
    parallel = kerasmgpu.multi_gpu_model(_convnet(), gpus=[1, 3])
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                     jit_compile=True)
    parallel.optimizer.build(parallel.trainable_variables)
    x, y = _data(samples=6)
    step = tf.function(parallel.train_step)
    data = (tf.constant(x), tf.constant(y))
    step.get_concrete_function(data)
    collected = []
    with _compat.run_metadata(collected):
        step(data)
    # What ran: the partition graphs of the step. A call XLA must compile runs as one
    # XLA program on the call's device.
    compiled = sorted(
        (node.name.split("/")[0], node.device.split("device:")[-1])
        for function_graphs in collected[0].function_graphs
        for partition in function_graphs.partition_graphs
        for node in partition.node if node.attr["_XlaMustCompile"].b
    )
    # Each replica's forward and backward program on its own device; nothing else of the
    # step is compiled.
    assert compiled == [
        ("replica_0", "CPU:1"), ("replica_0_backward", "CPU:1"),
        ("replica_1", "CPU:3"), ("replica_1_backward", "CPU:3"),
    ], compiled


def test_auto_resolves_as_keras_does_for_one_device_of_that_kind():
    parallel = kerasmgpu.multi_gpu_model(_convnet(), gpus=2)
    parallel.compile("sgd", "sparse_categorical_crossentropy")  # jit_compile="auto"
    # Keras turns XLA off on a machine without GPUs; these replicas are CPU devices.
    assert parallel.replica_jit_compile is False and parallel.jit_compile is False
    with pytest.raises(ValueError, match="jit_compile must be True, False or 'auto'"):
        parallel.compile("sgd", "sparse_categorical_crossentropy", jit_compile="xla")
