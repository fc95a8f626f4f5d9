"""optimizer_state="sharded" (ZeRO stage 1) and gradient_dtype (16-bit gradient collectives)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerasmgpu
from kerasmgpu.comm import traffic
from tests.helpers import dense_classifier, max_weight_difference, twin

DEVICES = [f"/cpu:{i}" for i in range(4)]


def _data(samples=80, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(samples, features)).astype("float32"), rng.integers(0, classes, samples)


def _optimizer(name):
    if name == "adam":
        return keras.optimizers.Adam(0.01, clipnorm=0.5)
    if name == "adamw":
        return keras.optimizers.AdamW(0.01, weight_decay=0.05, global_clipnorm=0.3)
    return keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.5)


def _pair(count, optimizer, template=None, **options):
    """A replicated and a sharded ParallelModel of twin templates, same optimizer."""
    reference = template or dense_classifier()
    copy = twin(reference)
    models = []
    for model, extra in ((reference, {}), (copy, {"optimizer_state": "sharded", **options})):
        parallel = kerasmgpu.ParallelModel(model, DEVICES[:count], variables="replicated",
                                           **extra)
        parallel.compile(_optimizer(optimizer), "sparse_categorical_crossentropy")
        models.append(parallel)
    return models


@pytest.mark.parametrize(
    "count, optimizer", [(2, "adam"), (2, "sgd"), (4, "adam"), (4, "sgd"), (4, "adamw")]
)
def test_sharded_state_trains_like_replicated(count, optimizer):
    # 74 samples in batches of 8: ten steps, the last of 2 rows (one replica runs on 4
    # devices, the others add zeros); clipping (per variable, or global) is on.
    x, y = _data(samples=74)
    replicated, sharded = _pair(count, optimizer)
    replicated.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    sharded.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert max_weight_difference(replicated.template, sharded.template) <= 1e-6
    assert int(sharded.optimizer.iterations.numpy()) == 10
    copies = sharded.comm.copies()
    for copy in copies[1:]:  # the all-gather hands every device the same weights
        for a, b in zip(copies[0], copy):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def _mlp(features=64, width=256):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((features,))
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    hidden = keras.layers.Dense(width, activation="relu")(hidden)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


def test_memory_and_traffic_of_sharded_state_and_16_bit_gradients():
    template = _mlp()
    x = np.random.default_rng(0).random((32, 64), dtype="float32")
    y = np.arange(32) % 10
    measured = {}
    for name, options in (
        ("replicated", {}),
        ("sharded", {"optimizer_state": "sharded"}),
        ("bfloat16", {"gradient_dtype": "bfloat16"}),
        ("float16", {"gradient_dtype": "float16"}),
    ):
        parallel = kerasmgpu.ParallelModel(template, DEVICES, variables="replicated", **options)
        parallel.compile("adam", "sparse_categorical_crossentropy")
        moved = traffic.busiest(kerasmgpu.measure_traffic(parallel, x, y))[1]
        measured[name] = (moved, kerasmgpu.measure_memory(parallel))
    replicated_bytes, replicated_memory = measured["replicated"]
    sharded_bytes, sharded_memory = measured["sharded"]
    assert sharded_bytes <= 1.1 * replicated_bytes
    for name in ("bfloat16", "float16"):
        assert measured[name][0] <= 0.55 * replicated_bytes

    largest_variable = max(
        int(np.prod(v.shape)) * 4 for v in template.trainable_variables
    )
    busiest_state = max(m["optimizer_state"] for m in sharded_memory.values())
    replicated_state = max(m["optimizer_state"] for m in replicated_memory.values())
    assert busiest_state <= replicated_state / 4 + largest_variable
    assert set(sharded_memory) == set(replicated_memory)  # the four replica devices
    g = traffic.gradient_bytes(template)
    for held in replicated_memory.values():
        assert held["weights"] == g and held["optimizer_state"] >= 2 * g  # Adam: 2 slots


@pytest.mark.parametrize(
    "dtype, optimizer_state, bound",
    [("bfloat16", "full", 2**-6), ("float16", "full", 2**-9), ("float16", "sharded", 2**-9)],
)
def test_16_bit_gradients_keep_small_gradients(dtype, optimizer_state, bound):
    # Sample weights of 1e-6 make gradients of about 1e-8, below float16's smallest
    # subnormal (6e-8): cast as they are, they would all be flushed to zero. The float16
    # scale keeps them; the step then differs from float32's by the 16-bit rounding
    # only. (The accuracy of whole trainings: benchmarks/gradient_dtype.py.)
    x, y = _data(samples=32)
    weights = np.full(len(x), 1e-6, "float32")
    reference = dense_classifier()
    steps = {}
    for name, options in (("float32", {}), (dtype, {"gradient_dtype": dtype,
                                                     "optimizer_state": optimizer_state})):
        template = twin(reference)
        parallel = kerasmgpu.ParallelModel(template, DEVICES, variables="replicated", **options)
        parallel.compile(keras.optimizers.SGD(1e5), "sparse_categorical_crossentropy")
        parallel.train_on_batch(x, y, sample_weight=weights)
        steps[name] = [a - b for a, b in zip(template.get_weights(), reference.get_weights())]
    for exact, compressed in zip(steps["float32"], steps[dtype]):
        largest = np.max(np.abs(exact))
        assert largest > 0
        assert np.max(np.abs(compressed - exact)) <= bound * largest


_RESUME_WITHOUT_KERASMGPU = """
import json, sys
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
model.fit(data["x"], data["y"], batch_size=8, epochs=1, shuffle=False, verbose=0)
np.savez(sys.argv[3], *model.get_weights())
print(json.dumps({"kerasmgpu": "kerasmgpu" in sys.modules,
                  "iterations": int(model.optimizer.iterations.numpy()),
                  "optimizer_variables": len(model.optimizer.variables)}))
"""


class _SaveAfter(keras.callbacks.Callback):
    def __init__(self, epoch, path):
        super().__init__()
        self.epoch, self.path = epoch, path

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.save(self.path)  # what ModelCheckpoint does, mid-training


def test_save_mid_training_load_with_plain_keras_and_resume(tmp_path):
    x, y = _data(samples=40)
    reference = dense_classifier()
    template = twin(reference)
    parallel = kerasmgpu.ParallelModel(template, DEVICES[:2], variables="replicated",
                                       optimizer_state="sharded")
    parallel.compile(_optimizer("adam"), "sparse_categorical_crossentropy")
    saved = str(tmp_path / "epoch_1.keras")
    parallel.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                 callbacks=[_SaveAfter(0, saved)])

    np.savez(tmp_path / "data.npz", x=x, y=y)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASMGPU")}
    result = subprocess.run(
        [sys.executable, "-c", _RESUME_WITHOUT_KERASMGPU, saved, str(tmp_path / "data.npz"),
         str(tmp_path / "resumed.npz")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kerasmgpu"] is False
    assert report["iterations"] == 10  # 5 steps before saving, 5 after
    # The whole state: iterations, learning rate, two Adam moments per variable.
    assert report["optimizer_variables"] == 2 + 2 * len(template.trainable_variables)
    with np.load(tmp_path / "resumed.npz") as resumed:
        weights = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
    for a, b in zip(weights, template.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # After fit the template's own optimizer holds the whole state: template.save works too.
    template.save(tmp_path / "after.keras")
    after = keras.saving.load_model(tmp_path / "after.keras")
    assert int(after.optimizer.iterations.numpy()) == 10
    assert len(after.optimizer.variables) == 2 + 2 * len(template.trainable_variables)

    # Loading into a sharded model scatters the file's state: it resumes the same way.
    again = twin(reference)
    resumed = kerasmgpu.ParallelModel(again, DEVICES[:2], variables="replicated",
                                      optimizer_state="sharded")
    resumed.compile(_optimizer("adam"), "sparse_categorical_crossentropy")
    resumed.load_weights(saved)
    assert int(resumed.optimizer.iterations.numpy()) == 5
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert max_weight_difference(again, template) <= 1e-6


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimizer_state": "zero1"}, "optimizer_state='zero1'"),
        ({"gradient_dtype": "float64"}, "gradient_dtype='float64'"),
        ({"gradient_dtype": "int8"}, "gradient_dtype='int8'"),
        ({"optimizer_state": "sharded", "variables": "central"}, "variables='central'"),
        ({"optimizer_state": "sharded", "sync_period": 2}, "sync_period=2"),
        ({"gradient_dtype": "float16", "variables": "central"}, "variables='central'"),
    ],
)
def test_bad_options_fail_at_wrap_time(options, message):
    with pytest.raises(ValueError, match=message):
        kerasmgpu.ParallelModel(dense_classifier(), DEVICES[:2], **options)
    with pytest.raises(ValueError, match=message):
        kerasmgpu.multi_gpu_model(dense_classifier(), gpus=2, **options)


@pytest.mark.parametrize(
    "optimizer, message",
    [
        (keras.optimizers.Lamb(), "Received: optimizer=Lamb"),
        (keras.optimizers.Adam(use_ema=True), "use_ema=True"),
        (keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), "LossScaleOptimizer"),
    ],
)
def test_optimizers_sharding_cannot_run_exactly_fail_at_compile_time(optimizer, message):
    parallel = kerasmgpu.ParallelModel(dense_classifier(), DEVICES[:2], optimizer_state="sharded")
    assert parallel.variables_layout == "replicated"  # "auto" resolves to it
    with pytest.raises(ValueError, match=message):
        parallel.compile(optimizer, "sparse_categorical_crossentropy")


class _StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_the_sharded_state(tmp_path):
    x, y = _data(samples=32)
    reference = dense_classifier()
    template = twin(reference)
    runs = []
    for model in (reference, template):
        parallel = kerasmgpu.ParallelModel(model, DEVICES[:3], variables="replicated",
                                           optimizer_state="sharded")
        parallel.compile(_optimizer("adam"), "sparse_categorical_crossentropy")
        runs.append(parallel)
    runs[0].fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        runs[1].fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                    callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAt(2)])
    # Spoil the weights and the shards' state: the resumed run must restore both.
    template.set_weights([w * 0 for w in template.get_weights()])
    for optimizer in runs[1].comm.shard_optimizers():
        for variable in optimizer.variables:
            if variable.name.endswith(("momentum", "velocity")):
                variable.assign(variable * 0 + 1)
    runs[1].fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert int(runs[1].optimizer.iterations.numpy()) == 12
    assert max_weight_difference(reference, template) <= 1e-6
