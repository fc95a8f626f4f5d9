"""`kerasmgpu launch --tuner`: KerasTuner's distributed mode, one tuner worker per device.

The script is an ordinary KerasTuner RandomSearch (tests/cluster/tune_script.py). These
tests start real processes (a chief and two tuner workers importing TensorFlow), so there
are only two: the search with a worker killed mid-trial, and a search whose trials fail.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from kerasmgpu.cluster import launch as launch_lib
from kerasmgpu.cluster import tuner

pytest.importorskip("keras_tuner")
SCRIPT = pathlib.Path(__file__).with_name("tune_script.py")


def test_environments_give_the_chief_the_oracle_and_each_tuner_its_device_and_cores():
    env = {"KERASMGPU_SIMULATED_DEVICES": "2", "TF_CONFIG": "{}", "PATH": "/bin"}
    cpu = tuner.tuner_environments(2, 8123, env, gpu_ids=[], cores=4)
    assert list(cpu) == ["chief", "tuner0", "tuner1"]
    for name, process_env in cpu.items():
        assert process_env["KERASTUNER_TUNER_ID"] == name
        assert process_env["KERASTUNER_ORACLE_IP"] == "127.0.0.1"
        assert process_env["KERASTUNER_ORACLE_PORT"] == "8123"
        # One device per tuner: no simulated split, no TF_CONFIG cluster.
        assert "KERASMGPU_SIMULATED_DEVICES" not in process_env
        assert "TF_CONFIG" not in process_env
    assert cpu["tuner1"]["TF_NUM_INTRAOP_THREADS"] == "2"
    assert cpu["chief"]["TF_NUM_INTRAOP_THREADS"] == "1"
    gpu = tuner.tuner_environments(2, 8123, env, gpu_ids=["3", "5"], cores=4)
    assert [gpu[name]["CUDA_VISIBLE_DEVICES"] for name in gpu] == ["-1", "3", "5"]
    assert tuner.default_workers(env, gpu_ids=[]) == 2
    assert tuner.default_workers(env, gpu_ids=["0", "1", "2"]) == 3
    with pytest.raises(ValueError, match="3 tuner workers need 3 GPUs"):
        tuner.tuner_environments(3, 8123, env, gpu_ids=["0", "1"], cores=4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--", "python"], "give --workers N (a cluster on this machine) or --workers-per-node K"),
        (["--tuner", "--devices-per-worker", "2", "--", "python"],
         "--devices-per-worker does not apply. Received: --devices-per-worker 2"),
        (["--tuner", "--workers", "0", "--", "python"], "Received: --workers=0"),
        (["--tuner"], "no command to launch"),
    ],
)
def test_command_line_errors_name_the_flag_and_value(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        launch_lib.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _launch_tuner(tmp_path, mode):
    env = dict(os.environ, KERASMGPU_SIMULATED_DEVICES="2", CUDA_VISIBLE_DEVICES="-1",
               TF_CPP_MIN_LOG_LEVEL="2")
    events = tmp_path / "events.jsonl"
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "kerasmgpu", "launch", "--tuner", "--", sys.executable,
         str(SCRIPT), str(tmp_path), str(events), mode],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    events = [json.loads(line) for line in events.read_text().splitlines()] \
        if events.exists() else []
    return run, events, time.monotonic() - start


def _most_at_once(events):
    """The most trials running at the same time, from their begin and end events."""
    running, most = 0, 0
    for event in sorted(events, key=lambda event: event["time"]):
        running += {"begin": 1, "end": -1, "killed": -1}[event["event"]]
        most = max(most, running)
    return most


def test_six_trials_two_at_a_time_survive_a_worker_killed_mid_trial(tmp_path):
    run, events, _ = _launch_tuner(tmp_path, "kill")
    assert run.returncode == 0, run.stderr[-3000:]
    # tuner0 killed itself in its second trial; the launcher started it again.
    assert [event["tuner"] for event in events if event["event"] == "killed"] == ["tuner0"]
    assert "tuner0 was killed by SIGKILL; starting it again (restart 1 of 3)" in run.stderr
    ended = [event for event in events if event["event"] == "end"]
    assert len(ended) == 6
    assert {event["tuner"] for event in ended} == {"tuner0", "tuner1"}
    assert _most_at_once(events) == 2
    # The chief holds the results: every trial recorded as completed, and it says so.
    statuses = [json.loads(path.read_text())["status"]
                for path in sorted((tmp_path / "search").glob("trial_*/trial.json"))]
    assert statuses == ["COMPLETED"] * 6
    assert "[worker chief] chief: 6 trials completed" in run.stdout


def test_a_worker_whose_trials_all_fail_ends_the_search_with_its_error(tmp_path):
    run, events, seconds = _launch_tuner(tmp_path, "fail")
    assert run.returncode == 1
    assert "this model refuses to build" in run.stderr
    assert "failed: tuner" in run.stderr and "stopping the search" in run.stderr
    assert not [event for event in events if event["event"] == "end"]
    assert seconds < 300  # ended, never waiting for trials that will not come
