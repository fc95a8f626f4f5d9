"""Saving through a ParallelModel writes the template: files load with plain Keras."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerasmgpu
from tests.helpers import dense_classifier

RNG = np.random.default_rng(1)
X = RNG.normal(size=(40, 8)).astype("float32")
Y = RNG.integers(0, 3, size=40)


def _trained_parallel():
    template = dense_classifier()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                     metrics=["accuracy"])
    parallel.fit(X, Y, batch_size=10, epochs=2, verbose=0)
    return template, parallel


def _load_in_fresh_process(path, inputs_path):
    """Load `path` with plain Keras in a process that never imports kerasmgpu."""
    code = (
        "import sys, numpy as np, keras\n"
        "assert 'kerasmgpu' not in sys.modules\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        "assert 'kerasmgpu' not in sys.modules\n"
        f"np.save({str(inputs_path)!r} + '.out.npy', model.predict(np.load({str(inputs_path)!r}),"
        " verbose=0))\n"
        "print(type(model.optimizer).__name__ if model.optimizer else None)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASMGPU")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=180, cwd=str(path.parent))
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(str(inputs_path) + ".out.npy"), result.stdout.strip().splitlines()[-1]


def test_save_writes_the_template_loadable_without_kerasmgpu(tmp_path):
    template, parallel = _trained_parallel()
    path = tmp_path / "model.keras"
    parallel.save(path)
    np.save(tmp_path / "x.npy", X)
    predictions, optimizer = _load_in_fresh_process(path, tmp_path / "x.npy")
    np.testing.assert_allclose(predictions, template.predict(X, verbose=0), atol=1e-6)
    # The training configuration and optimizer state travel with the template.
    assert optimizer == "Adam"


def test_loaded_template_continues_training_with_its_optimizer_state(tmp_path):
    template, parallel = _trained_parallel()
    parallel.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert int(loaded.optimizer.iterations) == int(parallel.optimizer.iterations) == 8
    resumed = kerasmgpu.multi_gpu_model(loaded, gpus=2)
    resumed.compile(loaded.optimizer, loaded.loss, metrics=["accuracy"])
    resumed.fit(X, Y, batch_size=10, verbose=0)
    parallel.fit(X, Y, batch_size=10, verbose=0)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), template.predict(X, verbose=0),
                               atol=1e-5)


def test_save_weights_and_load_weights_use_the_template(tmp_path):
    template, parallel = _trained_parallel()
    path = tmp_path / "model.weights.h5"
    parallel.save_weights(path)
    fresh = dense_classifier(seed=7)
    fresh.load_weights(path)
    np.testing.assert_allclose(fresh.predict(X, verbose=0), template.predict(X, verbose=0),
                               atol=1e-6)
    other = kerasmgpu.multi_gpu_model(dense_classifier(seed=9), gpus=3)
    other.load_weights(path)
    np.testing.assert_allclose(other.predict(X, verbose=0), template.predict(X, verbose=0),
                               atol=1e-6)


@pytest.mark.parametrize("weights_only", [False, True], ids=["model", "weights"])
def test_model_checkpoint_on_the_parallel_model_saves_the_template(tmp_path, weights_only):
    template = dense_classifier()
    parallel = kerasmgpu.multi_gpu_model(template, gpus=2)
    parallel.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    suffix = ".weights.h5" if weights_only else ".keras"
    path = tmp_path / ("best" + suffix)
    checkpoint = keras.callbacks.ModelCheckpoint(
        path, monitor="loss", save_best_only=True, save_weights_only=weights_only
    )
    parallel.fit(X, Y, batch_size=10, epochs=2, callbacks=[checkpoint], verbose=0)
    if weights_only:
        restored = dense_classifier(seed=5)
        restored.load_weights(path)
    else:
        restored = keras.saving.load_model(path)
        assert [layer.name for layer in restored.layers] == [
            layer.name for layer in template.layers
        ]
    np.testing.assert_allclose(restored.predict(X, verbose=0), template.predict(X, verbose=0),
                               atol=1e-6)


def test_the_parallel_model_itself_is_not_serialized_by_mistake():
    parallel = kerasmgpu.multi_gpu_model(dense_classifier(), gpus=2)
    expected = "save\\(\\) and ModelCheckpoint write its template"
    with pytest.raises(NotImplementedError, match=expected):
        parallel.get_config()
