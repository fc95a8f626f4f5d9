"""Every option is checked at the boundary: wrong values are errors naming what was passed."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasmgpu
from kerasmgpu import distill, options


@pytest.fixture(scope="module")
def model():
    template = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    template.compile("sgd", "mse")
    return template


@pytest.fixture(scope="module")
def parallel(model):
    wrapped = kerasmgpu.multi_gpu_model(model, gpus=2)
    wrapped.compile("sgd", "mse")
    return wrapped


# ------------------------------------------------------------------ the checkers
def test_checkers_accept_what_users_write():
    assert options.boolean(np.bool_(True), "x") is True
    assert options.whole_number(np.int64(4), "sync_period", minimum=1) == 4
    assert options.byte_size(25e6, "bucket_bytes") == 25_000_000
    assert options.byte_size(np.int32(1024), "bucket_bytes") == 1024
    assert options.finite_number(0.5, "overlap", minimum=0, maximum=1) == 0.5


@pytest.mark.parametrize("call, message", [
    (lambda: options.boolean("False", "sync_batchnorm"),
     "sync_batchnorm must be True or False. Received: sync_batchnorm='False'"),
    (lambda: options.boolean(None, "cpu_merge"), "Received: cpu_merge=None"),
    (lambda: options.whole_number(2.5, "n", minimum=1), "Received: n=2.5"),
    (lambda: options.whole_number(True, "n"), "Received: n=True"),
    (lambda: options.byte_size(1.5, "bucket_bytes"), "Received: bucket_bytes=1.5"),
    (lambda: options.byte_size(float("inf"), "bucket_bytes"), "bucket_bytes=inf"),
    (lambda: options.one_of("centre", "variables", ("auto", "central")),
     "variables must be one of 'auto', 'central'. Received: variables='centre'"),
    (lambda: options.one_of(True, "policy", (1, 2)), "Received: policy=True"),
    (lambda: options.finite_number(float("nan"), "--step-time", above=0),
     "Received: --step-time nan"),
])
def test_checkers_refuse_with_the_name_and_the_value(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# ------------------------------------------------------------------ the API
@pytest.mark.parametrize("kwargs, message", [
    ({"sync_batchnorm": "False"}, "sync_batchnorm must be True or False"),
    ({"cpu_relocation": "false"}, "cpu_relocation must be True or False"),
    ({"cpu_merge": None}, "cpu_merge must be True or False"),
    ({"bucket_bytes": 1024, "variables": "central"},
     "bucket_bytes has no effect with variables='central'"),
    ({"cpu_relocation": True, "bucket_bytes": 1024}, "cpu_relocation=True keeps one copy"),
    ({"gpus": ["/job:ghost/device:CPU:0", "CPU:1"]}, "is not a device of this process"),
    ({"gpus": ["banana", "CPU:1"]}, "is not a device name such as"),
    ({"sync_period": 2.5, "variables": "replicated"}, "Received: sync_period=2.5"),
])
def test_multi_gpu_model_refuses_wrong_options(model, kwargs, message):
    kwargs = {"gpus": 2, **kwargs}
    with pytest.raises(ValueError, match="Received") as error:
        kerasmgpu.multi_gpu_model(model, **kwargs)
    assert message in str(error.value)
    assert "Visible devices" in str(error.value) or "gpus" not in message


def test_multi_gpu_model_accepts_numpy_integers_and_whole_float_sizes(model):
    wrapped = kerasmgpu.multi_gpu_model(
        model, gpus=np.int64(2), variables="replicated", sync_period=np.int64(2),
        bucket_bytes=25e6, sync_batchnorm=np.bool_(False),
    )
    assert wrapped.bucket_bytes == 25_000_000 and wrapped.sync_batchnorm is False


def test_errors_name_the_parameter_the_user_passed(model):
    with pytest.raises(ValueError, match=r"devices must list at least 1 devices\. "
                                         r"Received: devices=\[\]"):
        kerasmgpu.ParallelModel(model, devices=[])
    with pytest.raises(ValueError, match="sync_batchnorm must be True or False"):
        kerasmgpu.ParallelModel(model, sync_batchnorm="yes")
    with pytest.raises(ValueError, match=r"Cannot use devices=\['banana'\].*not a device name"):
        kerasmgpu.split_model(model, ["banana"])
    with pytest.raises(ValueError, match="microbatches must be a whole number >= 1"):
        kerasmgpu.split_model(model, 1, microbatches=0)
    with pytest.raises(ValueError, match="teacher_device='/job:ghost/device:CPU:0' is not"):
        distill.resolve_teacher_device("/job:ghost/device:CPU:0")
    assert distill.resolve_teacher_device(np.int64(1)) == kerasmgpu.visible_devices()[1]


def test_cluster_functions_check_their_arguments():
    data = tf.data.Dataset.range(8)
    assert list(kerasmgpu.cluster.shard(data, num_workers=np.int64(2),
                                        worker_index=np.int64(1)).as_numpy_iterator()) == [
        1, 3, 5, 7]
    with pytest.raises(ValueError, match=r"worker_index must be a whole number from 0 to 1"):
        kerasmgpu.cluster.shard(data, num_workers=2, worker_index=2)
    with pytest.raises(ValueError, match="policy must be one of"):
        kerasmgpu.cluster.shard(data, policy="files")
    with pytest.warns(UserWarning, match="batched already"):
        kerasmgpu.cluster.shard(data.batch(2), num_workers=2, worker_index=0)


# ------------------------------------------------------------------ no input
@pytest.mark.parametrize("call", ["fit", "evaluate", "train_on_batch", "test_on_batch",
                                  "predict", "predict_on_batch"])
def test_no_input_is_an_error_as_in_keras(parallel, call):
    y = np.zeros((4, 2), "float32")
    args = (None,) if call.startswith("predict") else (None, y)
    with pytest.raises(ValueError, match=rf"{call}\(\) needs input data x.*Received: x=None"):
        getattr(parallel, call)(*args)


def test_an_unbatched_dataset_is_an_error_naming_its_element_shape(parallel):
    x, y = np.zeros((8, 3), "float32"), np.zeros((8, 2), "float32")
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match=r"x element shape is \(3,\).*batches of shape "
                                         r"\(None, 3\).*dataset\.batch"):
        parallel.fit(unbatched, verbose=0)
    history = parallel.fit(unbatched.batch(4), verbose=0)  # batched: trains
    assert len(history.history["loss"]) == 1


# ------------------------------------------------------------------ environment
def _import_with(**env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KERASMGPU_")}
    environment.update(TF_CPP_MIN_LOG_LEVEL="3", **env)
    return subprocess.run([sys.executable, "-c", "import kerasmgpu"], capture_output=True,
                          text=True, env=environment, timeout=120)


@pytest.mark.parametrize("env, message", [
    ({"KERASMGPU_SIMULATED_DEVICES": "0"},
     "KERASMGPU_SIMULATED_DEVICES must be a whole number >= 1. Received: '0'"),
    ({"KERASMGPU_CORES_PER_DEVICE": "2"},
     "KERASMGPU_CORES_PER_DEVICE has no effect without KERASMGPU_SIMULATED_DEVICES"),
])
def test_environment_variables_are_checked_and_named(env, message):
    result = _import_with(**env)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
