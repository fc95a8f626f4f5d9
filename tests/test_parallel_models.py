"""Kinds of models users wrap: each trains like one device (or, with BatchNorm, sensibly)."""

import keras
import numpy as np
import pytest

import kerasmgpu
from tests.helpers import max_weight_difference, twin

RNG = np.random.default_rng(2)


def _compare(template, x, y, loss, batch=7, steps=3, gpus=3, loss_weights=None, atol=1e-5):
    """Train `template` wrapped and a twin on one device; weights and logs must agree."""
    reference = twin(template)
    reference.compile(keras.optimizers.SGD(0.05), loss=loss, loss_weights=loss_weights,
                      jit_compile=False)
    parallel = kerasmgpu.multi_gpu_model(template, gpus=gpus)
    parallel.compile(keras.optimizers.SGD(0.05), loss=loss, loss_weights=loss_weights)
    count = batch * steps
    take = lambda data: keras.tree.map_structure(lambda a: a[:count], data)  # noqa: E731
    logs = [
        model.fit(take(x), take(y), batch_size=batch, shuffle=False, verbose=0).history
        for model in (reference, parallel)
    ]
    assert max_weight_difference(reference, template) < atol
    assert logs[0].keys() == logs[1].keys()
    for key in logs[0]:
        np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-4, err_msg=key)
    return reference, parallel


def test_sequential():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    _compare(model, RNG.normal(size=(30, 6)), RNG.normal(size=(30, 1)), "mse")


def test_functional_multi_input_multi_output_keeps_output_names():
    keras.utils.set_random_seed(0)
    image = keras.Input((5,), name="image")
    meta = keras.Input((3,), name="meta")
    joint = keras.layers.Concatenate()([keras.layers.Dense(4)(image), meta])
    score = keras.layers.Dense(1, name="score")(joint)
    label = keras.layers.Dense(2, activation="softmax", name="label")(joint)
    model = keras.Model([image, meta], [score, label])
    x = [RNG.normal(size=(30, 5)), RNG.normal(size=(30, 3))]
    y = [RNG.normal(size=(30, 1)), RNG.integers(0, 2, size=30)]
    _, parallel = _compare(model, x, y, ["mse", "sparse_categorical_crossentropy"],
                           loss_weights=[0.3, 1.0])
    assert parallel.output_names == ["score", "label"]
    history = parallel.fit(x, y, batch_size=10, verbose=0).history
    assert {"score_loss", "label_loss"} <= set(history)


def test_dict_inputs_and_dict_outputs():
    keras.utils.set_random_seed(0)
    inputs = {"a": keras.Input((4,), name="a"), "b": keras.Input((2,), name="b")}
    joint = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    outputs = {"left": keras.layers.Dense(1, name="left")(joint),
               "right": keras.layers.Dense(3, activation="softmax", name="right")(joint)}
    model = keras.Model(inputs, outputs)
    x = {"a": RNG.normal(size=(30, 4)), "b": RNG.normal(size=(30, 2))}
    y = {"left": RNG.normal(size=(30, 1)), "right": RNG.integers(0, 3, size=30)}
    _, parallel = _compare(model, x, y, {"left": "mse", "right": "sparse_categorical_crossentropy"})
    predictions = parallel.predict(x, verbose=0)
    assert set(predictions) == {"left", "right"}
    assert predictions["right"].shape == (30, 3)


def test_shared_layer_used_twice_siamese():
    keras.utils.set_random_seed(0)
    encoder = keras.layers.Dense(4, activation="tanh", name="shared_encoder")
    left, right = keras.Input((6,)), keras.Input((6,))
    distance = keras.layers.Subtract()([encoder(left), encoder(right)])
    model = keras.Model([left, right], keras.layers.Dense(1, activation="sigmoid")(distance))
    x = [RNG.normal(size=(30, 6)), RNG.normal(size=(30, 6))]
    _compare(model, x, RNG.integers(0, 2, size=(30, 1)).astype("float32"), "binary_crossentropy")


def test_nested_model():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="relu")],
                             name="inner")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inner(inputs)))
    _compare(model, RNG.normal(size=(30, 5)), RNG.integers(0, 2, size=30),
             "sparse_categorical_crossentropy")


def test_rnn_with_an_initial_state_input():
    keras.utils.set_random_seed(0)
    sequence = keras.Input((4, 3), name="sequence")
    state = keras.Input((5,), name="initial_state")
    hidden = keras.layers.GRU(5)(sequence, initial_state=state)
    model = keras.Model([sequence, state], keras.layers.Dense(1)(hidden))
    x = [RNG.normal(size=(30, 4, 3)), RNG.normal(size=(30, 5))]
    _compare(model, x, RNG.normal(size=(30, 1)), "mse")


def test_masked_sequence_loss_is_exact():
    # Keras applies a mask carried by the outputs to the loss; merged outputs carry it too.
    keras.utils.set_random_seed(0)
    tokens = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, mask_zero=True)(tokens)
    hidden = keras.layers.LSTM(3, return_sequences=True)(embedded)
    model = keras.Model(tokens, keras.layers.Dense(1)(hidden))
    x = RNG.integers(0, 10, size=(30, 5))
    x[:, 3:] = 0  # padding
    _compare(model, x, RNG.normal(size=(30, 5, 1)), "mse")


def test_keras_applications_model_built_without_weights():
    keras.utils.set_random_seed(0)
    template = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4,
                                              alpha=0.35)
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy",
                     metrics=["accuracy"])
    x = RNG.normal(size=(12, 32, 32, 3)).astype("float32")
    y = RNG.integers(0, 4, size=12)
    before = [w.copy() for w in template.get_weights()]
    history = parallel.fit(x, y, batch_size=6, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert max(np.abs(a - b).max() for a, b in zip(before, template.get_weights())) > 0
    np.testing.assert_allclose(parallel.predict(x, verbose=0), template.predict(x, verbose=0),
                               atol=1e-5)


def test_keras2_docstring_example_runs_unchanged_apart_from_the_import(tmp_path, monkeypatch):
    # The Keras 2.x `multi_gpu_model` docstring example, at a size this machine trains in
    # seconds (Xception's smallest input; 2 devices instead of 8).
    monkeypatch.chdir(tmp_path)
    import tensorflow as tf
    from keras.applications import Xception

    from kerasmgpu import multi_gpu_model

    num_samples = 8
    height = 71
    width = 71
    num_classes = 10

    with tf.device("/cpu:0"):
        model = Xception(weights=None, input_shape=(height, width, 3), classes=num_classes)

    parallel_model = multi_gpu_model(model, gpus=2)
    parallel_model.compile(loss="categorical_crossentropy", optimizer="rmsprop")

    x = np.random.random((num_samples, height, width, 3))
    y = np.random.random((num_samples, num_classes))
    parallel_model.fit(x, y, epochs=1, batch_size=4)

    model.save("my_model.keras")
    assert keras.saving.load_model("my_model.keras").count_params() == model.count_params()


@pytest.mark.parametrize("gpus", [2, 4])
def test_activity_regularization_is_counted_per_sample_not_per_replica(gpus):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activity_regularizer=keras.regularizers.L1(0.01))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    _compare(model, RNG.normal(size=(30, 6)), RNG.normal(size=(30, 1)), "mse", gpus=gpus, batch=9)


def test_a_loss_that_reads_softmax_probabilities_rather_than_logits():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    targets = keras.utils.to_categorical(RNG.integers(0, 4, size=30), 4)
    _compare(model, RNG.normal(size=(30, 6)), targets, "mse")


def test_an_output_without_a_loss_is_left_out_of_the_backward_pass():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    trained = keras.layers.Dense(1, name="trained")(hidden)
    ignored = keras.layers.Dense(2, activation="softmax", name="ignored")(hidden)
    model = keras.Model(inputs, {"trained": trained, "ignored": ignored})
    _compare(model, RNG.normal(size=(30, 6)), {"trained": RNG.normal(size=(30, 1))},
             {"trained": "mse"})
