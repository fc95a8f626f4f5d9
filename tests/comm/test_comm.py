"""variables="replicated": copies per device kept equal by bucketed all-reduce; local SGD."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from kerasmgpu import _compat
from kerasmgpu.comm import collective
from tests.helpers import dense_classifier, max_weight_difference, twin

DEVICES = [f"/cpu:{i}" for i in range(4)]


def _data(samples=37, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = rng.integers(0, classes, samples)
    weights = rng.uniform(0.2, 1.0, samples).astype("float32")
    return x, y, weights


def _optimizer(name):
    if name == "adam":
        return keras.optimizers.Adam(0.01)
    return keras.optimizers.SGD(0.05, momentum=0.9)


class _CopiesIdentical(keras.callbacks.Callback):
    """Checks after every step that all replicas hold bitwise the same weights."""

    def __init__(self, parallel):
        super().__init__()
        self.parallel = parallel
        self.checked = 0

    def on_train_batch_end(self, batch, logs=None):
        copies = self.parallel.comm.copies()
        for copy in copies[1:]:
            for a, b in zip(copies[0], copy):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
        self.checked += 1


@pytest.mark.parametrize(
    "count, optimizer", [(2, "sgd"), (3, "adam"), (4, "adam"), (4, "sgd")]
)
def test_replicated_trains_like_one_device(count, optimizer):
    # 37 samples in batches of 8: five steps, the last one uneven (5 rows on 2-4 devices).
    x, y, weights = _data()
    single = dense_classifier(regularizer=keras.regularizers.L2(0.01))
    template = twin(single)
    single.compile(_optimizer(optimizer), "sparse_categorical_crossentropy",
                   weighted_metrics=["accuracy"])
    parallel = kerasmgpu.ParallelModel(template, DEVICES[:count], variables="replicated")
    parallel.compile(_optimizer(optimizer), "sparse_categorical_crossentropy",
                     weighted_metrics=["accuracy"])
    check = _CopiesIdentical(parallel)
    expected = single.fit(x, y, sample_weight=weights, batch_size=8, shuffle=False, verbose=0)
    got = parallel.fit(x, y, sample_weight=weights, batch_size=8, shuffle=False, verbose=0,
                       callbacks=[check])
    assert check.checked == 5
    assert max_weight_difference(single, template) <= 1e-5
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(got.history[key], expected.history[key], atol=1e-5)
    assert parallel.comm.exchanges == 5  # one gradient all-reduce per step


@pytest.mark.parametrize("sync_batchnorm", [False, True])
def test_batchnorm_state_as_in_central_mode(sync_batchnorm):
    def build():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((8,))
        hidden = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inputs))
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))

    x, y, _ = _data(samples=24)
    models = {}
    for layout in ("central", "replicated"):
        template = build()
        parallel = kerasmgpu.ParallelModel(template, DEVICES[:3], variables=layout,
                                           sync_batchnorm=sync_batchnorm)
        parallel.compile("sgd", "sparse_categorical_crossentropy")
        parallel.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        models[layout] = template
    assert max_weight_difference(models["central"], models["replicated"]) <= 1e-5
    moving = [w.path for w in models["replicated"].non_trainable_weights]
    assert any("moving_mean" in p for p in moving)


def test_copies_follow_weights_set_on_the_template_and_saving_is_plain_keras(tmp_path):
    x, y, _ = _data(samples=32)
    single = dense_classifier()
    template = twin(single)
    initial = template.get_weights()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2, variables="replicated")
    parallel.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    checkpoint = str(tmp_path / "best.keras")
    parallel.fit(x, y, batch_size=16, epochs=2, verbose=0,
                 callbacks=[keras.callbacks.ModelCheckpoint(checkpoint)])
    loaded = keras.saving.load_model(checkpoint)
    assert max_weight_difference(loaded, template) == 0.0
    parallel.save(tmp_path / "model.keras")
    assert max_weight_difference(keras.saving.load_model(tmp_path / "model.keras"), template) == 0

    # Weights set on the template outside training reach every copy before the next step.
    template.set_weights(initial)
    single.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    single.train_on_batch(x[:16], y[:16])
    parallel.train_on_batch(x[:16], y[:16])
    assert max_weight_difference(single, template) <= 1e-6
    for copy in parallel.comm.copies()[1:]:
        for a, b in zip(copy, template.trainable_variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


class _StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_every_copy(tmp_path):
    x, y, _ = _data(samples=32)
    reference_template = dense_classifier()
    template = twin(reference_template)
    runs = {}
    for name, model in (("reference", reference_template), ("resumed", template)):
        parallel = kerasmgpu.ParallelModel(model, DEVICES[:2], variables="replicated")
        parallel.compile(_optimizer("sgd"), "sparse_categorical_crossentropy")
        runs[name] = parallel
    runs["reference"].fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        runs["resumed"].fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                            callbacks=[backup, _StopAt(2)])
    # Spoil the live copies: the resumed run must start again from the backup.
    template.set_weights([w * 0 for w in template.get_weights()])
    runs["resumed"].fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert max_weight_difference(reference_template, template) <= 1e-6


def _producers(tensors):
    return {t.op for t in tensors}


def _called_function(op):
    try:
        return op.get_attr("f").name
    except (ValueError, AttributeError):
        return None


def _producer(tensor):
    """The op that computes `tensor`, past the Identity ops a function output adds."""
    while tensor.op.type == "Identity" and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    return tensor.op


def _ancestors_through_calls(op, functions):
    """What `op` waits for, looking inside the replica programs it reaches: output k of a
    call needs what the function's output k needs, and the function's argument j is the
    call's input j (a backward function's gradients one by one, as once it is inlined)."""
    seen, pending = set(), [(op, None)]
    while pending:
        current, call = pending.pop()
        parents = [(c, call) for c in current.control_inputs]
        for tensor in current.inputs:
            function = functions.get(_called_function(tensor.op))
            if function is None:
                parents.append((tensor.op, call))
            else:
                parents.append((_producer(function.outputs[tensor.value_index]), tensor.op))
        if call is not None and current.type == "Placeholder":
            arguments = functions[_called_function(call)].inputs
            index = next(i for i, t in enumerate(arguments) if t.op is current)
            parents.append((call.inputs[index].op, None))
        for parent in parents:
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return {found for found, _ in seen}


def test_first_bucket_all_reduce_does_not_wait_for_the_rest_of_the_backward_pass():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    hidden = inputs
    for width in (32, 32, 32):
        hidden = keras.layers.Dense(width, activation="relu")(hidden)
    template = keras.Model(inputs, keras.layers.Dense(4)(hidden))
    # Buckets of about one layer (kernel and bias): 4 buckets, the output layer's first.
    parallel = kerasmgpu.ParallelModel(
        template, DEVICES[:2], variables="replicated", bucket_bytes=32 * 33 * 4
    )
    parallel.compile("sgd", "mse")
    x = tf.zeros((8, 16))
    y = tf.zeros((8, 4))
    parallel.train_on_batch(x, y)  # builds the copies and the optimizer clones
    graph = tf.function(parallel.train_step).get_concrete_function((x, y)).graph
    collectives = [op for op in graph.get_operations() if op.type == "CollectiveReduceV2"]
    buckets = collective.plan_buckets(template.trainable_variables, parallel.bucket_bytes)
    assert len(buckets) == 4 and len(collectives) == 4 * 2
    by_bucket = {}
    for op in collectives:
        number = int(op.name.split("bucket_")[1].split("/")[0])
        by_bucket.setdefault(number, []).append(op)

    functions = _compat.nested_functions(graph)

    def gradient_ops(number):
        # What each device's bucket is made of: the backward ops producing its gradients
        # (inside each replica's backward function).
        packed = [op for op in graph.get_operations()
                  if f"/bucket_{number}/" in op.name and op.type in ("Reshape", "ConcatV2")]
        return {
            _producer(functions[_called_function(t.op)].outputs[t.value_index])
            for op in packed for t in op.inputs
            if (_called_function(t.op) or "").startswith("__inference___backward")
        }

    first_layer_gradients = gradient_ops(3)  # the first layer: produced last by backprop
    last_layer_gradients = gradient_ops(0)  # the output layer: produced first
    assert first_layer_gradients and last_layer_gradients
    for op in by_bucket[0]:
        ancestors = _ancestors_through_calls(op, functions)
        assert not ancestors & first_layer_gradients
        assert ancestors & last_layer_gradients  # it does wait for its own gradients
    for op in by_bucket[3]:
        assert _ancestors_through_calls(op, functions) & first_layer_gradients


def test_replicated_traffic_is_a_ring_all_reduce_and_central_is_reported_beside_it():
    import zoo
    from kerasmgpu.comm import traffic

    model = zoo.cifar10_convnet()
    x = np.random.default_rng(0).random((32, *model.input_shape[1:]), dtype="float32")
    y = np.arange(32) % 10
    g = traffic.gradient_bytes(model)
    results = {}
    for layout in ("replicated", "central"):
        parallel = kerasmgpu.ParallelModel(model, DEVICES, variables=layout)
        parallel.compile("sgd", "sparse_categorical_crossentropy")
        before = [w.copy() for w in model.get_weights()]
        results[layout] = kerasmgpu.measure_traffic(parallel, x, y)
        assert max(np.max(np.abs(a - b)) for a, b in zip(before, model.get_weights())) == 0
    ring = 2 * (4 - 1) / 4 * g
    _, replicated = traffic.busiest(results["replicated"])
    device, central = traffic.busiest(results["central"])
    assert ring <= replicated <= 1.1 * ring
    # Central: the variables' device sends (N-1) G of weights and receives (N-1) G of
    # gradients.
    assert "CPU:0" in device and 3 * g <= central <= 3.1 * g


def test_local_sgd_on_digits():
    import zoo

    (x, y), (x_test, y_test) = zoo.datasets.load("digits", flatten=True)
    results = {}
    for period in (1, 4):
        keras.utils.set_random_seed(0)
        template = keras.Sequential([
            keras.Input((x.shape[1],)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])
        parallel = kerasmgpu.ParallelModel(
            template, DEVICES, variables="replicated", sync_period=period
        )
        parallel.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                         "sparse_categorical_crossentropy", metrics=["accuracy"])
        parallel.fit(x, y, batch_size=64, epochs=8, shuffle=False, verbose=0)
        accuracy = parallel.evaluate(x_test, y_test, verbose=0)[1]
        results[period] = (accuracy, parallel.comm.exchanges)
        copies = parallel.comm.copies()
        for copy in copies[1:]:  # fit() ends with the copies averaged
            for a, b in zip(copies[0], copy):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
    steps = 8 * int(np.ceil(len(x) / 64))
    assert results[1][1] == steps and results[4][1] * 4 == steps
    assert abs(results[1][0] - results[4][0]) <= 0.01
    assert results[4][0] > 0.9


def test_sync_period_one_is_synchronous_training():
    x, y, _ = _data(samples=32)
    single = dense_classifier()
    template = twin(single)
    single.compile(_optimizer("sgd"), "sparse_categorical_crossentropy")
    parallel = kerasmgpu.ParallelModel(template, DEVICES[:4], variables="replicated",
                                       sync_period=1)
    parallel.compile(_optimizer("sgd"), "sparse_categorical_crossentropy")
    single.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    parallel.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert max_weight_difference(single, template) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variables": "mirrored"}, "variables='mirrored'"),
        ({"variables": "replicated", "sync_period": 0}, "sync_period=0"),
        ({"variables": "replicated", "sync_period": 2.5}, "sync_period=2.5"),
        ({"variables": "central", "sync_period": 4}, "variables='central'"),
        ({"variables": "replicated", "bucket_bytes": 0}, "bucket_bytes=0"),
    ],
)
def test_bad_layout_arguments_fail_at_wrap_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kerasmgpu.ParallelModel(dense_classifier(), DEVICES[:2], **kwargs)
    with pytest.raises(ValueError, match=message):
        kerasmgpu.multi_gpu_model(dense_classifier(), gpus=2, **kwargs)


def test_auto_layout_is_replicated_on_gpus_and_central_on_cpu_devices():
    from kerasmgpu import comm

    assert comm.resolve_layout("auto", ["/gpu:0", "/gpu:1"]) == "replicated"
    assert comm.resolve_layout("auto", ["/cpu:0", "/cpu:1"]) == "central"
    assert comm.resolve_layout("auto", ["/cpu:0", "/cpu:1"], sync_period=4) == "replicated"
    parallel = kerasmgpu.ParallelModel(dense_classifier(), DEVICES[:2])
    assert parallel.variables_layout == "central"  # this machine simulates CPU devices
    local_sgd = kerasmgpu.multi_gpu_model(dense_classifier(), gpus=2, sync_period=2)
    assert local_sgd.variables_layout == "replicated"


def test_learning_rate_changed_by_a_callback_reaches_every_copy():
    x, y, _ = _data(samples=32)
    single = dense_classifier()
    template = twin(single)
    halve = keras.callbacks.LearningRateScheduler(lambda epoch, rate: rate / 2)
    single.compile(_optimizer("sgd"), "sparse_categorical_crossentropy")
    parallel = kerasmgpu.ParallelModel(template, DEVICES[:2], variables="replicated")
    parallel.compile(_optimizer("sgd"), "sparse_categorical_crossentropy")
    check = _CopiesIdentical(parallel)
    single.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[halve])
    parallel.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                 callbacks=[halve, check])
    assert check.checked == 6
    assert max_weight_difference(single, template) <= 1e-5
