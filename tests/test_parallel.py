"""ParallelModel / multi_gpu_model: exactness against one device, models, data, errors."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from tests.helpers import dense_classifier, max_weight_difference, twin

RNG = np.random.default_rng(0)
X = RNG.normal(size=(61, 8)).astype("float32")
Y = RNG.integers(0, 3, size=61)
SAMPLE_WEIGHT = RNG.uniform(0.1, 2.0, size=61).astype("float32")


def _optimizer(name):
    if name == "sgd":
        return keras.optimizers.SGD(0.1, momentum=0.9)
    return keras.optimizers.Adam(0.01)


def _train_both(template, n, optimizer, steps=5, batch=13, **fit_kwargs):
    reference = twin(template)
    reference.compile(_optimizer(optimizer), "sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=False)
    parallel = kerasmgpu.ParallelModel(template, devices=list(range(n)))
    parallel.compile(_optimizer(optimizer), "sparse_categorical_crossentropy",
                     metrics=["accuracy"])
    histories = []
    for model in (reference, parallel):
        histories.append(model.fit(
            X[: steps * batch], Y[: steps * batch], batch_size=batch, epochs=1,
            shuffle=False, verbose=0, **fit_kwargs,
        ).history)
    return reference, parallel, histories


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_equals_one_device_on_the_whole_batch(n, optimizer):
    # 13 samples per batch do not divide over 2, 3 or 4 replicas; sample weights and an L2
    # kernel regularizer take part in the loss.
    template = dense_classifier(regularizer=keras.regularizers.L2(0.01))
    reference, parallel, (ref_history, par_history) = _train_both(
        template, n, optimizer, sample_weight=SAMPLE_WEIGHT[:65]
    )
    assert parallel.template is template
    assert max_weight_difference(reference, template) < 1e-5
    np.testing.assert_allclose(par_history["loss"], ref_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(par_history["accuracy"], ref_history["accuracy"])


def test_template_weights_change_and_are_the_parallel_models_weights():
    template = dense_classifier()
    before = [w.copy() for w in template.get_weights()]
    _train_both(template, 2, "sgd", steps=2)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, template.get_weights()))


def test_short_last_batch_and_batches_smaller_than_the_device_count():
    # 61 samples at batch 20 leave a last batch of 1 for 4 devices; batch 2 < 4 devices.
    template = dense_classifier()
    guard = keras.Sequential([keras.Input((8,)), _NonEmptyBatch(), template])
    reference = twin(template)
    reference.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                      jit_compile=False)
    parallel = kerasmgpu.multi_gpu_model(guard, gpus=4)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    for batch in (20, 2):
        reference.fit(X, Y, batch_size=batch, shuffle=False, verbose=0)
        parallel.fit(X, Y, batch_size=batch, shuffle=False, verbose=0)
    assert max_weight_difference(reference, template) < 1e-5
    assert parallel.predict(X[:3], verbose=0).shape == (3, 3)
    assert parallel.predict_on_batch(X[:1]).shape == (1, 3)


class _NonEmptyBatch(keras.layers.Layer):
    """Fails the step if a replica ever receives an empty slice."""

    def call(self, x):
        tf.debugging.assert_greater(tf.shape(x)[0], 0, message="empty replica slice")
        return x


def test_evaluate_and_predict_equal_one_device():
    template = dense_classifier()
    reference = twin(template)
    reference.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    parallel = kerasmgpu.multi_gpu_model(template, gpus=3)
    parallel.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    np.testing.assert_allclose(
        parallel.evaluate(X, Y, batch_size=16, verbose=0),
        reference.evaluate(X, Y, batch_size=16, verbose=0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        parallel.predict(X, batch_size=16, verbose=0),
        reference.predict(X, batch_size=16, verbose=0),
        atol=1e-6,
    )


def test_on_batch_methods():
    template = dense_classifier()
    reference = twin(template)
    reference.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=False)
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                     metrics=["accuracy"])
    for model in (reference, parallel):
        model.train_on_batch(X[:11], Y[:11])
    np.testing.assert_allclose(
        parallel.test_on_batch(X[:11], Y[:11]), reference.test_on_batch(X[:11], Y[:11]), rtol=1e-5
    )
    np.testing.assert_allclose(
        parallel.predict_on_batch(X[:5]), reference.predict_on_batch(X[:5]), atol=1e-6
    )


def test_class_weights_are_honoured():
    template = dense_classifier()
    reference, _, (ref_history, par_history) = _train_both(
        template, 2, "sgd", steps=3, class_weight={0: 0.2, 1: 1.0, 2: 3.0}
    )
    assert max_weight_difference(reference, template) < 1e-5
    np.testing.assert_allclose(par_history["loss"], ref_history["loss"], rtol=1e-5)


def test_tf_data_and_pydataset_inputs_with_callbacks_and_validation():
    template = dense_classifier()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(10)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return X[index * 10: index * 10 + 10], Y[index * 10: index * 10 + 10]

    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs))
    history = parallel.fit(dataset, epochs=2, validation_data=Batches(), callbacks=[record],
                           verbose=0)
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(seen) == 2 and "val_accuracy" in seen[-1]
    parallel.fit(Batches(), epochs=1, verbose=0)
    assert parallel.evaluate(Batches(), verbose=0)[0] > 0


def test_batch_normalization_gets_one_update_from_the_replicas():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16)(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    template = keras.Model(inputs, outputs)
    reference = twin(template)
    reference.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy",
                      jit_compile=False)
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    for model in (reference, parallel):
        model.fit(X[:48], Y[:48], batch_size=16, shuffle=False, verbose=0)
    bn_ref = reference.layers[2]
    bn_par = template.layers[2]
    # The moving mean is the exact size-weighted mean of the replicas' updates; the moving
    # variance misses only the spread between the slices' means, so it is close.
    np.testing.assert_allclose(bn_par.moving_mean.numpy(), bn_ref.moving_mean.numpy(), atol=2e-3)
    np.testing.assert_allclose(bn_par.moving_variance.numpy(), bn_ref.moving_variance.numpy(),
                               rtol=0.15)


def test_replicas_draw_different_dropout_masks():
    template = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5),
                                 keras.layers.Dense(1, use_bias=False, kernel_initializer="ones",
                                                    trainable=False)])
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile("sgd", "mse")
    x = tf.ones((4, 64))
    outputs = tf.function(
        lambda: [t.outputs for t in parallel._forward_towers(x, 2, tf.constant(4), training=True)]
    )()
    y_pred = np.concatenate([o.numpy() for o in outputs]).ravel()
    # Replica 0 holds rows 0-1, replica 1 rows 2-3: equal masks would give equal rows.
    assert y_pred[0] != y_pred[2] or y_pred[1] != y_pred[3]


def test_jit_compile_is_resolved_so_xla_never_spans_devices():
    parallel = kerasmgpu.multi_gpu_model(dense_classifier(), gpus=2)
    parallel.compile("sgd", "sparse_categorical_crossentropy")
    assert parallel.jit_compile is False
    # XLA per replica program (tests/test_tower.py), never for the step around them.
    parallel.compile("sgd", "sparse_categorical_crossentropy", jit_compile=True)
    assert parallel.jit_compile is False and parallel.replica_jit_compile is True
    single = kerasmgpu.ParallelModel(dense_classifier(), devices=[0])
    single.compile("sgd", "sparse_categorical_crossentropy", jit_compile=False)
    assert single.jit_compile is False


def test_outputs_merge_on_the_cpu_or_on_the_first_device():
    on_cpu = kerasmgpu.multi_gpu_model(dense_classifier(), gpus=[2, 3])
    assert on_cpu.merge_device == "/device:CPU:0"
    on_device = kerasmgpu.multi_gpu_model(dense_classifier(), gpus=[2, 3], cpu_merge=False)
    assert on_device.merge_device == "/device:CPU:2"
    np.testing.assert_allclose(on_cpu.predict(X, verbose=0), on_device.predict(X, verbose=0),
                               atol=1e-6)


def test_cpu_relocation_moves_the_users_template_and_trains_it():
    with tf.device("/device:CPU:1"):
        template = dense_classifier()
    assert all(v.value.device.endswith("CPU:1") for v in template.variables)
    before = template.get_weights()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2, cpu_relocation=True)
    assert parallel.template is template
    assert all(v.value.device.endswith("CPU:0") for v in template.variables)
    for a, b in zip(before, template.get_weights()):
        np.testing.assert_array_equal(a, b)
    parallel.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    parallel.fit(X, Y, batch_size=16, verbose=0)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, template.get_weights()))


def test_calling_the_parallel_model_runs_the_towers():
    template = dense_classifier()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=4)
    np.testing.assert_allclose(parallel(X[:10]), template(X[:10]), atol=1e-6)
    assert parallel.devices == kerasmgpu.visible_devices()


# ------------------------------------------------------------------------ errors
def test_wrapping_something_that_is_not_a_model_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects a keras.Model.*Received: model=.*Dense"):
        kerasmgpu.multi_gpu_model(keras.layers.Dense(3), gpus=2)
    with pytest.raises(ValueError, match="Received: model='model.keras'"):
        kerasmgpu.multi_gpu_model("model.keras", gpus=2)


def test_wrapping_an_unbuilt_model_is_a_clear_error():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="is not built"):
        kerasmgpu.multi_gpu_model(model, gpus=2)


def test_a_fixed_batch_size_is_a_clear_error_at_wrap_time():
    inputs = keras.Input(batch_shape=(32, 8), name="fixed")
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    expected = r"fixed batch size.*\(32, 8\).*keras.Input\(shape=\.\.\.\)"
    with pytest.raises(ValueError, match=expected):
        kerasmgpu.multi_gpu_model(model, gpus=2)


def test_a_stateful_rnn_is_a_clear_error_at_wrap_time():
    inputs = keras.Input(batch_shape=(4, 5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = keras.Model(inputs, keras.layers.LSTM(2, stateful=True)(inputs))
    with pytest.raises(ValueError, match="fixed batch size|stateful"):
        kerasmgpu.multi_gpu_model(model, gpus=2)


def test_wrapping_a_parallel_model_again_is_a_clear_error():
    parallel = kerasmgpu.multi_gpu_model(dense_classifier(), gpus=2)
    with pytest.raises(ValueError, match="already a ParallelModel"):
        kerasmgpu.multi_gpu_model(parallel, gpus=2)


def test_a_batch_size_unknown_at_trace_time_traces_two_branches(monkeypatch):
    # fit traces with an unknown batch size: one branch for N replicas and one for a batch
    # smaller than N (one replica), whatever N is, so the first epoch does not pay for
    # tracing a branch per replica count.
    template = dense_classifier()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=4)
    parallel.compile("sgd", "sparse_categorical_crossentropy")
    traced = []
    forward = parallel._forward_towers

    def recording(x, num_replicas, batch_size, training):
        traced.append(num_replicas)
        return forward(x, num_replicas, batch_size, training)

    monkeypatch.setattr(parallel, "_forward_towers", recording)
    parallel.fit(X, Y, batch_size=20, shuffle=False, verbose=0)  # 61 = 3 x 20 + a last 1
    assert sorted(set(traced)) == [1, 4]
    assert len(traced) == 2
