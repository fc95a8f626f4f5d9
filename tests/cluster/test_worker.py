"""Multi-worker training on 127.0.0.1: worker processes joined by TF_CONFIG."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kerasmgpu import cluster

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster_worker.py")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _environment(devices, tf_config=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERASMGPU", "TF_CONFIG"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERASMGPU_SIMULATED_DEVICES=str(devices),
               PYTHONUNBUFFERED="1", TF_NUM_INTRAOP_THREADS="1", **extra)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _start_workers(out_dir, workers, devices, *args, **extra):
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(workers)]
    processes = []
    for index in range(workers):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, WORKER, str(out_dir), *args],
            env=_environment(devices, config, **extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return processes


def _finish(processes, timeout=240):
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        outputs.append(output)
    return [p.returncode for p in processes], outputs


def _weights(path):
    with np.load(path) as data:
        return [data[key] for key in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


def test_two_workers_train_like_one_machine_with_all_their_devices(tmp_path):
    # With dropout: replica r of the cluster (worker r // 2, device r % 2) draws the masks
    # replica r of one machine draws, every step.
    codes, outputs = _finish(_start_workers(tmp_path, 2, 2, "--dropout", "0.3"))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = subprocess.run([sys.executable, WORKER, str(tmp_path), "--dropout", "0.3"],
                            env=_environment(4), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]

    worker_0, worker_1 = _weights(tmp_path / "result_0.npz"), _weights(tmp_path / "result_1.npz")
    reference = _weights(tmp_path / "result_single.npz")
    for a, b, c in zip(worker_0, worker_1, reference):
        np.testing.assert_array_equal(a, b)  # every worker applies the same update
        np.testing.assert_allclose(a, c, atol=1e-4)  # and trains like one machine
    logs = [json.loads((tmp_path / f"result_{n}.json").read_text()) for n in ("0", "1", "single")]
    # Losses and metrics are global: all workers report the single-machine figures.
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(logs[0]["history"][key], logs[2]["history"][key], rtol=1e-4)
        assert logs[0]["history"][key] == logs[1]["history"][key]
    assert logs[0]["devices"] == [
        "/job:worker/replica:0/task:0/device:CPU:0", "/job:worker/replica:0/task:0/device:CPU:1"
    ]


def test_synchronized_batchnorm_on_two_workers_equals_one_machine(tmp_path):
    # Statistics over all 4 replicas of both workers, forward and backward; on the short
    # last batch worker 0 runs 2 replicas and worker 1 one (their collectives still meet).
    codes, outputs = _finish(_start_workers(tmp_path, 2, 2, "--batchnorm"))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = subprocess.run([sys.executable, WORKER, str(tmp_path), "--batchnorm"],
                            env=_environment(4), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]

    worker_0, worker_1 = _weights(tmp_path / "result_0.npz"), _weights(tmp_path / "result_1.npz")
    reference = _weights(tmp_path / "result_single.npz")
    assert len(reference) == 8  # kernels, biases, gamma, beta, moving mean and variance
    for a, b, c in zip(worker_0, worker_1, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("input_mode", ["global", "sharded"])
def test_models_with_their_own_train_step_on_two_workers_equal_one_machine(tmp_path,
                                                                           input_mode):
    # The DCGAN (noise drawn in the step, two optimizers) and WGAN-GP (a gradient penalty:
    # a gradient of a gradient through the sliced calls), a model whose layers add
    # losses (summed over the workers) and a GAN with synchronized BatchNormalization
    # (statistics over every worker's replicas), each call split over the 4
    # replicas of both workers. Sharded: each worker feeds half of every global batch,
    # gathered before the step runs.
    codes, outputs = _finish(_start_workers(tmp_path, 2, 2, "--gans",
                                            KERASMGPU_INPUT=input_mode))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = subprocess.run([sys.executable, WORKER, str(tmp_path), "--gans"],
                            env=_environment(4), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    results = [np.load(tmp_path / f"result_{n}.npz") for n in ("0", "1", "single")]
    models = {"dcgan", "wgan", "losses", "batchnorm"}
    assert {key.split("_")[0] for key in results[2].files} == models
    for key in results[2].files:
        np.testing.assert_array_equal(results[0][key], results[1][key])
        np.testing.assert_allclose(results[0][key], results[2][key], atol=1e-5)
    logs = [json.loads((tmp_path / f"result_{n}.json").read_text())["history"]
            for n in ("0", "1", "single")]
    assert logs[0] == logs[1]
    for model in models:
        for key, values in logs[2][model].items():
            np.testing.assert_allclose(logs[0][model][key], values, atol=1e-5)


def _records(directory, samples=1001, files=4):
    """The digits training samples as TFRecord files (zoo.records), for sharded input."""
    import zoo
    import zoo.records

    (x, y), _ = zoo.datasets.load("digits", flatten=True)
    return zoo.records.write((x[:samples], y[:samples]), str(directory), num_files=files)


def test_sharded_input_each_worker_reads_its_files_and_trains_like_one_machine(tmp_path):
    # 1001 samples in 4 files: worker 0 reads files 0 and 2 (501 samples, 11 local batches
    # of <= 50), worker 1 files 1 and 3 (500, 10 batches): uneven, worker 1 pads its epoch.
    records = _records(tmp_path / "records")
    # The model's own compute_loss reads x: the workers' inputs are gathered for it.
    args = ("--records", str(tmp_path / "records"), "--local-batch", "50", "--x-loss")
    assert records["counts"] == [251, 250, 250, 250]
    codes, outputs = _finish(_start_workers(tmp_path, 2, 2, *args))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = subprocess.run([sys.executable, WORKER, str(tmp_path), *args],
                            env=_environment(4), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]

    worker_0, worker_1 = _weights(tmp_path / "result_0.npz"), _weights(tmp_path / "result_1.npz")
    reference = _weights(tmp_path / "result_single.npz")
    for a, b, c in zip(worker_0, worker_1, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-4)
    logs = [json.loads((tmp_path / f"result_{n}.json").read_text()) for n in ("0", "1", "single")]
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(logs[0]["history"][key], logs[2]["history"][key], rtol=1e-4)
        assert logs[0]["history"][key] == logs[1]["history"][key]
        # evaluate() on a test set sharded by elements (51 and 50 samples): global figures
        np.testing.assert_allclose(logs[0]["evaluate"][key], logs[2]["evaluate"][key],
                                   rtol=1e-4)
        assert logs[0]["evaluate"][key] == logs[1]["evaluate"][key]
    # predict() returns the global batches' outputs (both workers' rows), on both workers.
    assert len(logs[0]["predict"]) == 101 and logs[0]["predict"] == logs[1]["predict"]
    np.testing.assert_allclose(logs[0]["predict"], logs[2]["predict"], atol=1e-5)
    # Each worker read its own files only, every epoch: 1/2 of the data each, none twice.
    assert [logs[0]["elements_read"], logs[1]["elements_read"]] == [501 * 2, 500 * 2]
    assert logs[0]["epochs_run"] == logs[1]["epochs_run"] == 2


def test_a_killed_worker_stops_the_survivor_with_a_clear_error_and_a_restart_resumes(tmp_path):
    # The workers read their own files (sharded input): the victim dies while reading.
    _records(tmp_path / "records", samples=600)
    sharded = ("--records", str(tmp_path / "records"))
    backup = tmp_path / "backup"
    processes = _start_workers(tmp_path, 2, 1, "--epochs", "40", "--backup", str(backup),
                               "--slow", *sharded, KERASMGPU_COLLECTIVE_TIMEOUT="30")
    survivor, victim = processes
    lines = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = survivor.stdout.readline()
        lines.append(line)
        if "epoch 2 done" in line or not line:
            break
    assert any("epoch 2 done" in line for line in lines), "".join(lines)[-3000:]
    victim.kill()
    killed_at = time.time()
    try:
        output, _ = survivor.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail("the surviving worker hung after its peer was killed")
    waited = time.time() - killed_at
    assert survivor.returncode != 0
    assert waited < 60, f"the survivor took {waited:.0f} s to stop"
    assert "ClusterError" in output and "Restart all workers" in output, output[-3000:]
    victim.communicate()

    # Both workers restart from the chief's backup and finish the remaining epochs.
    codes, outputs = _finish(_start_workers(tmp_path, 2, 1, "--epochs", "4", "--backup",
                                            str(backup), *sharded))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    runs = [json.loads((tmp_path / f"result_{n}.json").read_text())["epochs_run"] for n in "01"]
    assert runs[0] == runs[1] and runs[0] < 4  # resumed after the backed-up epochs


def test_a_peer_that_never_starts_is_a_clear_error(tmp_path):
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": 0}}
    result = subprocess.run(
        [sys.executable, WORKER, str(tmp_path)],
        env=_environment(1, config, KERASMGPU_REGISTER_TIMEOUT="10"),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "could not reach all 2 workers" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'must have a "cluster" entry'),
        ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}', 'must have a "task" entry'),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
         r"task index must be 0\.\.0 for 1 'worker' task\(s\)\. Received: index=3"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
         "task type 'ps' is not in its cluster"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
         'addresses as "host:port"'),
        ('{"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
         "may list 'chief' and 'worker' tasks"),
    ],
)
def test_bad_tf_config_is_a_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        cluster.parse_tf_config(config)


def test_chief_and_workers_are_numbered_chief_first():
    config = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                         "task": {"type": "worker", "index": 1}})
    assert cluster.parse_tf_config(config) == (["a:1", "b:1", "c:1"], 2)


def test_bad_tf_config_fails_at_import_with_its_message():
    env = _environment(1)
    env["TF_CONFIG"] = '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}'
    result = subprocess.run([sys.executable, "-c", "import kerasmgpu"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'TF_CONFIG must have a "task" entry' in result.stderr


def test_zoo_train_runs_under_the_launcher_and_only_the_chief_writes(tmp_path):
    # The training split in TFRecord files (zoo.records); each worker reads its own.
    output = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERASMGPU", "TF_CONFIG"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    records = subprocess.run(
        [sys.executable, "-m", "zoo.records", "--dataset", "digits", "--files", "4",
         "--output", str(tmp_path / "records")], env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert records.returncode == 0, records.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "-m", "kerasmgpu", "launch", "--workers", "2", "--", sys.executable,
         "-m", "zoo.train", "--model", "mnist_mlp", "--dataset", "digits", "--epochs", "1",
         "--records", str(tmp_path / "records"), "--output", str(output)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    tests = [line.split("test: ", 1)[1] for line in result.stdout.splitlines() if "test: " in line]
    assert len(tests) == 2 and tests[0] == tests[1]  # global metrics, equal on both workers
    assert result.stdout.count("wrote ") == 1
    record = json.loads((output / "history.json").read_text())
    assert record["devices"] == ["/job:worker/replica:0/task:0/device:CPU:0"]
    assert (output / "model.keras").exists()
