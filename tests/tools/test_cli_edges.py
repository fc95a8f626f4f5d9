"""The command line refuses what it cannot do before doing any work."""

import os
import subprocess
import sys

import pytest

from kerasmgpu.cluster import launch
from kerasmgpu.tools import cli


@pytest.mark.parametrize("argv, message", [
    (["predict-scaling", "--step-time", "nan"], "--step-time: 'nan' is not a finite number"),
    (["predict-scaling", "--step-time", "inf"], "--step-time: 'inf' is not a finite number"),
    (["predict-scaling", "--gpu-tflops=-inf"], "'-inf' is not a finite number"),
    (["bench", "--overlap", "nan"], "--overlap: 'nan' is not a finite number"),
])
def test_number_flags_are_finite(argv, message, capsys):
    with pytest.raises(SystemExit) as status:
        cli.main(argv)
    assert status.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_checks_where_results_go_before_measuring(flag, tmp_path, capsys):
    # A directory that does not exist, then one that cannot be written (not as root).
    missing = str(tmp_path / "no" / "results")
    with pytest.raises(SystemExit) as status:
        cli.main(["bench", "--model", "mlp", "--devices", "1", flag, missing])
    assert status.value.code == 2
    assert f"{flag} {missing} is in a directory that does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict-scaling", "--step-time", "0.1", "--json", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            cli.main(["bench", "--devices", "1", flag, str(locked / "out")])
        assert "cannot be written" in capsys.readouterr().err


def test_launch_warns_when_workers_outnumber_the_cores():
    assert launch.oversubscription(1000, None, [], cores=2).startswith(
        "warning: 1000 workers x 1 device(s) = 1000 simulated devices on 2 CPU core(s)")
    assert "8 simulated devices" in launch.oversubscription(4, 2, [], cores=2)
    assert launch.oversubscription(2, 1, [], cores=2) is None
    assert launch.oversubscription(4, 1, ["0", "1", "2", "3"], cores=2) is None  # GPUs


def test_launch_says_so_on_its_output(capsys):
    status = launch.main(["--workers", str(os.cpu_count() + 1), "--network", "host", "--",
                          sys.executable, "-c", "pass"])
    assert status == 0
    assert "kerasmgpu launch: warning:" in capsys.readouterr().err


def test_a_command_running_tensorflow_prints_none_of_its_start_up_lines():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERASMGPU_SIMULATED_DEVICES")}
    environment["PYTHONPATH"] = root
    result = subprocess.run(
        [sys.executable, "-m", "kerasmgpu", "predict-scaling", "--model", "mnist_mlp",
         "--gpu-tflops", "10"], capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Predicted scaling" in result.stdout
    assert result.stderr == ""  # no CUDA, cuInit or absl lines (kerasmgpu -v keeps them)
