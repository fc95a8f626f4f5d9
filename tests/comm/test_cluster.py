"""variables="replicated" on a cluster: all-reduce in the box, across workers, in the box."""

import json
import subprocess
import sys

import numpy as np

from tests.cluster.test_worker import WORKER, _environment, _finish, _start_workers, _weights


def test_replicated_two_workers_by_two_devices_equal_one_process_with_four(tmp_path):
    codes, outputs = _finish(_start_workers(tmp_path, 2, 2, "--variables", "replicated"))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = subprocess.run(
        [sys.executable, WORKER, str(tmp_path), "--variables", "replicated"],
        env=_environment(4), capture_output=True, text=True, timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    worker_0, worker_1 = _weights(tmp_path / "result_0.npz"), _weights(tmp_path / "result_1.npz")
    reference = _weights(tmp_path / "result_single.npz")
    for a, b, c in zip(worker_0, worker_1, reference):
        np.testing.assert_array_equal(a, b)  # every worker's copies stay identical
        np.testing.assert_allclose(a, c, atol=1e-5)  # and train like one 4-device process
    logs = [json.loads((tmp_path / f"result_{n}.json").read_text()) for n in ("0", "1", "single")]
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(logs[0]["history"][key], logs[2]["history"][key], rtol=1e-5)


def test_sharded_state_on_two_workers_by_two_devices_equals_replicated_in_one_process(tmp_path):
    # The optimizer state in four shards, one per device of both workers; saved with the
    # whole state gathered (every worker takes part, the chief writes).
    saved = tmp_path / "sharded.keras"
    codes, outputs = _finish(_start_workers(
        tmp_path, 2, 2, "--variables", "replicated", "--optimizer-state", "sharded",
        "--save", str(saved),
    ))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = subprocess.run(
        [sys.executable, WORKER, str(tmp_path), "--variables", "replicated"],
        env=_environment(4), capture_output=True, text=True, timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    worker_0, worker_1 = _weights(tmp_path / "result_0.npz"), _weights(tmp_path / "result_1.npz")
    reference = _weights(tmp_path / "result_single.npz")
    for a, b, c in zip(worker_0, worker_1, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-6)
    import keras

    loaded = keras.saving.load_model(saved)
    assert len(loaded.optimizer.variables) == 2 + len(loaded.trainable_variables)  # momentum
    for a, b in zip(loaded.get_weights(), worker_0):
        np.testing.assert_array_equal(a, b)
    momentum = loaded.optimizer.variables[2:]
    assert all(np.any(m.numpy() != 0) for m in momentum)  # every shard's state gathered
