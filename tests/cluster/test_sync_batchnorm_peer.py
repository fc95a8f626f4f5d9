"""A dead peer during a synchronized BatchNorm step is an error within the timeout, not a hang."""

import subprocess
import time

import pytest

from tests.cluster.test_worker import _start_workers


def test_a_killed_peer_during_synchronized_batchnorm_steps_is_a_cluster_error(tmp_path):
    # 2 workers x 2 devices: each worker's replicas sum their statistics in the process
    # (collectives between its devices) and across workers; worker 1 dies between steps.
    survivor, victim = _start_workers(
        tmp_path, 2, 2, "--batchnorm", "--slow", "--epochs", "100000",
        KERASMGPU_COLLECTIVE_TIMEOUT="20",
    )
    lines, deadline = [], time.time() + 180
    while time.time() < deadline:
        lines.append(survivor.stdout.readline())
        if "epoch 2 done" in lines[-1] or not lines[-1]:
            break
    assert any("epoch 2 done" in line for line in lines), "".join(lines)[-3000:]
    victim.kill()
    killed_at = time.time()
    try:
        output, _ = survivor.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail("the surviving worker hung in a synchronized BatchNorm step")
    finally:
        victim.communicate()
    waited = time.time() - killed_at
    assert survivor.returncode != 0
    assert waited < 60, f"the survivor took {waited:.0f} s to stop (timeout 20 s)"
    assert "ClusterError" in output and "Restart all workers" in output, output[-3000:]
