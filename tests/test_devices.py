import os
import subprocess
import sys

import keras
import pytest

import kerasmgpu
from kerasmgpu import devices as devices_lib


def test_simulated_devices_are_visible():
    assert kerasmgpu.visible_devices() == [f"/device:CPU:{i}" for i in range(4)]


@pytest.mark.parametrize(
    "gpus, expected",
    [
        (None, ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2", "/device:CPU:3"]),
        (2, ["/device:CPU:0", "/device:CPU:1"]),
        ([3, 1], ["/device:CPU:3", "/device:CPU:1"]),
        (["/cpu:2", "CPU:0"], ["/device:CPU:2", "/device:CPU:0"]),
        (("/device:CPU:1", "/job:localhost/replica:0/task:0/device:CPU:2"),
         ["/device:CPU:1", "/device:CPU:2"]),
    ],
)
def test_gpus_argument_resolves_to_device_names(gpus, expected):
    assert devices_lib.resolve_devices(gpus) == expected


@pytest.mark.parametrize(
    "gpus, message",
    [
        (0, r"gpus must be at least 2.*Received: gpus=0"),
        (1, r"gpus must be at least 2.*Received: gpus=1"),
        (-3, r"gpus must be at least 2.*Received: gpus=-3"),
        (5, r"gpus=5 asks for more devices than are visible: 4 \(/device:CPU:0"),
        ([0, 7], r"Device 7 in gpus=\[0, 7\] is not visible\. Visible devices: /device:CPU:0"),
        (["/gpu:0", "/gpu:1"], r"Device '/gpu:0' .* is not visible"),
        ([1], r"gpus must list at least 2 devices"),
        ([1, 1], r"appears twice"),
        ("2", r"gpus must be an int >= 2.*Received: gpus='2'"),
        (2.0, r"Received: gpus=2.0"),
        (True, r"Received: gpus=True"),
    ],
)
def test_bad_gpus_argument_is_a_clear_error(gpus, message):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=message):
        kerasmgpu.multi_gpu_model(model, gpus=gpus)


def test_simulate_devices_again_with_the_same_count_is_harmless():
    assert len(kerasmgpu.simulate_devices(4)) == 4


def test_simulate_devices_after_tensorflow_initialised_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"simulate_devices\(8\) was called after TensorFlow"):
        kerasmgpu.simulate_devices(8)


@pytest.mark.parametrize("n", [0, -1, 2.5, "4"])
def test_simulate_devices_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="simulate_devices expects a whole number"):
        kerasmgpu.simulate_devices(n)


def _run(code, **env):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    environment.pop("KERASMGPU_SIMULATED_DEVICES", None)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120
    )


def test_environment_variable_sets_up_devices_on_import():
    # On import itself: the script starts TensorFlow before it uses any kerasmgpu name.
    result = _run(
        "import kerasmgpu, tensorflow as tf; tf.constant(1.0); "
        "print(len(kerasmgpu.visible_devices()))",
        KERASMGPU_SIMULATED_DEVICES="3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "3"


def test_environment_variable_with_a_bad_value_names_it():
    result = _run("import kerasmgpu", KERASMGPU_SIMULATED_DEVICES="four")
    assert result.returncode != 0
    expected = "KERASMGPU_SIMULATED_DEVICES must be a whole number >= 1. Received: 'four'"
    assert expected in result.stderr
