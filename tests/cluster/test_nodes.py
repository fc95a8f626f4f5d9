"""Clusters as they are run, on this one machine: several nodes, Slurm, TFJob, restarts.

Each "node" is a `kerasmgpu launch` process with `--hosts 127.0.0.1:P,127.0.0.1:Q` and its
own `--node-rank`; a Slurm step is its environment variables; a TFJob is the TF_CONFIG it
writes. The training runs are few and tiny (tests/cluster/nodes_worker.py: a 32-unit MLP,
512 samples, 4 epochs of 8 steps): one process alone is the reference, and the Slurm run
(2 workers x 2 devices) is the uninterrupted run the restarted ones must match.
"""

import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from kerasmgpu.cluster import backup, launch, slurm, supervise, worker

PYTHON = sys.executable
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nodes_worker.py")
EXACT = 1e-5  # a cluster against one process (float sums in another order)
RESUMED = 1e-6  # a resumed run against the uninterrupted one


def _environment(devices=None, **extra):
    """The test's environment without any cluster, device or Slurm setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KERASMGPU", "TF_CONFIG", "SLURM"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="1", **extra)
    if devices is not None:
        env["KERASMGPU_SIMULATED_DEVICES"] = str(devices)
    return env


def _port_runs(count, length):
    """`count` ports p, each with p .. p+length-1 free on 127.0.0.1 (runs apart)."""
    held, starts = [], []
    try:
        while len(starts) < count:
            run = []
            try:
                for offset in range(length):
                    sock = socket.socket()
                    sock.bind(("127.0.0.1", 0 if not run else run[0].getsockname()[1] + offset))
                    run.append(sock)
            except OSError:
                pass
            held += run
            if len(run) == length:
                starts.append(run[0].getsockname()[1])
        return starts
    finally:
        for sock in held:
            sock.close()


def _weights(path):
    with np.load(path) as data:
        return [data[key] for key in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


def _difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _finish(processes, timeout=300):
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    return [p.returncode for p in processes], outputs


def _start(args, env):
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with 4 devices, global batch 64: the weights every cluster must reach."""
    out = tmp_path_factory.mktemp("single")
    result = subprocess.run([PYTHON, WORKER, str(out)], env=_environment(4),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _weights(out / "result_single.npz")


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """`srun python nodes_worker.py`, 2 tasks on one node, as Slurm's variables say."""
    out = tmp_path_factory.mktemp("slurm")
    (base,) = _port_runs(1, 2)
    step = dict(SLURM_JOB_ID="4242", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
                SLURM_STEP_TASKS_PER_NODE="2", SLURMD_NODENAME="localhost",
                KERASMGPU_PORT_BASE=str(base))
    tasks = [_start([PYTHON, WORKER, str(out)],
                    _environment(2, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **step))
             for rank in range(2)]
    codes, outputs = _finish(tasks)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return out, base


def _launch_nodes(hosts, out_dir, workers_per_node, *script_args, env=None, **kwargs):
    """`launch` for every node of `hosts`, each in a thread of this process (as a node's
    launcher would run on its machine); returns their statuses and outputs."""
    outputs = [io.StringIO() for _ in hosts.split(",")]
    statuses = {}

    def node(rank):
        statuses[rank] = launch.launch(
            [PYTHON, WORKER, str(out_dir), *script_args], workers_per_node=workers_per_node,
            hosts=hosts, node_rank=rank, network="host", env=env or _environment(),
            stream=outputs[rank], error_stream=outputs[rank], **kwargs)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in range(len(outputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return [statuses.get(rank) for rank in range(len(outputs))], [o.getvalue() for o in outputs]


def test_two_nodes_of_two_workers_on_sharded_data_train_like_one_process(tmp_path, reference):
    first, second = _port_runs(2, 2)
    hosts = f"127.0.0.1:{first},127.0.0.1:{second}"
    codes, outputs = _launch_nodes(hosts, tmp_path, 2, "--sharded")
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = [_weights(tmp_path / f"result_{index}.npz") for index in range(4)]
    for other in results[1:]:
        assert _difference(results[0], other) == 0.0  # every worker applies the same update
    assert _difference(results[0], reference) <= EXACT
    record = json.loads((tmp_path / "result_3.json").read_text())
    assert record["workers"] == [f"127.0.0.1:{first}", f"127.0.0.1:{first + 1}",
                                 f"127.0.0.1:{second}", f"127.0.0.1:{second + 1}"]
    # Each launcher streams its own workers' lines, prefixed with their global index, and
    # says at start what it exposes.
    assert "[worker 2] finished: 4 epochs" in outputs[1]
    assert "[worker 0]" not in outputs[1] and "[worker 2]" not in outputs[0]
    assert ("node 0 of 2: workers 0..1 of 4. Their TensorFlow servers listen on EVERY network "
            "interface") in outputs[0]
    assert f"ports {first}, {first + 1}, unauthenticated" in outputs[0]


def test_a_slurm_step_of_two_tasks_builds_its_cluster_and_trains_like_one_process(
        slurm_run, reference):
    out, base = slurm_run
    first, second = (_weights(out / f"result_{index}.npz") for index in range(2))
    assert _difference(first, second) == 0.0
    assert _difference(first, reference) <= EXACT
    record = json.loads((out / "result_1.json").read_text())
    assert record["workers"] == [f"localhost:{base}", f"localhost:{base + 1}"]
    assert record["devices"] == ["/job:worker/replica:0/task:1/device:CPU:0",
                                 "/job:worker/replica:0/task:1/device:CPU:1"]


def test_a_compressed_slurm_nodelist_is_expanded_by_tensorflows_resolver(monkeypatch):
    # 4 tasks, 2 per node, on node01 and node02; this is task 3 (node02's second).
    for name, value in dict(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="4",
                            SLURM_STEP_NODELIST="node[01-02]", SLURM_STEP_TASKS_PER_NODE="2(x2)",
                            SLURMD_NODENAME="node02", SLURM_JOB_ID="17").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KERASMGPU_PORT_BASE", raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    base = slurm.port_base()
    assert base == 10000 + 10 * 17  # derived from the job id: jobs sharing a node differ
    addresses, index = slurm.task_cluster()
    assert addresses == [f"node01:{base}", f"node01:{base + 1}",
                         f"node02:{base}", f"node02:{base + 1}"]
    assert index == 3
    assert worker.cluster_from_environment() == (addresses, 3, "Slurm")
    # Each task sees both GPUs of its node: it trains on its own one.
    assert slurm.task_gpus(["0", "1"], addresses, index) == ["1"]
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")  # Slurm bound them already
    assert slurm.task_gpus(["0"], addresses, index) is None
    # A TF_CONFIG wins; KERASMGPU_SLURM=off turns joining from Slurm off.
    monkeypatch.setenv("KERASMGPU_SLURM", "off")
    assert worker.cluster_from_environment() is None
    # Task 3 placed on another node than the resolver says: a clear error.
    monkeypatch.delenv("KERASMGPU_SLURM")
    monkeypatch.setenv("SLURMD_NODENAME", "node01")
    with pytest.raises(ValueError, match="places task 3 on 'node02', but it runs on 'node01'"):
        slurm.task_cluster()


def test_srun_kerasmgpu_launch_takes_the_nodes_from_slurm(monkeypatch):
    # One launcher per node (node02 of node[01-02]), 2 workers each.
    for name, value in dict(SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2",
                            SLURM_STEP_NODELIST="node[01-02]",
                            SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURMD_NODENAME="node02",
                            KERASMGPU_PORT_BASE="2222").items():
        monkeypatch.setenv(name, value)
    layout = launch.slurm_layout(2)
    assert layout.addresses == ("node01:2222", "node01:2223", "node02:2222", "node02:2223")
    assert (layout.local, layout.node_rank, layout.num_nodes) == ((2, 3), 1, 2)
    envs = launch.worker_environments(env=_environment(), layout=layout, gpu_ids=[], cores=2)
    assert [json.loads(env["TF_CONFIG"])["task"]["index"] for env in envs] == [2, 3]
    assert [env["KERASMGPU_WORKER_INDEX"] for env in envs] == ["2", "3"]
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node01")
    monkeypatch.setenv("SLURMD_NODENAME", "node01")
    with pytest.raises(ValueError, match="run one launcher per node"):
        launch.slurm_layout(2)


def test_a_tfjob_chief_and_worker_train_like_one_process_and_only_the_chief_writes(
        tmp_path, reference):
    # What Kubeflow's TFJob writes in each pod, tried as a new user would: no simulated
    # devices (one CPU device each), the script unchanged. (Before, `import kerasmgpu`
    # joined a TF_CONFIG cluster only when KERASMGPU_SIMULATED_DEVICES was set: on a GPU
    # machine every pod would have trained alone.)
    chief, other = (f"127.0.0.1:{port}" for port in launch.free_ports(2))
    cluster = {"chief": [chief], "worker": [other]}
    pods = [
        _start([PYTHON, WORKER, str(tmp_path), "--save"], _environment(TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": task, "environment": "cloud"})))
        for task in ({"type": "chief", "index": 0}, {"type": "worker", "index": 0})
    ]
    codes, outputs = _finish(pods)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    first, second = (_weights(tmp_path / f"result_{index}.npz") for index in range(2))
    assert _difference(first, second) == 0.0
    assert _difference(first, reference) <= EXACT
    record = json.loads((tmp_path / "result_1.json").read_text())
    assert record["workers"] == [chief, other]  # the chief is worker 0
    assert record["devices"] == ["/job:worker/replica:0/task:1/device:CPU:0"]
    assert sorted(path.name for path in tmp_path.glob("model_*")) == ["model_chief0.keras"]


def _kill_run(tmp_path):
    return ("--kill-worker", "1", "--kill-marker", str(tmp_path / "killed"))


def _check_resumed(out_dir, slurm_run, output):
    uninterrupted = _weights(slurm_run[0] / "result_0.npz")
    for index in range(2):
        record = json.loads((out_dir / f"result_{index}.json").read_text())
        # Started again once, from the backup of epoch 1: epochs 2 to 4 were run.
        assert (record["restart"], record["epochs_run"]) == ("1", 3), output[-3000:]
        assert _difference(_weights(out_dir / f"result_{index}.npz"), uninterrupted) <= RESUMED


def test_a_worker_killed_mid_epoch_restarts_the_node_and_resumes_from_the_backup(
        tmp_path, slurm_run):
    # One node; the script has no BackupAndRestore: backup_dir (--backup-dir) adds one.
    err = io.StringIO()
    status = launch.launch([PYTHON, WORKER, str(tmp_path), *_kill_run(tmp_path)], workers=2,
                           devices_per_worker=2, max_restarts=2,
                           backup_dir=str(tmp_path / "backup"), env=_environment(),
                           stream=err, error_stream=err)
    output = err.getvalue()
    assert status == 0, output[-3000:]
    assert (tmp_path / "killed").read_text() == "killed in epoch 2, after batch 4\n"
    assert ("kerasmgpu launch: restart 1 of 2: worker 1 was killed by SIGKILL; starting "
            "every worker again") in output
    _check_resumed(tmp_path, slurm_run, output)
    assert not (tmp_path / "backup" / "fit-0").exists()  # a finished fit deletes its backup


def test_a_worker_killed_on_one_node_of_two_restarts_every_node(tmp_path, slurm_run):
    # The script keeps its own BackupAndRestore. Node 0's worker learns of the death of
    # node 1's (its collectives fail); each launcher starts its worker again.
    first, second = _port_runs(2, 1)
    codes, outputs = _launch_nodes(
        f"127.0.0.1:{first},127.0.0.1:{second}", tmp_path, 1,
        "--backup", str(tmp_path / "backup"), *_kill_run(tmp_path),
        env=_environment(KERASMGPU_COLLECTIVE_TIMEOUT="10"), max_restarts=1,
        devices_per_worker=2)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "restart 1 of 1: worker 1 was killed by SIGKILL" in outputs[1]
    assert "restart 1 of 1: worker 0 exited with code 1" in outputs[0]
    assert "ClusterError" in outputs[0]  # the cause, in the worker's own words
    _check_resumed(tmp_path, slurm_run, "\n".join(outputs))


def test_the_command_line_starts_each_nodes_workers_with_the_global_cluster(tmp_path, capsys):
    # `kerasmgpu launch --hosts ... --node-rank R` on two nodes; these workers only report
    # their environment (they need no peer, so the nodes can run one after the other).
    code = """
        import json, os
        names = ["KERASMGPU_WORKER_INDEX", "KERASMGPU_BACKUP_DIR", "KERASMGPU_RESTART"]
        print(json.dumps([json.loads(os.environ["TF_CONFIG"]),
                          *(os.environ.get(name) for name in names)]))
    """
    hosts = "127.0.0.1:30000,127.0.0.1:30010"
    reports = []
    for rank in (0, 1):
        status = launch.main(["--hosts", hosts, "--node-rank", str(rank), "--workers-per-node",
                              "2", "--max-restarts", "1", "--backup-dir", str(tmp_path),
                              "--network", "host", "--", *_python(code)])
        out, err = capsys.readouterr()
        assert status == 0, err
        assert f"node {rank} of 2: workers {2 * rank}..{2 * rank + 1} of 4" in err
        reports += sorted((line.split("] ", 1) for line in out.splitlines()),
                          key=lambda pair: pair[0])
    addresses = ["127.0.0.1:30000", "127.0.0.1:30001", "127.0.0.1:30010", "127.0.0.1:30011"]
    assert [prefix for prefix, _ in reports] == [f"[worker {index}" for index in range(4)]
    assert [json.loads(report) for _, report in reports] == [
        [{"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}},
         str(index), str(tmp_path), "0"] for index in range(4)]


# ---------------------------------------------------------------- the launcher alone
def _python(code):
    return [PYTHON, "-c", textwrap.dedent(code)]


def test_with_no_restart_left_a_dead_worker_ends_the_launch_within_a_minute(tmp_path):
    # Worker 1 is SIGKILLed once worker 0 runs; worker 0 would wait for ever (as in a
    # collective whose peer is gone): the grace bounds the wait. With the defaults the
    # bound is 30 s + 5 s; here a shorter grace keeps the test short.
    default_grace = inspect.signature(launch.launch).parameters["grace_seconds"].default
    assert default_grace + supervise.STOP_TIMEOUT_SECONDS < 60
    code = f"""
        import os, signal, time
        ready = {str(tmp_path / "ready")!r}
        if os.environ["KERASMGPU_WORKER_INDEX"] == "0":
            open(ready, "w").close()
            while True:
                time.sleep(1)
        while not os.path.exists(ready):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    err = io.StringIO()
    started = time.monotonic()
    status = launch.launch(_python(code), workers=2, max_restarts=0, grace_seconds=5,
                           env=_environment(), stream=io.StringIO(), error_stream=err)
    elapsed = time.monotonic() - started
    assert status == 128 + signal.SIGKILL
    assert elapsed < 60, elapsed
    assert "kerasmgpu launch: failed: worker 1 was killed by SIGKILL" in err.getvalue()


RESTART_REPORT = """
    import os, sys
    restart = int(os.environ["KERASMGPU_RESTART"])
    index = os.environ["KERASMGPU_WORKER_INDEX"]
    print(f"attempt {restart}")
    if index == "1" and restart < FAILURES:
        sys.exit(3)
"""


def test_restarts_are_logged_with_their_cause_and_giving_up_names_the_last_failure():
    out, err = io.StringIO(), io.StringIO()
    status = launch.launch(_python(RESTART_REPORT.replace("FAILURES", "1")), workers=2,
                           max_restarts=2, env=_environment(), stream=out, error_stream=err,
                           network="host")
    assert status == 0, err.getvalue()
    assert "restart 1 of 2: worker 1 exited with code 3" in err.getvalue()
    assert "restart 2" not in err.getvalue()
    assert out.getvalue().count("attempt 1") == 2  # both workers started again

    out, err = io.StringIO(), io.StringIO()
    status = launch.launch(_python(RESTART_REPORT.replace("FAILURES", "9")), workers=2,
                           max_restarts=2, env=_environment(), stream=out, error_stream=err,
                           network="host")
    assert status == 3
    messages = err.getvalue()
    assert "restart 2 of 2: worker 1 exited with code 3" in messages
    assert "failed after 2 restart(s): worker 1 exited with code 3" in messages
    assert "training starts over" in messages  # no --backup-dir: the launcher says so


def test_hosts_give_every_node_the_same_cluster():
    layouts = [launch.node_layout("10.0.0.1,10.0.0.2:2222,[fd00::3]", rank, 2)
               for rank in range(3)]
    assert all(layout.addresses == ("10.0.0.1:12345", "10.0.0.1:12346", "10.0.0.2:2222",
                                    "10.0.0.2:2223", "[fd00::3]:12345", "[fd00::3]:12346")
               for layout in layouts)
    assert [layout.local for layout in layouts] == [(0, 1), (2, 3), (4, 5)]
    assert layouts[1].peers == ("10.0.0.1:12345", "10.0.0.1:12346", "[fd00::3]:12345",
                                "[fd00::3]:12346")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers-per-node", "2", "--hosts", "a,b"],
         "hosts needs node_rank (--node-rank R)"),
        (["--workers-per-node", "2", "--hosts", "a,b", "--node-rank", "2"],
         r"0..1 for 2 node(s). Received: --node-rank 2"),
        (["--workers", "2", "--hosts", "a,b", "--node-rank", "0"],
         "give workers_per_node (--workers-per-node K)"),
        (["--workers-per-node", "2", "--hosts", "a:5000,a:5001", "--node-rank", "0"],
         "Two workers would listen on a:5001 (of nodes 0 and 1)"),
        (["--workers-per-node", "2", "--hosts", "a:http,b", "--node-rank", "0"],
         "A port in hosts must be a number in 1-65535. Received: 'a:http'"),
        (["--workers-per-node", "2", "--hosts", "a,b", "--node-rank", "0",
          "--network", "private"],
         "A cluster of nodes (--hosts, Slurm) cannot run in a private network"),
        (["--workers-per-node", "2"], "this is none (no SLURM_PROCID"),
        (["--hosts", "a,b", "--node-rank", "0"], "give --workers N"),
        (["--workers", "2", "--max-restarts", "-1"], "Received: --max-restarts -1"),
    ],
)
def test_cluster_flags_are_checked_before_any_worker_starts(capsys, monkeypatch, argv, message):
    for name in ("SLURM_PROCID", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*argv, "--", PYTHON, "-c", "pass"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "is_command"),
    [
        (["python", "/venv/bin/kerasmgpu", "launch"], True),
        (["python", "-m", "kerasmgpu", "launch"], True),
        (["python", "-u", "-mkerasmgpu.cluster.launch"], True),
        (["python", "-m", "kerasmgpu.tools.bench.worker"], True),
        (["python", "train.py"], False),
        (["python", "-m", "zoo.train"], False),
        (["python", "-c", "import kerasmgpu"], False),
    ],
)
def test_the_kerasmgpu_command_never_joins_a_cluster_itself(argv, is_command):
    assert worker._is_the_kerasmgpu_command(argv) is is_command


def test_backup_dir_adds_one_backup_per_fit_call_unless_the_script_has_one(tmp_path):
    import keras

    env = {backup.ENV_BACKUP_DIR: str(tmp_path)}
    assert backup.with_backup(None, env={}) is None
    first = backup.with_backup(None, env=env)[0].backup_dir
    call = int(first.rsplit("-", 1)[1])  # fit calls of this process, counted from 0
    assert first == os.path.join(str(tmp_path), f"fit-{call}")
    second = backup.with_backup([keras.callbacks.History()], env=env)
    assert [type(c).__name__ for c in second] == ["History", "BackupAndRestore"]
    assert second[1].backup_dir == os.path.join(str(tmp_path), f"fit-{call + 1}")
    own = keras.callbacks.BackupAndRestore(str(tmp_path / "own"))
    assert backup.with_backup([own], env=env) == [own]
