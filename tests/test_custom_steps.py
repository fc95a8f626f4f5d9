"""Templates with their own train_step/test_step/predict_step train wrapped, exactly.

Each case trains one model with plain Keras on one device and an identical one wrapped
on N = 2 and 3 devices, with 39 samples in batches of 13 (three steps; 13 divides by
neither N), and compares weights, fit's History and evaluate/predict results.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from kerasmgpu import _compat
from tests import custom_step_models as models
from tests.helpers import placed_ops

RNG = np.random.default_rng(7)
X = RNG.normal(size=(39, 6)).astype("float32")
Y = (X[:, :1] * 0.5 + 0.1).astype("float32")
IMAGES = RNG.random((39, 8, 8, 1)).astype("float32")
SIGNALS = RNG.random((39, 8, 1)).astype("float32")
BATCH = 13
TOLERANCE = 1e-5


def _weights_difference(a, b):
    """The largest weight difference, relative to the weight's scale when above 1."""
    return max(
        float(np.max(np.abs(x - y)) / max(1.0, np.max(np.abs(x)))) if np.size(x) else 0.0
        for x, y in zip(a.get_weights(), b.get_weights())
    )


def small_dcgan():
    return models.dcgan(blocks=1)


def _history_difference(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a)


def _fit_pair(make, compile_model, data, n, epochs=1, wrap_first=True, variables="central"):
    """Train make() on one device and make() wrapped on n devices; return both and histories."""
    reference, template = make(), make()
    template.set_weights(reference.get_weights())
    compile_model(reference)
    if wrap_first:
        parallel = kerasmgpu.multi_gpu_model(template, gpus=n, variables=variables)
        compile_model(parallel)
    else:
        compile_model(template)
        parallel = kerasmgpu.multi_gpu_model(template, gpus=n, variables=variables)
    histories = [
        model.fit(*data, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0).history
        for model in (reference, parallel)
    ]
    return reference, template, parallel, histories


def _built(cls):
    def make():
        keras.utils.set_random_seed(11)
        model = cls()
        model(X[:2])
        return model
    return make


def _compile_regression(model):
    model.compile(keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])


def _compile_own_trackers(model):
    model.compile(keras.optimizers.Adam(0.01))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("cls, compile_model", [
    (models.BasicTrainStep, _compile_regression),
    (models.OwnTrackers, _compile_own_trackers),
], ids=["basic", "own-trackers"])
def test_customizing_fit_models_train_as_on_one_device(cls, compile_model, n):
    reference, template, _, (expected, got) = _fit_pair(_built(cls), compile_model, (X, Y), n)
    assert _weights_difference(reference, template) <= TOLERANCE
    assert _history_difference(expected, got) <= TOLERANCE
    assert "mae" in got


@pytest.mark.parametrize("n", [2, 3])
def test_losses_layers_add_in_a_sliced_call_count_as_on_one_device(n):
    # An activity regularizer and an add_loss inside the model: compute_loss reads
    # model.losses after the call, as on one device (the reported loss includes them).
    reference, template, _, (expected, got) = _fit_pair(
        _built(models.AddedLosses), _compile_regression, (X, Y), n)
    assert len(reference.losses) == 2
    assert _weights_difference(reference, template) <= TOLERANCE
    assert _history_difference(expected, got) <= TOLERANCE


def test_run_eagerly_trains_as_on_one_device():
    def compile_model(model):
        model.compile(keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"],
                      run_eagerly=True)

    reference, template, parallel, (expected, got) = _fit_pair(
        _built(models.BasicTrainStep), compile_model, (X, Y), 2
    )
    assert parallel.run_eagerly
    assert _weights_difference(reference, template) <= TOLERANCE
    assert _history_difference(expected, got) <= TOLERANCE


@pytest.mark.parametrize("n", [2, 3])
def test_custom_test_step_evaluates_as_on_one_device(n):
    reference, template, parallel, _ = _fit_pair(
        _built(models.OwnTestStep), _compile_regression, (X, Y), n
    )
    expected = reference.evaluate(X, Y, batch_size=BATCH, return_dict=True, verbose=0)
    got = parallel.evaluate(X, Y, batch_size=BATCH, return_dict=True, verbose=0)
    assert set(expected) == set(got)
    for key in expected:
        assert abs(expected[key] - got[key]) <= TOLERANCE, key


@pytest.mark.parametrize("n", [2, 3])
def test_predict_step_override_predicts_as_on_one_device(n):
    make = _built(models.OwnPredictStep)
    reference, template = make(), make()
    template.set_weights(reference.get_weights())
    parallel = kerasmgpu.multi_gpu_model(template, gpus=n)
    expected = reference.predict(X, batch_size=BATCH, verbose=0)
    got = parallel.predict(X, batch_size=BATCH, verbose=0)
    assert set(expected) == set(got) == {"score", "centred"}
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=TOLERANCE)


def test_dcgan_compiled_then_wrapped_trains_as_on_one_device():
    # N = 2, wrapped then compiled: the replicated-layout test below.
    reference, template, _, (expected, got) = _fit_pair(
        small_dcgan, models.compile_gan, (IMAGES,), 3, wrap_first=False
    )
    assert set(got) == {"d_loss", "g_loss"}
    assert _history_difference(expected, got) <= TOLERANCE
    assert _weights_difference(reference, template) <= TOLERANCE


@pytest.mark.parametrize("n", [2, 3])
def test_wgan_gp_gradient_penalty_trains_as_on_one_device(n):
    def compile_model(model):
        model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))

    reference, template, _, (expected, got) = _fit_pair(
        models.wgan_gp, compile_model, (X,), n
    )
    assert _weights_difference(reference, template) <= 1e-4
    assert _history_difference(expected, got) <= 1e-4


@pytest.mark.parametrize("n", [2, 3])
def test_vae_trains_as_on_one_device_with_noise_drawn_in_the_step(n):
    reference, template, _, (expected, got) = _fit_pair(
        models.vae, lambda m: m.compile(keras.optimizers.Adam(1e-2)), (SIGNALS,), n
    )
    assert set(got) == {"total_loss", "reconstruction_loss", "kl_loss"}
    assert _history_difference(expected, got) <= TOLERANCE
    assert _weights_difference(reference, template) <= TOLERANCE


def test_vae_with_a_sampling_layer_trains_with_per_replica_noise():
    # The Sampling layer draws inside the encoder: each replica from its own seeds, so
    # the noise (and the weights) differ from one device's; training still works.
    make = lambda: models.vae(noise_in_step=False)  # noqa: E731
    template = make()
    before = template.get_weights()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile(keras.optimizers.Adam(1e-2))
    history = parallel.fit(SIGNALS, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    losses = history.history["total_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert _weights_difference_lists(before, template.get_weights()) > 0


def _weights_difference_lists(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("n", [2, 3])
def test_simsiam_two_views_train_as_on_one_device(n):
    reference, template, _, (expected, got) = _fit_pair(
        models.simsiam, lambda m: m.compile(keras.optimizers.SGD(0.05)), (X,), n
    )
    assert _history_difference(expected, got) <= TOLERANCE
    assert _weights_difference(reference, template) <= TOLERANCE


def test_replicated_copies_stay_equal_to_the_template_after_every_apply():
    reference, template, parallel, (expected, got) = _fit_pair(
        small_dcgan, models.compile_gan, (IMAGES,), 2, variables="replicated"
    )
    assert parallel.variables_layout == "replicated"
    assert _history_difference(expected, got) <= TOLERANCE
    assert _weights_difference(reference, template) <= TOLERANCE
    for copy in parallel.comm.copies()[1:]:
        for mirror, variable in zip(copy, template.trainable_variables):
            np.testing.assert_array_equal(np.asarray(mirror), np.asarray(variable))


# ------------------------------------------------------------------ placement
def _traced_gan_step(gpus, variables="central"):
    gan = small_dcgan()
    parallel = kerasmgpu.multi_gpu_model(gan, gpus=gpus, variables=variables)
    models.compile_gan(parallel)
    parallel.optimizer.build(parallel.trainable_variables)
    parallel.make_train_function()  # builds replica copies (replicated)
    for optimizer in (gan.d_optimizer, gan.g_optimizer):
        optimizer.build(gan.trainable_variables)
    signature = tf.TensorSpec((None, 8, 8, 1), tf.float32)
    return gan, tf.function(parallel.train_step).get_concrete_function(signature)


def _device(node):
    return node.device.split("device:")[-1] if node.device else "(unplaced)"


def test_each_sliced_call_runs_forward_and_backward_on_every_replica_device():
    _, concrete = _traced_gan_step([1, 3])
    # Every op through the calls that reach it (the replica programs, their backward
    # functions), on the device it runs on.
    nodes = placed_ops(concrete.graph.as_graph_def())
    for i, device in enumerate(["CPU:1", "CPU:3"]):
        # Forward: the discriminator's and the generator's convolutions.
        forward = {(n.name.split("/")[0].rstrip("_0123456789"), _device(n)) for n in nodes
                   if n.op == "Conv2D" and not n.backward and f"/replica_{i}/" in n.name}
        assert forward == {("discriminator", device), ("generator", device)}, forward
        # Backward: the convolution gradients of both models (the replica's gradient
        # function, or its program's backward function called there).
        backward = {(n.op, _device(n)) for n in nodes if n.backward
                    and (f"replica_{i}_backward" in n.name or f"/replica_{i}/" in n.name)
                    and n.op in ("Conv2DBackpropFilter", "Conv2DBackpropInput")}
        assert backward == {("Conv2DBackpropFilter", device),
                            ("Conv2DBackpropInput", device)}, backward


def test_no_template_variable_gets_a_second_copy():
    # The step reads exactly the variables one device's step reads (central), plus one
    # copy per extra replica (replicated), and nothing else.
    one_device = small_dcgan()
    models.compile_gan(one_device)
    for optimizer in (one_device.d_optimizer, one_device.g_optimizer):
        optimizer.build(one_device.trainable_variables)
    signature = tf.TensorSpec((None, 8, 8, 1), tf.float32)
    expected = len(tf.function(one_device.train_step).get_concrete_function(
        signature).graph.variables)
    gan, concrete = _traced_gan_step(2, "central")
    assert len(concrete.graph.variables) == expected
    gan, concrete = _traced_gan_step(2, "replicated")
    assert len(concrete.graph.variables) == expected + len(gan.trainable_variables)


# --------------------------------------------------- synchronized BatchNorm
@pytest.mark.parametrize("n", [2, 3])
def test_synchronized_batchnorm_in_a_custom_step_trains_as_on_one_device(n):
    # Both models normalise with the statistics of each call's whole batch (the
    # discriminator's call on real and generated rows, 26 of them), moving statistics
    # included: weights and losses equal one device.
    reference, template, _, (expected, got) = _fit_pair(
        lambda: models.gan_with_batchnorm(True), models.compile_gan_sgd, (X,), n)
    assert _weights_difference(reference, template) <= TOLERANCE
    assert _history_difference(expected, got) <= TOLERANCE
    # Unsynchronized, each replica normalises its slice: not one device's training.
    reference, template, _, _ = _fit_pair(
        lambda: models.gan_with_batchnorm(False), models.compile_gan_sgd, (X,), n)
    assert _weights_difference(reference, template) > 1e-3


def test_a_gradient_penalty_through_synchronized_batchnorm_is_a_clear_error():
    gan = models.wgan_gp()
    critic = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8),
        keras.layers.BatchNormalization(synchronized=True), keras.layers.Dense(1),
    ], name="critic")
    gan = models.WGANGP(critic, gan.generator, latent_dim=4)
    parallel = kerasmgpu.multi_gpu_model(gan, gpus=2)
    parallel.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match="gradient of a gradient.*'critic'"):
        parallel.fit(X, batch_size=BATCH, epochs=1, verbose=0)


# ------------------------------------------------------------------------ XLA
def _compile_basic_xla(model):
    model.compile(keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"], jit_compile=True)


def _compile_gan_xla(model):
    # A keras.io GAN's compile takes no jit_compile: the wrapper's does, for its replicas.
    if isinstance(model, kerasmgpu.ParallelModel):
        model.compile(d_optimizer=keras.optimizers.Adam(1e-3),
                      g_optimizer=keras.optimizers.Adam(1e-3),
                      loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
                      jit_compile=True)
    else:
        models.compile_gan(model)


def _compile_wgan_xla(model):
    extra = {"jit_compile": True} if isinstance(model, kerasmgpu.ParallelModel) else {}
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3), **extra)


@pytest.mark.parametrize("make, compile_model, data", [
    (_built(models.BasicTrainStep), _compile_basic_xla, (X, Y)),
    (small_dcgan, _compile_gan_xla, (IMAGES,)),
    (models.wgan_gp, _compile_wgan_xla, (X,)),
], ids=["basic-vs-xla", "dcgan-vs-no-xla", "wgan-gp-vs-no-xla"])
def test_xla_on_each_sliced_call_trains_as_on_one_device(make, compile_model, data):
    # The reference is one device compiled as Keras compiles it: with XLA for the basic
    # step. The GANs draw noise in their step, which the wrapper runs outside XLA (only
    # the replica programs are compiled), and TensorFlow's stateless random ops give
    # other numbers under XLA for the same seed; so their reference is one device
    # without XLA, whose noise is the same.
    reference, template, parallel, (expected, got) = _fit_pair(make, compile_model, data, 2)
    assert parallel.replica_jit_compile is True and parallel.jit_compile is False
    assert reference.jit_compile is (compile_model is _compile_basic_xla)
    assert all(program.jit_compile for program in parallel._sliced_calls.programs)
    assert _weights_difference(reference, template) <= TOLERANCE
    assert _history_difference(expected, got) <= TOLERANCE


def test_each_sliced_call_xla_program_and_its_backward_run_on_their_device():
    gan = small_dcgan()
    parallel = kerasmgpu.multi_gpu_model(gan, gpus=[1, 3])
    _compile_gan_xla(parallel)
    parallel.optimizer.build(parallel.trainable_variables)
    for optimizer in (gan.d_optimizer, gan.g_optimizer):
        optimizer.build(gan.trainable_variables)
    step = tf.function(parallel.train_step)
    data = tf.constant(IMAGES[:6])
    step.get_concrete_function(data)
    collected = []
    with _compat.run_metadata(collected):
        step(data)
    # What ran: every call XLA must compile, by the replica it belongs to and its device.
    compiled = sorted(
        ("backward" if "_backward" in node.name else node.name.split("/")[0].rstrip("_0123456789"),
         re.search(r"replica_(\d)", node.name).group(1), node.device.split("device:")[-1])
        for function_graphs in collected[0].function_graphs
        for partition in function_graphs.partition_graphs
        for node in partition.node if node.attr["_XlaMustCompile"].b
    )
    # Per replica: the generator and the discriminator forward twice each (the
    # discriminator step and the generator step), three backward passes (the
    # discriminator's in its step; the discriminator's and the generator's in the
    # generator step); each on that replica's device, nothing else compiled.
    for replica, device in (("0", "CPU:1"), ("1", "CPU:3")):
        mine = [(what, where) for what, index, where in compiled if index == replica]
        assert mine == sorted([("backward", device)] * 3 + [("discriminator", device)] * 2
                              + [("generator", device)] * 2), compiled
    assert len(compiled) == 14, compiled


# -------------------------------------------------------------------- tracing
class _CountTraces(keras.layers.Layer):
    """The identity, counting how many times its call runs in Python (is traced)."""

    traced = 0

    def call(self, x):
        _CountTraces.traced += 1
        return x


def _counting_gan():
    keras.utils.set_random_seed(3)
    discriminator = keras.Sequential(
        [keras.Input((6,)), _CountTraces(name="count"), keras.layers.Dense(1)],
        name="discriminator",
    )
    generator = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6)], name="generator")
    return models.GAN(discriminator, generator, latent_dim=4)


@pytest.mark.parametrize("n", [2, 4])
def test_each_sliced_call_is_traced_once_whatever_the_number_of_devices(n):
    parallel = kerasmgpu.multi_gpu_model(_counting_gan(), gpus=n)
    models.compile_gan(parallel)
    _CountTraces.traced = 0
    # Batches of a size unknown at trace time (a batch size known then is a signature
    # per slice size, two at most per call's batch size, as in the standard step).
    parallel.fit(tf.data.Dataset.from_tensor_slices(X).batch(BATCH), epochs=2,
                 shuffle=False, verbose=0)
    # The step calls the discriminator twice and the generator twice, each sliced over
    # n replicas: one program per model (and call arguments), traced once for every
    # replica of both calls; traced inline, the discriminator's layers ran 2n times.
    assert _CountTraces.traced == 1
    traces = {p.model.name: p.traces for p in parallel._sliced_calls.programs}
    assert traces == {"discriminator": 1, "generator": 1}


# ----------------------------------------------------------- clear refusals
class FunctionalTrainStep(keras.Model):
    """A functional model (Model(inputs, outputs) subclass) with its own train_step."""

    def train_step(self, data):
        return super().train_step(data)


def test_split_model_refuses_a_template_overriding_a_step_naming_it():
    from kerasmgpu.split import split_model

    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)
    model = FunctionalTrainStep(inputs, keras.layers.Dense(1)(hidden))
    with pytest.raises(ValueError, match=r"overrides train_step\(\).*multi_gpu_model"):
        split_model(model, devices=2)


class _ClosureTiedAutoencoder(keras.Model):
    """A decoder reading the encoder's kernel through a closure: not among its variables."""

    def __init__(self):
        super().__init__()
        dense = keras.layers.Dense(3)
        self.encoder = keras.Sequential([keras.Input((6,)), dense], name="encoder")
        transpose = keras.layers.Lambda(
            lambda z: tf.matmul(z, dense.kernel, transpose_b=True))
        self.decoder = keras.Sequential([keras.Input((3,)), transpose], name="decoder")

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.decoder(self.encoder(data)) - data))
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return {"reconstruction": loss}


def test_a_call_reading_variables_its_model_does_not_track_is_a_clear_error():
    model = _ClosureTiedAutoencoder()
    model.decoder(model.encoder(X[:2]))
    parallel = kerasmgpu.multi_gpu_model(model, gpus=2)
    parallel.compile(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="'decoder', called inside a custom step, reads "
                                         "variables it does not track"):
        parallel.fit(X, batch_size=BATCH, epochs=1, verbose=0)


def test_unbuilt_sub_model_is_named_at_wrap_time():
    generator = keras.Sequential([keras.layers.Dense(4)], name="unbuilt_generator")
    discriminator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    gan = models.GAN(discriminator, generator, latent_dim=3)
    with pytest.raises(ValueError, match="'unbuilt_generator' is not built"):
        kerasmgpu.multi_gpu_model(gan, gpus=2)


def test_options_a_custom_step_cannot_run_are_refused_at_wrap_time():
    with pytest.raises(ValueError, match="sync_period=1.*Received: sync_period=2"):
        kerasmgpu.multi_gpu_model(small_dcgan(), gpus=2, variables="replicated",
                                  sync_period=2)
