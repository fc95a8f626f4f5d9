"""Synchronized BatchNormalization equals one device; plain BatchNormalization does not.

Each case trains a template wrapped on N devices and an identical model on one device
with plain Keras, and compares every weight, moving statistics included. (Templates
with their own train_step: tests/test_custom_steps.py.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from kerasmgpu import _compat
from tests.helpers import max_weight_difference, twin

RNG = np.random.default_rng(11)
# 36 samples in batches of 11: 11, 11, 11 and a short last batch of 3.
X = (RNG.normal(size=(36, 6)) * 3.0 + 1.0).astype("float32")
Y = RNG.integers(0, 3, size=36)
IMAGES = RNG.normal(size=(20, 8, 8, 3)).astype("float32")
IMAGE_LABELS = RNG.integers(0, 4, size=20)


def dense_bn(synchronized):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8)(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5, synchronized=synchronized)(hidden)
    hidden = keras.layers.Activation("relu")(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


def conv_bn():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden)
    hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.Conv2D(4, 3, strides=2)(hidden)
    hidden = keras.layers.BatchNormalization(momentum=0.5, center=False)(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(4, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


def masked_bn():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((5, 3))
    hidden = keras.layers.Masking(mask_value=0.0)(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5, synchronized=True)(hidden)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(2, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


def train_pair(reference, n, x, y, batch_size, **wrap):
    template = twin(reference)
    reference.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                      jit_compile=False)
    parallel = kerasmgpu.ParallelModel(template, devices=n, **wrap)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    for model in (reference, parallel):
        model.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0)
    return template


@pytest.mark.parametrize("n", [2, 3, 4])
def test_synchronized_layer_trains_as_on_one_device(n):
    # Uneven slices (11 rows: 6/5, 4/4/3, 3/3/3/2) and a short last batch of 3 (2/1,
    # 1/1/1, and for N = 4 a single replica: batch < N).
    reference = dense_bn(synchronized=True)
    template = train_pair(reference, n, X, Y, batch_size=11)
    assert max_weight_difference(reference, template) < 1e-5


def test_plain_layer_differs_from_one_device_and_sync_batchnorm_matches():
    reference = dense_bn(synchronized=False)
    plain = train_pair(twin(reference), 3, X, Y, batch_size=11)
    synced = train_pair(reference, 3, X, Y, batch_size=11, sync_batchnorm=True)
    assert max_weight_difference(reference, plain) > 1e-3
    assert max_weight_difference(reference, synced) < 1e-5


@pytest.mark.parametrize("n", [2, 3])
def test_conv_batchnorm_with_sync_batchnorm_trains_as_on_one_device(n):
    # 20 images in batches of 7: slices of 4/3 or 3/2/2, last batch of 6.
    reference = conv_bn()
    template = train_pair(reference, n, IMAGES, IMAGE_LABELS, batch_size=7,
                          sync_batchnorm=True)
    assert max_weight_difference(reference, template) < 1e-5
    for layer in template.layers:  # the template itself is unchanged
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.synchronized and "_moments" not in vars(layer)


def test_masked_synchronized_batchnorm_trains_as_on_one_device():
    x = RNG.normal(size=(18, 5, 3)).astype("float32")
    x[RNG.random((18, 5)) < 0.4] = 0.0  # masked time steps, unevenly over the slices
    y = RNG.integers(0, 2, size=18)
    reference = masked_bn()
    template = train_pair(reference, 3, x, y, batch_size=9)
    assert max_weight_difference(reference, template) < 1e-5


def test_mobilenet_v2_with_sync_batchnorm_trains_as_on_one_device():
    # A small learning rate: at 0.1 this untrained network amplifies float rounding so
    # much that two one-device Keras runs computing the same statistics in two ways
    # (Keras' one-pass synchronized moments, tf.nn.moments) differ by 9e-4 after a step.
    # Per-slice statistics differ from one device by ~2.6 here.
    keras.utils.set_random_seed(5)
    reference = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4
    )
    template = twin(reference)
    rng = np.random.default_rng(11)
    images = rng.normal(size=(8, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 4, size=8)
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2, sync_batchnorm=True)
    for model in (reference, parallel):
        model.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy",
                      jit_compile=False if model is reference else "auto")
        model.train_on_batch(images, labels)
    difference = max_weight_difference(reference, template)
    assert difference < 1e-5, difference


def test_synchronized_batchnorm_run_eagerly_is_a_clear_error():
    parallel = kerasmgpu.multi_gpu_model(dense_bn(synchronized=True), gpus=2)
    parallel.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True)
    with pytest.raises(ValueError, match="run_eagerly=False"):
        parallel.train_on_batch(X[:8], Y[:8])


def test_statistics_are_summed_by_v2_collectives_with_the_gradients_timeout():
    # The V1 op has no timeout: a dead peer could hang the step. Every statistics sum
    # must be the V2 op, with the timeout of the workers' collectives (set here by hand:
    # on one machine there is none).
    template = dense_bn(synchronized=True)
    parallel = kerasmgpu.ParallelModel(template, devices=2)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    parallel._batchnorm.workers.timeout_seconds = 7.0
    data = (tf.constant(X[:8]), tf.constant(Y[:8]))
    _compat.build_for_batch(parallel, data)
    graph = tf.function(parallel.train_step).get_concrete_function(data).graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    reduces = [n for n in nodes if n.op.startswith("CollectiveReduce")]
    # Per replica: two sums forward (mean, variance), one backward.
    assert [n.op for n in reduces] == ["CollectiveReduceV2"] * 6
    assert {n.attr["timeout_seconds"].f for n in reduces} == {7.0}
    # ... each ordered on its device by a token (no token: chained across devices).
    assert all(len([i for i in n.input if not i.startswith("^")]) == 5 for n in reduces)
